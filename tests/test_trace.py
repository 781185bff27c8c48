"""Routing traces (`moejax.trace`): record, load, replay, analyze, and the
training options that record (`train.trace_every`) and replay
(`train.replay_trace`)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import evaluate as evaluate_lib
from moejax import model as model_lib
from moejax import routing
from moejax import run as run_lib
from moejax import trace as trace_lib
from moejax import train as train_lib
from moejax.nn import MoELayer, TransformerLM
from moejax.routing import scores as scores_lib
from moejax.trace import analysis
from moejax.trace import recorder
from moejax.train import config as config_lib
from moejax.train import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(learning_rate=3e-3):
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=3, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, top_k=2, group_by="batch")
  config.train.update(seq_len=16, batch_size=8, steps=6, warmup_steps=1, log_every=3,
                      eval_every=3, eval_batches=2, checkpoint_every=3, keep_checkpoints=3,
                      trace_every=3, learning_rate=learning_rate)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two runs from one initialization on the same data, with other learning
  rates, each with its own trace recorded."""
  root = tmp_path_factory.mktemp("traces")
  out = {}
  for index, learning_rate in enumerate((3e-3, 3e-2)):
    workdir = str(root / f"run{index}")
    train_lib.train_and_evaluate(_tiny_config(learning_rate), workdir)
    trace = recorder.record(workdir, str(root / f"trace{index}"))
    out[index] = (workdir, trace, run_lib.Run(workdir).metrics())
  return out


def test_a_recorded_trace_has_the_documented_layout(runs):
  workdir, trace, records = runs[0]
  loaded = trace_lib.load(trace.path)
  assert loaded.meta["eval/loss"] == pytest.approx(records[-1]["eval/loss"], abs=1e-6)
  assert loaded.meta["moe_layers"] == [0, 1, 2] and loaded.meta["choices"] == 2
  assert loaded.meta["step"] == 6 and loaded.meta["workdir"] == workdir
  assert loaded.inputs.shape == (16, 16) and loaded.inputs.dtype == np.int32
  np.testing.assert_array_equal(loaded.positions[3], np.arange(16))
  for index, layer in loaded.layers.items():
    assert layer["experts"].shape == layer["weights"].shape == layer["kept"].shape == (16, 16, 2)
    assert ("predicted" in layer) == (index > 0)
    # Two distinct experts per token, and a dropped choice weighs nothing.
    assert np.all(layer["experts"][..., 0] != layer["experts"][..., 1])
    assert np.all(layer["weights"][~layer["kept"]] == 0)
    assert np.all(layer["weights"][layer["kept"]] > 0)
    np.testing.assert_array_equal(layer["experts"], trace.layers[index]["experts"])
  np.testing.assert_array_equal(loaded.targets[:, :-1], loaded.inputs[:, 1:])


def test_training_records_a_trace_every_n_steps(runs):
  workdir, trace, _ = runs[0]
  assert sorted(os.listdir(os.path.join(workdir, "traces"))) == ["step_3", "step_6"]
  at_end = trace_lib.load(os.path.join(workdir, "traces", "step_6"))
  # The same checkpoint on the same batches: the same routing.
  for index, layer in trace.layers.items():
    for name, value in layer.items():
      np.testing.assert_array_equal(at_end.layers[index][name], value, err_msg=name)
  assert at_end.meta["eval/loss"] == pytest.approx(trace.meta["eval/loss"], abs=1e-6)


def test_replaying_its_own_trace_gives_the_logged_eval_loss(runs):
  workdir, trace, records = runs[0]
  result = evaluate_lib.evaluate(workdir, replay=trace.path)
  assert abs(result["eval/loss"] - records[-1]["eval/loss"]) < 1e-6
  assert result["replay"] == trace.path and result["num_batches"] == 2


def test_replaying_another_runs_trace_changes_the_loss(runs):
  workdir, _, records = runs[0]
  other = runs[1][1]
  replayed = evaluate_lib.evaluate(workdir, replay=other.path)["eval/loss"]
  assert abs(replayed - records[-1]["eval/loss"]) > 1e-3


def test_analyze_two_traces_cli_writes_report_and_figures(runs, tmp_path):
  a, b = runs[0][1].path, runs[1][1].path
  out = str(tmp_path / "report")
  proc = subprocess.run([sys.executable, "-m", "moejax.trace", "analyze", a, b,
                         f"--out={out}"], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "tokens changed in any layer" in proc.stdout
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  for name in ("load.png", "concentration.png", "coactivation.png", "per_layer.png"):
    assert os.path.getsize(os.path.join(out, name)) > 1000, name
  layer = report["layers"]["1"]
  assert sum(layer["load"]) == pytest.approx(1.0)
  assert 0 <= layer["predictability"] <= 1 and "predictability" not in report["layers"]["0"]
  # Two runs trained at other rates route the same tokens differently.
  assert report["stability"]["changed_any_layer"] > 0.2
  assert report["stability"]["layers"]["0"]["overlap"] < 1.0


def test_a_trace_is_stable_against_itself(runs):
  trace = runs[0][1]
  report = analysis.analyze(trace, trace)
  assert report["stability"]["changed_any_layer"] == 0.0
  assert all(v["overlap"] == 1.0 for v in report["stability"]["layers"].values())


def test_record_cli_and_its_refusals(runs, tmp_path):
  workdir = runs[0][0]
  out = tmp_path / "cli_trace"
  proc = subprocess.run([sys.executable, "-m", "moejax.trace", "record",
                         f"--workdir={workdir}", f"--out={out}", "--num_batches=1",
                         "--split=train"], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert trace_lib.load(str(out)).meta["split"] == "train"
  again = subprocess.run([sys.executable, "-m", "moejax.trace", "record",
                          f"--workdir={workdir}", f"--out={out}"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines() == [
      f"error: --out={out} exists and is not an empty folder; a trace is written to a "
      f"new folder"]


def test_a_trace_that_does_not_fit_is_one_message(runs, tmp_path):
  workdir, trace, _ = runs[0]
  with pytest.raises(trace_lib.TraceError, match="not a trace folder"):
    trace_lib.load(str(tmp_path))
  config = _tiny_config()
  config.train.seq_len = 8
  with pytest.raises(trace_lib.TraceError, match="seq_len 16 is not the run's 8"):
    trace.replay_batches(config, 256)
  config = _tiny_config()
  config.model.moe.router = "expert_choice"
  with pytest.raises(trace_lib.TraceError, match="cannot replay"):
    trace.replay_batches(config, 256)


def test_fine_tuning_on_a_replayed_trace_trains_on_its_batches_and_routing(runs, tmp_path):
  """config.train.replay_trace: step 1's loss is the initial model's on the
  trace's first batch with the trace's experts, not with its own routing."""
  trace = runs[1][1]
  config = _tiny_config()
  config.train.update(trace_every=0, replay_trace=trace.path, steps=2, log_every=1,
                      eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path / "replayed")
  train_lib.train_and_evaluate(config, workdir)
  logged = run_lib.Run(workdir).metrics()[0]
  assert logged["step"] == 1
  vocab = trace.meta["vocab_size"]
  model = model_lib.build(config, vocab, nnx.Rngs(config.seed))  # the run's initialization
  batch = trace.replay_batches(config, vocab)[0]
  mask = jnp.asarray(batch["weights"] > 0)

  def loss(routes):
    logits, _ = model(jnp.asarray(batch["inputs"]), mask=mask, routes=routes)
    total, count = steps_lib.cross_entropy(logits, jnp.asarray(batch["targets"]),
                                           jnp.asarray(batch["weights"]))
    return float(total / count)
  replayed = loss({i: jnp.asarray(e) for i, e in batch["routes"].items()})
  assert logged["train/loss"] == pytest.approx(replayed, abs=1e-5)
  assert abs(loss(None) - replayed) > 1e-4  # its own routing would have scored otherwise


def test_replayed_routing_is_the_given_experts_with_router_gradients():
  layer = MoELayer(d_model=8, rngs=nnx.Rngs(0), router="topk", num_experts=4, top_k=2,
                   capacity_factor=0.0, dispatch="dropless", expert_hidden=8)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  replay = jax.random.permutation(jax.random.key(1), jnp.broadcast_to(
      jnp.arange(4), (2, 6, 4)), axis=-1, independent=True)[..., :2]
  _, aux = layer(x, replay=replay, trace=True)
  np.testing.assert_array_equal(aux["trace"]["experts"], replay)
  assert np.all(np.asarray(aux["trace"]["weights"]) > 0)
  grads = nnx.grad(lambda m: jnp.sum(m(x, replay=replay)[0] ** 2))(layer)
  assert float(jnp.abs(grads.router.kernel[...]).sum()) > 0
  with pytest.raises(ValueError, match="replay must be"):
    layer(x, replay=replay[..., :1])
  chooser = MoELayer(d_model=8, rngs=nnx.Rngs(0), router="expert_choice", num_experts=4,
                     capacity_factor=1.0, expert_hidden=8)
  with pytest.raises(ValueError, match="cannot replay"):
    chooser(x, replay=replay)


def test_routes_must_cover_every_moe_layer():
  model = TransformerLM(vocab_size=20, num_layers=2, d_model=8, num_heads=2,
                        moe=routing.MoEConfig(num_experts=4, top_k=2, expert_hidden=8,
                                              capacity_factor=0.0, dispatch="dropless"),
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="every MoE layer"):
    model(jnp.zeros((2, 6), jnp.int32), routes={0: jnp.zeros((2, 6, 2), jnp.int32)})


@pytest.mark.parametrize("score_fn,renormalize,bias", [
    ("softmax", False, False), ("softmax", True, False), ("softmax_topk", True, False),
    ("sigmoid", True, True), ("sigmoid", False, False), ("sqrtsoftplus", True, True)])
def test_weights_at_the_routers_own_experts_are_bit_exact(score_fn, renormalize, bias):
  """Replay exactness: the weights computed at given experts equal the
  rule's own when the experts are its own picks."""
  logits = jax.random.normal(jax.random.key(0), (3, 10, 8)) * 2
  options = dict(top_k=3, score_fn=score_fn, renormalize=renormalize,
                 bias=jnp.linspace(-0.5, 0.5, 8) if bias else None, routed_scaling_factor=2.5)
  own = scores_lib.select_experts(logits, **options)
  again = scores_lib.select_experts(logits, experts=own.experts, **options)
  np.testing.assert_array_equal(again.weights, own.weights)
  np.testing.assert_array_equal(again.priority, own.priority)


def test_force_balance_weights_are_the_routers_own_scores_without_renormalization():
  """Sigmoid scores, no renormalization: a forced expert weighs sigmoid(logit)
  times the scaling factor (not the scores normalized over E)."""
  logits = jax.random.normal(jax.random.key(2), (1, 8, 4))
  result = routing.route(logits, router="topk", top_k=2, score_fn="sigmoid",
                         force_balance=True, capacity_factor=0.0, routed_scaling_factor=2.0,
                         renormalize=False)
  experts = (np.arange(8)[:, None] * 2 + np.arange(2)) % 4
  expected = 2.0 * jax.nn.sigmoid(np.take_along_axis(np.asarray(logits[0]), experts, -1))
  np.testing.assert_allclose(np.asarray(result.weight).reshape(8, 2), expected, rtol=1e-6)


def test_token_choices_of_expert_choice_rank_every_expert():
  logits = jax.random.normal(jax.random.key(3), (1, 8, 4))
  result = routing.route(logits, router="expert_choice", capacity_factor=1.0)
  experts, weights, kept = result.token_choices()
  assert experts.shape == (1, 8, 4)
  dense = np.asarray(result.combine_weights())
  np.testing.assert_allclose(np.take_along_axis(dense, np.asarray(experts), -1), weights)
  assert np.all(np.diff(np.asarray(weights), axis=-1) <= 0)
  np.testing.assert_array_equal(kept, weights > 0)


def test_concentration_recovers_a_zipf_exponent():
  load = np.arange(1, 17, dtype=np.float64) ** -1.3
  result = analysis.concentration(load / load.sum())
  assert result["zipf_alpha"] == pytest.approx(1.3) and result["zipf_r2"] == pytest.approx(1.0)
  assert result["top_coverage"]["1"] == pytest.approx(1 / np.sum(np.arange(1, 17) ** -1.3))
  uniform = analysis.concentration(np.full(8, 1 / 8))
  assert uniform["zipf_alpha"] == pytest.approx(0.0, abs=1e-12)
  assert uniform["top_coverage"] == {"1": 0.125, "2": 0.25, "4": 0.5}


def test_specialization_statistics_on_known_mappings():
  ids = np.repeat(np.arange(8), 50)
  # experts a function of the id: I = H(expert) = 2 bits (4 experts, uniform).
  assert analysis.mutual_information_bits(ids, ids % 4) == pytest.approx(2.0)
  assert analysis.id_purity(ids, ids % 4) == 1.0
  # one expert for everything: no information.
  assert analysis.mutual_information_bits(ids, np.zeros_like(ids)) == 0.0
  # half of each id's tokens on one expert, half on another.
  experts = np.where(np.arange(400) % 2 == 0, ids % 4, (ids + 1) % 4)
  assert analysis.id_purity(ids, experts) == 0.5


def test_coactivation_lift_of_pairs_without_preference_is_the_random_baseline():
  rng = np.random.default_rng(0)
  picks = np.argsort(rng.random((20000, 4)), axis=1)[:, :2]  # a random 2-subset of 4
  chosen = np.zeros((20000, 4), bool)
  chosen[np.arange(20000)[:, None], picks] = True
  lift = analysis.coactivation_lift(chosen)
  assert analysis.coactivation_random(chosen) == pytest.approx(2 / 3)  # (K-1)E/(K(E-1))
  np.testing.assert_allclose(lift[~np.eye(4, dtype=bool)], 2 / 3, atol=0.03)
  # Experts 0 and 1 always together, never with 2 and 3.
  pairs = np.array([[1, 1, 0, 0], [0, 0, 1, 1]] * 10, bool)
  lift = analysis.coactivation_lift(pairs)
  assert lift[0, 1] == pytest.approx(2.0) and lift[0, 2] == 0.0 and lift[1, 1] == 0.0


def test_a_bfloat16_trace_of_the_same_checkpoint_routes_almost_the_same(runs):
  workdir, trace, _ = runs[0]
  half = recorder.record(workdir, None, dtype="bfloat16")
  assert half.meta["dtype"] == "bfloat16" and trace.meta["dtype"] == "float32"
  assert abs(half.meta["eval/loss"] - trace.meta["eval/loss"]) < 0.02
  changed = analysis.stability(trace, half)["changed_any_layer"]
  assert 0.0 <= changed < 0.5
  replayed = evaluate_lib.evaluate(workdir, replay=trace.path, dtype="bfloat16")
  assert replayed["dtype"] == "bfloat16"
  assert abs(replayed["eval/loss"] - trace.meta["eval/loss"]) < 0.02
