"""Generation: cached decoding equals the full forward pass; sampling; the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moejax import generate
from moejax import routing
from moejax.nn import TransformerLM
from moejax.train import config as config_lib
from moejax import train as trainer

import shared_data  # tests/shared_data.py
from shared_data import SHAKESPEARE_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every router (dense included) with group_by="batch", the decode-time grouping;
# token-choice routers with a capacity (2 of them tight enough to drop) and
# dropless. These are all the causal routing settings of a decoder.
_BASE = dict(num_experts=4, top_k=2, expert_hidden=32, group_by="batch")
ROUTINGS = {
    "dense": dict(router="dense"),
    "topk": dict(router="topk", capacity_factor=1.0),
    "topk_dropless": dict(router="topk", capacity_factor=0.0, dispatch="dropless"),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
    "sinkhorn": dict(router="sinkhorn"),
    "hash": dict(router="hash"),
    "soft_moe": dict(router="soft_moe", capacity_factor=1.0),
    "deepseek_v3": dict(router="topk", score_fn="sigmoid", num_groups=2, top_groups=1,
                        bias_update_rate=1e-3, num_shared_experts=1),
}


def test_every_router_is_covered():
  assert {r["router"] for r in ROUTINGS.values()} == set(routing.ROUTERS)


def _model(moe, *, scan_layers=False, batch=3):
  return TransformerLM(vocab_size=61, num_layers=3, d_model=32, num_heads=2,
                       moe={**_BASE, **moe}, first_dense_layers=1, rngs=nnx.Rngs(0),
                       scan_layers=scan_layers, tokens_per_group=batch)


def _decoded_logits(model, tokens, prefix):
  cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 2)
  logits, cache = model.decode(tokens[:, :prefix], cache)
  pieces = [logits]
  for t in range(prefix, tokens.shape[1]):
    logits, cache = model.decode(tokens[:, t:t + 1], cache)
    pieces.append(logits)
  assert int(cache["index"]) == tokens.shape[1]
  return jnp.concatenate(pieces, axis=1)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_cached_decoding_equals_the_full_forward_pass(name):
  model = _model(ROUTINGS[name])
  tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 61)
  full, _ = model(tokens)
  np.testing.assert_allclose(_decoded_logits(model, tokens, prefix=4), full, atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "expert_choice"])
def test_cached_decoding_with_scanned_layers(name):
  model = _model(ROUTINGS[name], scan_layers=True)
  tokens = jax.random.randint(jax.random.key(2), (3, 9), 0, 61)
  full, _ = model(tokens)
  np.testing.assert_allclose(_decoded_logits(model, tokens, prefix=1), full, atol=1e-5)


def test_decoding_does_see_the_cache():
  # A wrong cache (another prefix) changes the next logits: the test above
  # could not pass with a decoder that ignored the cache.
  model = _model(ROUTINGS["topk_dropless"])
  tokens = jax.random.randint(jax.random.key(3), (3, 6), 0, 61)
  cache = model.init_cache(3, 8)
  _, cache = model.decode(tokens[:, :5], cache)
  other = model.init_cache(3, 8)
  _, other = model.decode((tokens[:, :5] + 1) % 61, other)
  a, _ = model.decode(tokens[:, 5:6], cache)
  b, _ = model.decode(tokens[:, 5:6], other)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


# --------------------------------------------------------------- sampling


def test_greedy_and_degenerate_filters_take_the_argmax():
  logits = jax.random.normal(jax.random.key(0), (5, 40))
  best = np.asarray(jnp.argmax(logits, -1))
  key = jax.random.key(7)
  for kwargs in (dict(temperature=0.0, top_k=0, top_p=1.0),
                 dict(temperature=1.5, top_k=1, top_p=1.0),
                 dict(temperature=1.5, top_k=0, top_p=1e-6)):
    np.testing.assert_array_equal(generate.sample_logits(logits, key, **kwargs), best)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(1)
  top2 = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=2, top_p=1.0))
  assert set(top2.tolist()) == {0, 1}
  assert abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03  # renormalized over the two
  # top_p=0.8: {0.5, 0.3} reach 0.8; 0.9 needs the third token too.
  nucleus = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=0,
                                              top_p=0.8))
  assert set(nucleus.tolist()) == {0, 1}
  wider = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=0.9))
  assert set(wider.tolist()) == {0, 1, 2}
  everything = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=0,
                                                 top_p=1.0))
  assert set(everything.tolist()) == {0, 1, 2, 3}
  padded = np.asarray(generate.sample_logits(logits, keys, temperature=1.0, top_k=0,
                                             top_p=1.0, vocab_size=3))
  assert set(padded.tolist()) == {0, 1, 2}


def test_greedy_generation_equals_rerunning_the_model_without_a_cache():
  model = _model(ROUTINGS["topk_dropless"], batch=2)
  prompts = [[5, 9, 11], [7]]  # different lengths
  options = generate.SamplingOptions(max_new_tokens=6, temperature=0.0)
  got = generate.generate_tokens(model, prompts, options)
  # Reference: the full forward pass on the sequences so far, one token at a time.
  rows = [list(p) for p in prompts]
  width = max(len(p) for p in prompts) + options.max_new_tokens
  for position in range(1, width):
    if all(len(r) > position for r in rows):
      continue
    padded = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    logits, _ = model(padded)
    for r, row in enumerate(rows):
      if len(row) == position:
        row.append(int(jnp.argmax(logits[r, position - 1])))
  for r, prompt in enumerate(prompts):
    assert got[r] == rows[r][len(prompt):len(prompt) + options.max_new_tokens]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
  model = _model(ROUTINGS["topk_dropless"], batch=2)
  prompts = [[1, 2], [3, 4]]
  options = generate.SamplingOptions(max_new_tokens=8, temperature=1.0, seed=3)
  first = generate.generate_tokens(model, prompts, options)
  assert generate.generate_tokens(model, prompts, options) == first
  other = generate.generate_tokens(model, prompts, generate.SamplingOptions(
      max_new_tokens=8, temperature=1.0, seed=4))
  assert other != first


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_options_name_the_option(options, message):
  with pytest.raises(ValueError, match=message):
    generate.SamplingOptions(**options).check()


# --------------------------------------------------------- from a checkpoint


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory):
  shared_data.skip_without_shakespeare()
  base = tmp_path_factory.mktemp("gen")
  config = config_lib.default_config()
  config.data.update(name="tiny_shakespeare", data_dir=str(base / "tfds"),
                     manual_dir=str(SHAKESPEARE_DIR))
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, group_by="batch")
  config.train.update(seq_len=32, batch_size=8, steps=4, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=1, checkpoint_every=4)
  workdir = str(base / "run")
  trainer.train_and_evaluate(config, workdir)
  return workdir


def test_load_reads_parameters_only_and_generates_text(shakespeare_run):
  generator = generate.load(shakespeare_run)
  assert generator.step == 4
  samples = generator.generate(["ROMEO:", "", "A longer prompt"], generate.SamplingOptions(
      max_new_tokens=12, temperature=0.0))
  assert len(samples) == 3 and all(isinstance(s, str) for s in samples)
  # Byte tokens: 12 new bytes, each at most one character (fewer only if the
  # document separator was drawn).
  assert all(len(s) <= 12 for s in samples) and any(len(s) for s in samples)
  dropless = generate.load(shakespeare_run, dropless=True)
  assert dropless.config.model.moe.capacity_factor == 0


@pytest.mark.slow
def test_generate_cli(shakespeare_run, tmp_path):
  out = tmp_path / "samples.json"
  done = subprocess.run(
      [sys.executable, "-m", "moejax.generate", f"--workdir={shakespeare_run}",
       "--prompt=ROMEO:", "--prompt=JULIET:", "--max_new_tokens=8", "--temperature=0.8",
       "--top_k=20", "--top_p=0.95", "--seed=1", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  record = json.loads(out.read_text())
  assert [s["prompt"] for s in record["samples"]] == ["ROMEO:", "JULIET:"]
  assert record["step"] == 4 and record["top_k"] == 20
  for args, message in (([f"--workdir={tmp_path}"], "holds no checkpoint"),
                        ([f"--workdir={shakespeare_run}", "--top_p=2"], "top_p"),
                        ([f"--workdir={shakespeare_run}", "--mesh=1,2"], "--mesh")):
    bad = subprocess.run([sys.executable, "-m", "moejax.generate", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
