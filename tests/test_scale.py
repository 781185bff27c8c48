"""Accelerator-scale options: scanned layers, rematerialization, low-precision
parameters and optimizer moments, and the train-step benchmark."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import parallel
from moejax.nn import TransformerLM
from moejax.nn.transformer import convert_layout, scan_layout
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import optim
from moejax.train import resume
from moejax import train as trainer

from test_train import (REPO, SMALL, read_metrics, small_config, train_losses,
                        checkpoint_steps)

MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "group_by": "batch",
       "bias_update_rate": 1e-3, "noise_std": 0.5}
TOKENS = jax.random.randint(jax.random.key(0), (4, 6), 0, 50)
LAYOUTS = [
    {"num_layers": 3, "moe": MOE},
    {"num_layers": 6, "moe_every": 2, "first_dense_layers": 1, "moe": MOE},  # 1 + 2*2 + 1 top
    {"num_layers": 4, "moe_every": 2, "moe": {**MOE, "num_shared_experts": 1}},
    {"num_layers": 3, "moe": {**MOE, "router": "dense", "bias_update_rate": 0.0}},
]


def _pair(layout, **options):
  """An unscanned model and a scanned one holding the same weights."""
  kwargs = dict(vocab_size=50, d_model=16, num_heads=2, **layout)
  unscanned = TransformerLM(rngs=nnx.Rngs(0), **kwargs)
  scanned = TransformerLM(rngs=nnx.Rngs(1), scan_layers=True, **kwargs, **options)
  state = nnx.state(scanned)
  layout_keys = {k: layout[k] for k in ("num_layers", "moe_every", "first_dense_layers")
                 if k in layout}
  nnx.replace_by_pure_dict(state, convert_layout(
      nnx.to_pure_dict(nnx.state(unscanned)), scanned=True,
      router=layout["moe"].get("router", "topk"), **layout_keys))
  nnx.update(scanned, state)
  return unscanned, scanned, layout_keys


def _loss_grads(model):
  def loss(model):
    logits, aux = model(TOKENS, deterministic=False, rng=jax.random.key(3))
    return jnp.mean(jnp.square(logits)) + aux["weighted_loss"], (logits, aux)
  (_, (logits, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, aux, grads


@pytest.mark.parametrize("layout", LAYOUTS, ids=["moe", "pairs", "shared", "dense"])
def test_scanned_layers_compute_the_unscanned_function(layout):
  unscanned, scanned, keys = _pair(layout)
  router = layout["moe"].get("router", "topk")
  logits_a, aux_a, grads_a = _loss_grads(unscanned)
  logits_b, aux_b, grads_b = _loss_grads(scanned)
  np.testing.assert_allclose(logits_b, logits_a, atol=1e-5)
  assert sorted(aux_b["layers"]) == sorted(aux_a["layers"])
  for index in aux_a["layers"]:
    np.testing.assert_allclose(aux_b["layers"][index]["expert_load"],
                               aux_a["layers"][index]["expert_load"], atol=1e-6)
  grads_b = convert_layout(nnx.to_pure_dict(grads_b), scanned=False, router=router, **keys)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5),
               nnx.to_pure_dict(grads_a), grads_b)
  # The balancing bias moves layer by layer the same way in both layouts.
  unscanned.after_step(aux_a)
  scanned.after_step(aux_b)
  back = convert_layout(nnx.to_pure_dict(nnx.state(scanned)), scanned=False, router=router, **keys)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6),
               nnx.to_pure_dict(nnx.state(unscanned)), back)


def _layout_args(layout):
  """convert_layout's layout keywords for a LAYOUTS entry."""
  keys = {k: layout[k] for k in ("num_layers", "moe_every", "first_dense_layers")
          if k in layout}
  return {**keys, "router": layout["moe"].get("router", "topk")}


@pytest.mark.parametrize("layout,param_dtype", [
    (LAYOUTS[0], "float32"), (LAYOUTS[1], "float32"), (LAYOUTS[1], "bfloat16"),
    (LAYOUTS[3], "float32")], ids=["moe", "pairs", "pairs-bfloat16", "dense"])
def test_a_seed_draws_the_same_weights_in_either_layout(layout, param_dtype):
  # Both layouts draw from one rngs stream in the same order (embed, layers
  # 0..L-1, final_norm, output_kernel), the scanned one stacking its units
  # afterwards: bit-identical weights. Untied embeddings put the output
  # kernel last; "pairs" has a dense bottom layer, 2 units and a top layer.
  kwargs = dict(vocab_size=50, d_model=16, num_heads=2, tie_embeddings=False,
                param_dtype=param_dtype, **layout)
  unscanned = nnx.to_pure_dict(nnx.state(TransformerLM(rngs=nnx.Rngs(5), **kwargs)))
  # Built as the trainer builds it: under jax.jit, its structure from eval_shape.
  build = lambda: TransformerLM(rngs=nnx.Rngs(5), scan_layers=True, **kwargs)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))
  scanned = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())))()
  expected = convert_layout(unscanned, scanned=True, **_layout_args(layout))
  assert jax.tree.structure(scanned) == jax.tree.structure(expected)
  assert jax.tree.structure(abstract) == jax.tree.structure(expected)

  def same(want, got, shape):
    assert got.dtype == want.dtype == shape.dtype and got.shape == shape.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  jax.tree.map(same, expected, scanned, abstract)


def _default_config(**overrides):
  """configs/default.py shrunk by test_train.SMALL, then `overrides`."""
  spec = importlib.util.spec_from_file_location("default", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**SMALL, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def test_scan_layers_changes_no_training_number(tmp_path):
  # Same seed, same run, only the layout differs (a dense bottom layer, one
  # (dense, MoE) unit, a dense top layer): the same weights drawn, the same
  # forward and backward, and the optimizer treating every parameter alike
  # (weight decay must see a stacked norm scale [units, D] as a vector).
  # Differently drawn weights moved train/loss by 8.5e-3 at step 1.
  losses = {}
  for scan in (False, True):
    config = _default_config(**{
        "model.scan_layers": scan, "model.num_layers": 4, "model.moe_every": 2,
        "model.first_dense_layers": 1, "train.steps": 5, "train.log_every": 1,
        "train.eval_every": 5, "train.eval_batches": 1, "train.checkpoint_every": 5})
    trainer.train_and_evaluate(config, str(tmp_path / f"scan_{scan}"))
    losses[scan] = train_losses(tmp_path / f"scan_{scan}")
  assert sorted(losses[False]) == sorted(losses[True]) == [1, 2, 3, 4, 5]
  for step, loss in losses[False].items():
    np.testing.assert_allclose(losses[True][step], loss, rtol=1e-5)


def test_scan_layout_stacks_the_repeated_unit():
  # 1 dense bottom layer, units of (dense, MoE), one dense layer left on top.
  assert scan_layout((False, False, True, False, True, False), 2, 1) == (1, 2, 2)
  assert scan_layout((True,) * 5, 1, 0) == (0, 1, 5)
  assert scan_layout((False,) * 3, 2, 1) == (0, 1, 3)  # no MoE: every layer is a unit
  _, scanned, _ = _pair(LAYOUTS[1])
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
  assert shapes["stack"]["blocks"][1]["ffn"]["experts"]["wi"] == (2, 4, 16, 16)
  assert "experts" not in shapes["stack"]["blocks"][0]["ffn"]
  assert sorted(shapes["bottom"]) == [0] and sorted(shapes["top"]) == [0]
  # Stacked parameters get a leading "layers" logical axis (replicated).
  axes = parallel.param_logical_axes(nnx.state(scanned, nnx.Param))
  assert axes["stack"]["blocks"][1]["ffn"]["experts"]["wi"] == (
      "layers", "expert", "embed", "mlp")


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_change_no_number(scan):
  kwargs = dict(vocab_size=50, d_model=16, num_heads=2, num_layers=2, moe=MOE,
                scan_layers=scan)
  results = []
  for remat in ("none", "full", "save_matmuls"):
    model = TransformerLM(rngs=nnx.Rngs(0), remat=remat, **kwargs)
    logits, _, grads = jax.jit(lambda m: _loss_grads(m))(model)
    results.append((logits, nnx.to_pure_dict(grads)))
  for logits, grads in results[1:]:
    np.testing.assert_allclose(logits, results[0][0], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6),
                 results[0][1], grads)


def _grad_memory(remat: str) -> int:
  model = TransformerLM(rngs=nnx.Rngs(0), vocab_size=50, d_model=64, num_heads=2,
                        num_layers=4, moe={**MOE, "expert_hidden": 256}, remat=remat,
                        scan_layers=True)
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((16, 64), jnp.int32)

  def loss(state):
    logits, aux = nnx.merge(graphdef, state)(tokens)
    return jnp.mean(logits) + aux["weighted_loss"]
  analysis = jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis()
  return analysis.temp_size_in_bytes


def test_remat_lowers_the_memory_of_the_backward_pass():
  # Scanned layers: a scan's backward pass must keep what its policy saves per
  # unit. (Unscanned, XLA:CPU's scheduler hoists the recomputation next to
  # the forward pass and the temporaries stay the same: README.)
  none, matmuls, full = (_grad_memory(r) for r in ("none", "save_matmuls", "full"))
  assert full < matmuls < none, (full, matmuls, none)


def test_bfloat16_parameters_keep_routers_and_norms_float32():
  model = TransformerLM(rngs=nnx.Rngs(0), vocab_size=50, d_model=16, num_heads=2,
                        num_layers=2, moe=MOE, scan_layers=True, param_dtype="bfloat16")
  flat = {"/".join(map(str, path)): v[...].dtype
          for path, v in nnx.to_flat_state(nnx.state(model))}
  for name, dtype in flat.items():
    expected = jnp.float32 if ("router" in name or "norm" in name) else jnp.bfloat16
    assert dtype == expected, name
  assert any("router/bias" in name for name in flat)
  logits, aux = model(TOKENS)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  with pytest.raises(ValueError, match="param_dtype"):
    TransformerLM(rngs=nnx.Rngs(0), vocab_size=50, d_model=16, num_heads=2,
                  num_layers=1, moe=MOE, param_dtype="int8")


def test_bfloat16_moments_are_stored_low_and_track_float32():
  config = small_config()
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.ones((8,))}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3.0 * p) + 0.01, params)
  updates = {}
  for dtype in ("float32", "bfloat16"):
    config.train.moment_dtype = dtype
    tx = optim.make_optimizer(config.train)
    state = tx.init(params)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.dtype(dtype) for x in floats)
    p = params
    for _ in range(5):
      update, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, update)
    updates[dtype] = p
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-2, atol=1e-4),
               updates["float32"], updates["bfloat16"])
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         updates["float32"], updates["bfloat16"])
  assert max(jax.tree.leaves(changed)) > 0  # the bfloat16 path really rounds


def test_config_validates_the_new_keys():
  # (scan_layers is a typed bool: ConfigDict and the flag parser refuse others.)
  for key, value, message in (("model.remat", "some", "config.model.remat"),
                              ("model.param_dtype", "int8", "config.model.param_dtype"),
                              ("train.moment_dtype", "fp8", "config.train.moment_dtype")):
    with pytest.raises(ValueError, match=message):
      config_lib.validate_config(small_config(**{key: value}))


def test_scanned_run_resumes_exactly_and_refuses_the_other_layout(tmp_path):
  config = small_config(**{"model.scan_layers": True, "model.remat": "full",
                           "model.moe.bias_update_rate": 1e-3})
  full = tmp_path / "full"
  trainer.train_and_evaluate(config, str(full))
  part = tmp_path / "part"
  trainer.train_and_evaluate(config, str(part))
  for step in checkpoint_steps(part):
    if step > 8:
      subprocess.run(["rm", "-rf", str(part / "checkpoints" / str(step))], check=True)
  # remat is a resumable key: it changes no number.
  trainer.train_and_evaluate(small_config(**{"model.scan_layers": True,
                                             "model.remat": "none",
                                             "model.moe.bias_update_rate": 1e-3}), str(part))
  full_losses, part_losses = train_losses(full), train_losses(part)
  for step in (10, 12):
    np.testing.assert_allclose(part_losses[step], full_losses[step], rtol=1e-6)
  unscanned = small_config(**{"train.steps": 16, "train.resume_with_changes": True,
                              "model.moe.bias_update_rate": 1e-3})
  with pytest.raises(resume.ConfigChangedError, match="holds scanned layers"):
    trainer.train_and_evaluate(unscanned, str(full))
  assert checkpoint_steps(full)[-1] == 12


@pytest.mark.slow
def test_bench_train_prints_the_documented_json(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--config=configs/default.py",
       "--config.model.num_layers=2", "--config.model.d_model=32",
       "--config.model.moe.expert_hidden=32", "--config.train.batch_size=8",
       "--config.train.seq_len=32", "--config.model.scan_layers=true",
       "--steps=2", "--warmup=1", f"--profile={tmp_path / 'trace'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
  record = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("tokens_per_sec", "mfu", "peak_flops", "step_seconds", "compile_seconds",
              "peak_memory_bytes"):
    assert isinstance(record[key], (int, float)) and record[key] > 0, key
  assert record["tokens_per_sec"] == pytest.approx(8 * 32 / record["step_seconds"])
  assert record["mfu"] == pytest.approx(
      record["tokens_per_sec"] * record["train_flops_per_token"] / record["peak_flops"])
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--config=configs/default.py",
       "--config.model.remat=sometimes"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: config.model.remat")
