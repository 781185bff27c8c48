"""LoRA / QLoRA fine-tuning (moejax.train.lora): only the adapters train."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import evaluate as evaluate_lib
from moejax import generate as generate_lib
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import lora
from moejax.train import optim
from moejax.train import steps as steps_lib
from moejax import model as model_lib
from moejax import train as trainer

import host_devices  # tests/host_devices.py: the environment of N host devices

VOCAB = 40


def _config(targets="experts", rank=4, **moe) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, group_by="batch", **moe)
  config.train.update(seq_len=16, batch_size=8, steps=4, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=1, checkpoint_every=2,
                      learning_rate=1e-2)
  config.data.update(vocab_size=VOCAB, num_domains=4)
  config.finetune.base = "/unused"
  config.finetune.lora.update(rank=rank, targets=targets)
  return config


def _tokens(seed=0, batch=8, length=16):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def _lora_model(config, seed=1):
  model = model_lib.build(config, VOCAB, nnx.Rngs(seed))
  return model, lora.apply(model, config, _tokens())


def _flat(state):
  return {"/".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(state)}


TARGET_CASES = [
    ("router", {"bias_update_rate": 0.01}),  # the balancing bias stays frozen too
    ("experts", {}),
    ("shared_experts", {"num_shared_experts": 1}),
    ("attention", {}),
]


@pytest.mark.parametrize("targets, moe", TARGET_CASES)
def test_training_changes_only_the_adapters(targets, moe):
  config = _config(targets, **moe)
  base, model = _lora_model(config)
  base_state = _flat(nnx.state(base))
  graphdef, state = nnx.split(model)
  adapters, frozen = lora.split(state)
  names = set(_flat(adapters))
  # Adapters sit in the targets' modules only, named after their weights.
  wanted = tuple("/" + lora.TARGETS[t] + "/" for t in targets.split(","))
  assert names and all(any(w in n for w in wanted) for n in names), names
  assert all(n.endswith(("_lora_a", "_lora_b")) for n in names)
  assert set(lora.adapter_counts(adapters)) == set(targets.split(","))
  # The frozen state is the base's, unchanged by applying LoRA.
  frozen_before = _flat(frozen)
  assert frozen_before.keys() == base_state.keys()
  for name, value in base_state.items():
    np.testing.assert_array_equal(frozen_before[name], value, err_msg=name)

  tx = optim.make_optimizer(config.train)
  opt_state = tx.init(steps_lib.trainable(adapters))
  # The optimizer's moments are the adapters' shapes, nothing of the base.
  moment_sizes = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
  adapter_size = sum(v.size for v in _flat(adapters).values())
  assert moment_sizes == 2 * adapter_size
  step = steps_lib.make_train_step(graphdef, tx, optim.learning_rate_schedule(config.train),
                                   config.seed, frozen)
  start = _flat(adapters)
  params = adapters
  for i in range(3):
    params, opt_state, metrics, finite = step(
        params, opt_state, {"inputs": _tokens(i), "targets": _tokens(i + 10),
                            "weights": jnp.ones((8, 16))}, jnp.asarray(i + 1, jnp.int32))
    assert bool(finite)
  after = _flat(params)
  assert after.keys() == start.keys()  # the step returns adapters only
  assert any(not np.array_equal(after[n], start[n]) for n in after)
  # B starts at zero and moves; the base (bias included) is bit-identical.
  assert all(np.any(after[n] != 0) for n in after if n.endswith("_lora_b"))
  for name, value in _flat(frozen).items():
    np.testing.assert_array_equal(value, base_state[name], err_msg=name)


def test_fresh_adapters_compute_the_base_function_and_trained_ones_do_not():
  config = _config("router,experts,attention")
  base, model = _lora_model(config)
  tokens = _tokens(3)
  np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(base(tokens)[0]))
  graphdef, state = nnx.split(model)
  adapters, frozen = lora.split(state)
  moved = jax.tree.map(lambda x: x + 0.05, adapters)
  changed = nnx.merge(graphdef, moved, frozen)
  assert float(jnp.max(jnp.abs(changed(tokens)[0] - base(tokens)[0]))) > 1e-3


def test_every_expert_has_its_own_a_and_b():
  config = _config("experts")
  _, model = _lora_model(config)
  experts = model.layers[0].ffn.experts
  assert experts.wi_lora_a.get_value().shape == (4, 32, 4)   # [E, D, r]
  assert experts.wi_lora_b.get_value().shape == (4, 4, 32)   # [E, r, H]
  assert experts.wo_lora_a.get_value().shape == (4, 32, 4)   # [E, H, r]
  assert experts.wo_lora_b.get_value().shape == (4, 4, 32)   # [E, r, D]
  # Moving one expert's adapter changes the model's output.
  tokens = _tokens(5)
  before = model(tokens)[0]
  experts.wi_lora_b.set_value(experts.wi_lora_b.get_value().at[0].set(0.5))
  assert float(jnp.max(jnp.abs(model(tokens)[0] - before))) > 1e-4


def test_qlora_stores_the_targets_quantized_and_trains_only_adapters():
  config = _config("experts,attention")
  config.finetune.lora.quantize_base = "int8"
  base, model = _lora_model(config)
  adapters, frozen = lora.split(nnx.state(model))
  flat = _flat(frozen)
  quantized = {n for n, v in flat.items() if v.dtype == np.int8}
  assert any("/ffn/experts/wi" in n for n in quantized)
  assert any("/attention/qkv" in n for n in quantized)
  assert not any("router" in n or "embed" in n for n in quantized)
  # Per-expert, per-channel scales: one per (expert, output unit).
  scale = flat["layers/0/ffn/experts/wi/array/scale"]
  assert scale.shape == (4, 1, 32)
  tokens = _tokens(2)
  # int8 rounding of the base (adapters still zero): small on average; a
  # few tokens whose top-2 choice flips differ more.
  gap = float(jnp.mean(jnp.abs(model(tokens)[0] - base(tokens)[0])))
  assert 0 < gap < 0.05
  graphdef = nnx.graphdef(model)
  adapter_names = set(_flat(adapters))  # the step donates the adapters' buffers
  tx = optim.make_optimizer(config.train)
  step = steps_lib.make_train_step(graphdef, tx, optim.learning_rate_schedule(config.train),
                                   config.seed, frozen)
  params, _, _, finite = step(adapters, tx.init(steps_lib.trainable(adapters)),
                              {"inputs": tokens, "targets": _tokens(4),
                               "weights": jnp.ones((8, 16))}, jnp.asarray(1, jnp.int32))
  assert bool(finite)
  assert set(_flat(params)) == adapter_names
  for name, value in _flat(frozen).items():
    np.testing.assert_array_equal(value, flat[name])


@pytest.mark.parametrize("change, message", [
    ({"finetune.base": None}, "set config.finetune.base"),
    ({"finetune.lora.rank": 0}, "needs config.finetune.lora.rank > 0"),
    ({"finetune.lora.rank": -1}, "rank must be an integer >= 0"),
    ({"finetune.lora.alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"finetune.lora.targets": "experts,mlp"}, "'mlp' is not a target"),
    ({"finetune.lora.targets": "experts,experts"}, "names a target twice"),
    ({"finetune.lora.quantize_base": "nf4"}, "quantize_base must be one of"),
    ({"init.upcycle_from": "/x"}, "set one"),
    ({"model.scan_layers": True}, "set config.model.scan_layers=False"),
    ({"model.moe.dispatch": "dropless", "model.moe.capacity_factor": 0.0},
     "config.model.moe.dispatch='dropless' with config.finetune.lora.targets='experts'"),
    ({"mesh.model": 2, "finetune.lora.targets": "experts,shared_experts"},
     "config.mesh.model=2 with LoRA on shared_experts"),
    ({"mesh.model": 2, "finetune.lora.targets": "attention",
      "finetune.lora.quantize_base": "int8"},
     r"config.mesh.model=2 with LoRA on attention \(quantize_base='int8'\)"),
])
def test_config_errors_name_the_key(change, message):
  config = _config()
  config.update_from_flattened_dict(change)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


@pytest.mark.parametrize("targets, moe, message", [
    ("shared_experts", {}, "no shared experts"),
    ("experts", {"capacity_factor": 0.0, "dispatch": "dropless"}, "dropless dispatcher"),
])
def test_a_target_without_adapters_is_an_error(targets, moe, message):
  config = _config(targets, **moe)
  with pytest.raises(ValueError, match=message):
    _lora_model(config)


def _fake_base(directory, config, step=4, drop=()):
  """A base run's checkpoint folder as base_run reads it (no arrays)."""
  saved = config.to_dict()
  for key in drop:  # keys an older moejax did not write
    *parents, leaf = key.split(".")
    node = saved
    for parent in parents:
      node = node[parent]
    del node[leaf]
  for item in ("state", "data", "config"):
    (directory / "checkpoints" / str(step) / item).mkdir(parents=True, exist_ok=True)
  (directory / "checkpoints" / str(step) / "config" / "metadata").write_text(json.dumps(saved))


def test_base_model_mismatch_names_the_key(tmp_path):
  base = _config(rank=0)
  base.finetune.base = None
  # Saved by an older moejax: no finetune keys, no model.moe.top_groups.
  _fake_base(tmp_path / "base", base, drop=("finetune", "model.moe.top_groups"))
  config = _config()
  config.finetune.base = str(tmp_path / "base")
  _, step, base_config = lora.base_run(config, str(tmp_path / "ft"))
  assert step == 4 and not lora.enabled(base_config)
  lora.check_base(base_config, config)  # same model (missing keys at their defaults)
  config.model.remat = "full"  # how, not what, is computed
  config.model.moe.capacity_factor = 2.0  # how tokens are batched to the experts
  config.model.moe.group_by = "sequence"
  lora.check_base(base_config, config)
  config.model.moe.top_groups = 2  # the base ran with the default
  with pytest.raises(ValueError, match=r"config.model.moe.top_groups=2, but the base run"):
    lora.check_base(base_config, config)
  config.model.moe.top_groups = base.model.moe.top_groups
  config.model.d_model = 64
  with pytest.raises(ValueError, match=r"config.model.d_model=64, but the base run"):
    lora.check_base(base_config, config)
  config.finetune.base = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="is not a directory"):
    lora.base_run(config, str(tmp_path / "ft"))


def test_the_record_names_the_base_and_damage_is_named(tmp_path):
  base = _config(rank=0)
  base.finetune.base = None
  _fake_base(tmp_path / "base", base, step=4)
  _fake_base(tmp_path / "base", base, step=6)
  ft = tmp_path / "ft"
  ft.mkdir()
  config = _config()
  config.finetune.base = "relative/from/another/cwd"
  # The record's absolute base and step win over config.finetune.base and
  # the newest checkpoint.
  (ft / lora.RECORD_FILE).write_text(json.dumps({"base": str(tmp_path / "base"),
                                                 "step": 4}))
  assert lora.base_run(config, str(ft))[:2] == (str(tmp_path / "base"), 4)
  (ft / lora.RECORD_FILE).write_text('{"base": "/x", "st')
  with pytest.raises(ValueError, match="finetuned_from.json cannot be read"):
    lora.base_run(config, str(ft))
  (ft / lora.RECORD_FILE).write_text('{"base": "/x"}')
  with pytest.raises(ValueError, match="does not name a base workdir and step"):
    lora.base_run(config, str(ft))
  (ft / lora.RECORD_FILE).unlink()
  config.finetune.base = str(tmp_path / "base")
  (tmp_path / "base" / "checkpoints" / "6" / "data").rmdir()
  with pytest.raises(ValueError, match=r"checkpoint 6 cannot be read \(data/ is missing\)"):
    lora.base_run(config, str(ft))


def test_configs_saved_before_finetune_existed_are_not_lora_runs():
  config = _config(rank=0).to_dict()
  del config["finetune"]
  assert not lora.enabled(ml_collections.ConfigDict(config))
  assert lora.enabled(_config(rank=2))


# The end-to-end runs balance with a router bias (Wang et al. 2024): a LoRA
# run must leave it frozen, or its logged evaluation would not be what the
# base's checkpoint plus the adapters compute.
BIAS = {"bias_update_rate": 0.05}


def _base_config():
  base = _config(rank=0, **BIAS)
  base.finetune.base = None
  base.data.domains = "0,1,2"
  return base


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
  """A base run trained 4 steps on domains 0-2 (copy it before training on)."""
  base_dir = str(tmp_path_factory.mktemp("lora") / "base")
  trainer.train_and_evaluate(_base_config(), base_dir)
  return base_dir


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_names_its_base_and_resumes(trained_base, tmp_path):
  base_dir, ft_dir = str(tmp_path / "base"), str(tmp_path / "ft")
  shutil.copytree(trained_base, base_dir)
  base = _base_config()
  config = _config("router,experts", **BIAS)
  config.finetune.base = base_dir
  config.data.domains = "3"
  config.train.steps = 2
  first = trainer.train_and_evaluate(config, ft_dir)
  record = json.load(open(os.path.join(ft_dir, lora.RECORD_FILE)))
  assert record["base"] == os.path.abspath(base_dir) and record["step"] == 4
  assert set(record["adapter_params"]) == {"router", "experts"}
  summary = json.load(open(os.path.join(ft_dir, "summary.json")))
  assert summary["finetune"]["adapter_params"] == record["adapter_params"]
  # The checkpoint holds the adapters (and their optimizer state) only.
  reader = checkpoints.Checkpointer(ft_dir, keep=1, read_only=True)
  try:
    saved = [line.split(":")[0] for line in reader.mismatched_shapes(2, {})]
  finally:
    reader.close()
  params = [p for p in saved if p.startswith("params/")]
  assert params and all(p.endswith(("_lora_a", "_lora_b")) for p in params), params
  # An uninterrupted run to step 4 on the same base.
  config.train.steps = 4
  again = trainer.train_and_evaluate(config, str(tmp_path / "again"))
  # The base trains on; the fine-tuning run resumes on the step it recorded.
  base.train.steps = 6
  trainer.train_and_evaluate(base, base_dir)
  resumed = trainer.train_and_evaluate(config, ft_dir)
  assert np.isfinite(first["train/loss"])
  assert json.load(open(os.path.join(ft_dir, lora.RECORD_FILE)))["step"] == 4
  assert again["eval/loss"] == pytest.approx(resumed["eval/loss"], abs=1e-6)
  # moejax.evaluate rebuilds base + adapters and measures what training logged;
  # generation (KV-cache decoding, which the adapters do not reach) refuses.
  assert evaluate_lib.evaluate(ft_dir)["eval/loss"] == pytest.approx(resumed["eval/loss"],
                                                                     abs=1e-6)
  with pytest.raises(ValueError, match="LoRA fine-tuning run"):
    generate_lib.load(ft_dir)


def _finetune_config(base_dir, targets, quantize, data=-1, expert=1, model=1):
  config = _config(targets, **BIAS)
  config.finetune.base = base_dir
  config.finetune.lora.quantize_base = quantize
  config.data.domains = "3"
  config.train.update(steps=2, eval_every=2)
  config.mesh.update(data=data, expert=expert, model=model)
  return config


# (name, targets, quantize_base, mesh data x expert x model on 8 devices)
MESH_CASES = [("lora", "router,experts,attention", "none", (2, 2, 2)),
              ("qlora", "router,experts,attention", "int8", (4, 2, 1))]

_MESH_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_lora
from moejax import train as trainer
results = {}
for name, targets, quantize, mesh in test_lora.MESH_CASES:
  config = test_lora._finetune_config(sys.argv[2], targets, quantize, *mesh)
  results[name] = trainer.train_and_evaluate(config, sys.argv[3] + "/" + name)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_lora_on_a_mesh_trains_what_one_device_trains(trained_base, tmp_path):
  """Adapters created as on one device, laid out by PARAM_AXES, and applied
  inside the experts' shard_map (expert and model parallel): the same losses."""
  base_dir = trained_base
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = host_devices.subprocess_env(8)
  proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, tests_dir, base_dir,
                         str(tmp_path / "mesh")], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  on_mesh = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, targets, quantize, _ in MESH_CASES:
    one = trainer.train_and_evaluate(_finetune_config(base_dir, targets, quantize),
                                     str(tmp_path / "one" / name))
    for key in ("train/loss", "eval/loss", "train/grad_norm"):
      assert on_mesh[name][key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), (name, key)
    # Only adapters have gradients: on the mesh too, they are in the forward pass.
    assert one["train/grad_norm"] > 1e-3
