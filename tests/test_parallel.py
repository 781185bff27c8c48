"""moejax.parallel: mesh config validation, sharding rules, expert parallelism.

The multi-device checks (MoELayer and TransformerLM on 8 host devices against
one device) run once, in a subprocess (tests/parallel_worker.py), because the
device count is fixed when jax starts; each case is reported as its own test.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.nn import MoELayer, NonCausalRoutingWarning, TransformerLM

sys.path.insert(0, os.path.dirname(__file__))
import host_devices  # noqa: E402
import parallel_worker  # noqa: E402  (the case names; it runs in the subprocess)

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
MESH_2x4x2 = AbstractMesh((2, 1, 4, 2), parallel.AXES)  # data, fsdp, expert, model


def mesh(data=-1, expert=1, model=1):
  return {"data": data, "expert": expert, "model": model}


# --- validate_mesh_config / make_mesh / activate ------------------------------

@pytest.mark.parametrize("config,devices,expected", [
    (mesh(-1, 1, 1), 8, (8, 1, 1)),
    (mesh(2, -1, 1), 8, (2, 4, 1)),
    (mesh(2, 2, -1), 8, (2, 2, 2)),
    (mesh(1, 8, 1), 8, (1, 8, 1)),
    (mesh(-1, 1, 1), 1, (1, 1, 1)),
])
def test_validate_mesh_config_resolves(config, devices, expected):
  sizes = parallel.validate_mesh_config(config, num_devices=devices, num_experts=8,
                                        num_heads=4, expert_hidden=16)
  assert sizes == {"fsdp": 1, **dict(zip(("data", "expert", "model"), expected))}


@pytest.mark.parametrize("config,kwargs,message", [
    (mesh(2, 4, 2), {}, "config.mesh: data*expert*model = 2*4*2 = 16 does not match "
                        "the 8 devices"),
    (mesh(-1, 3, 1), {}, "config.mesh: the 8 devices are not divisible by expert*model "
                         "= 3*1 = 3"),
    (mesh(-1, -1, 1), {}, "at most one axis may be -1"),
    (mesh(0, 1, 1), {}, "config.mesh.data must be -1 (fill) or a positive integer"),
    (mesh(2, 4, 1), {"num_experts": 6},
     "config.model.moe.num_experts (x granularity) = 6 is not divisible by "
     "config.mesh.expert = 4"),
    (mesh(2, 2, 2), {"num_heads": 3},
     "config.model.num_heads = 3 is not divisible by config.mesh.model = 2"),
    (mesh(2, 2, 2), {"expert_hidden": 5},
     "config.model.moe.expert_hidden (/ granularity) = 5 is not divisible by "
     "config.mesh.model = 2"),
    (dict(mesh(), pipeline=2), {}, "unknown key(s) ['pipeline']"),
])
def test_validate_mesh_config_errors(config, kwargs, message):
  with pytest.raises(ValueError) as error:
    parallel.validate_mesh_config(config, num_devices=8, **kwargs)
  assert message in str(error.value)


def _lm1b():
  spec = importlib.util.spec_from_file_location(
      "lm1b", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "lm1b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("sizes,batch_size,group_by,message", [
    # lm1b: groups of 1024 tokens = two sequences of 512.
    ((4, 2), 16, "sequence", None),    # 2 rows (one group) per batch shard
    ((8, 1), 512, "sequence", None),
    ((8, 1), 8, "sequence", "config.model.moe.group_size=1024 (group_by='sequence') makes "
                            "4 routing groups of config.train.batch_size=8 x "
                            "config.train.seq_len=512 tokens, which do not split over "
                            "config.mesh.data * config.mesh.expert = 8 devices"),
    ((4, 2), 2048, "batch", None),     # 512 positions x 2 groups of 1024
])
def test_check_routing_groups(sizes, batch_size, group_by, message):
  config = _lm1b()
  config.train.batch_size = batch_size
  config.model.moe.group_by = group_by
  sizes = {"data": sizes[0], "fsdp": 1, "expert": sizes[1], "model": 1}
  if message is None:
    parallel.check_routing_groups(sizes, config.model.moe, config.train)
    return
  with pytest.raises(ValueError) as error:
    parallel.check_routing_groups(sizes, config.model.moe, config.train)
  assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("axis_types,expected", [
    ("auto", jax.sharding.AxisType.Auto), ("explicit", jax.sharding.AxisType.Explicit)])
def test_make_mesh_and_activate(axis_types, expected):
  mesh_ = parallel.make_mesh(mesh(), axis_types=axis_types)
  assert mesh_.axis_names == parallel.AXES
  assert dict(mesh_.shape) == {"data": 1, "fsdp": 1, "expert": 1, "model": 1}
  assert set(mesh_.axis_types) == {expected}
  assert parallel.current_mesh() is None
  with parallel.activate(mesh_):
    assert parallel.current_mesh().axis_names == parallel.AXES
    # A mesh of one device does not split the MoE layer.
    assert parallel.expert_parallel.parallel_mesh() is None
  assert parallel.current_mesh() is None
  with pytest.raises(ValueError, match="axis_types"):
    parallel.make_mesh(mesh(), axis_types="manual")


def test_layer_under_one_device_mesh_matches_no_mesh():
  layer = MoELayer(d_model=8, num_experts=4, top_k=2, expert_hidden=8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  expected = jax.jit(lambda x: layer(x))(x)
  with parallel.activate(parallel.make_mesh(mesh())):
    got = jax.jit(lambda x: layer(x))(x)  # traced anew: the mesh is part of the trace
  chex_tree_close(got, expected)


def chex_tree_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


# --- sharding rules -----------------------------------------------------------

def test_logical_rules_map_to_mesh_axes():
  assert parallel.LOGICAL_RULES["batch"] == ("data", "fsdp", "expert")
  spec = lambda *axes: parallel.logical_to_spec(axes, MESH_2x4x2)
  assert spec("expert", "embed", "mlp") == P("expert", None, "model")
  assert spec("embed", "qkv", "heads", "head_dim") == P(None, None, "model", None)
  assert spec("vocab", "embed") == P(None, None)
  assert spec("batch") == P(("data", "expert"))
  # Axes of size 1 are dropped: splitting over one device is replicating.
  one_model = AbstractMesh((2, 1, 4, 1), parallel.AXES)
  assert parallel.logical_to_spec(("expert", "embed", "mlp"), one_model) == P(
      "expert", None, None)
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    spec("hidden")
  with pytest.raises(ValueError, match="twice"):
    spec("batch", "expert")


def _lm(**kwargs):
  moe = dict(num_experts=4, top_k=2, expert_hidden=8)
  moe.update(kwargs.pop("moe", {}))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NonCausalRoutingWarning)
    return nnx.eval_shape(lambda: TransformerLM(
        vocab_size=32, num_layers=3, d_model=16, num_heads=2, moe=moe,
        rngs=nnx.Rngs(0), **kwargs))


LM_VARIANTS = {
    "gelu_tied": {},
    "swiglu_shared_untied": dict(moe=dict(activation="swiglu", num_shared_experts=1),
                                 tie_embeddings=False),
    "dense_layers": dict(moe_every=2, first_dense_layers=1),
    "all_dense_swiglu": dict(moe=dict(router="dense", activation="swiglu")),
}


@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_param_logical_axes_cover_transformer(variant):
  _, params = nnx.split(_lm(**LM_VARIANTS[variant]))
  axes = parallel.param_logical_axes(params)
  is_axes = lambda a: isinstance(a, tuple)
  flat_axes = {jax.tree_util.keystr(path): a for path, a in
               jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_axes)}
  flat_params = {jax.tree_util.keystr(path): v for path, v in
                 jax.tree_util.tree_leaves_with_path(
                     params, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert flat_axes.keys() == flat_params.keys()
  for name, logical in flat_axes.items():
    assert len(logical) == flat_params[name].ndim, name
    assert all(a in parallel.LOGICAL_RULES for a in logical), name
  by_suffix = lambda suffix: {a for n, a in flat_axes.items() if n.endswith(suffix)}
  assert by_suffix("['attention']['qkv']") == {("embed", "qkv", "heads", "head_dim")}
  assert by_suffix("['attention']['out']") == {("heads", "head_dim", "embed")}
  assert by_suffix("['embed']['embedding']") == {("vocab", "embed")}
  if variant != "all_dense_swiglu":
    assert by_suffix("['experts']['wo']") == {("expert", "mlp", "embed")}
    assert by_suffix("['router']['kernel']") == {("embed", "router")}
  assert by_suffix("['ffn']['wo']") == (
      set() if variant in ("gelu_tied", "swiglu_shared_untied") else {("mlp", "embed")})
  if variant == "swiglu_shared_untied":
    assert by_suffix("['experts']['wi_gate']") == {("expert", "embed", "mlp")}
    assert by_suffix("['shared']['wi_up']") == {("embed", "mlp")}
    assert by_suffix("['output_kernel']") == {("embed", "vocab")}


def test_param_shardings_follow_rules():
  _, params = nnx.split(_lm(moe=dict(num_shared_experts=1)))
  mesh_ = parallel.make_mesh(mesh())
  shardings = parallel.param_shardings(params, mesh_)
  leaves = jax.tree.leaves(shardings)
  assert leaves and all(isinstance(s, NamedSharding) and s.mesh == mesh_ for s in leaves)
  concrete = nnx.split(MoELayer(d_model=8, num_experts=4, top_k=1, expert_hidden=8,
                                num_shared_experts=1, rngs=nnx.Rngs(0)))[1]
  placed = parallel.shard_like(concrete, parallel.param_shardings(concrete, mesh_))
  for before, after in zip(jax.tree.leaves(concrete), jax.tree.leaves(placed), strict=True):
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  assert parallel.batch_sharding(mesh_).spec == P(None)  # one device: replicated


def test_param_logical_axes_rejects_unknown_and_wrong_rank():
  params = {"layers": {"0": {"ffn": {"experts": {"wi": jnp.zeros((4, 8, 16))}},
                             "adapter": {"kernel": jnp.zeros((8, 8))}}}}
  with pytest.raises(ValueError, match="no sharding rule for parameter "
                                       "'layers/0/adapter/kernel'"):
    parallel.param_logical_axes(params)
  with pytest.raises(ValueError, match="has shape \\(8, 16\\) but its rule"):
    parallel.param_logical_axes({"experts": {"wi": jnp.zeros((8, 16))}})


# --- expert parallelism on 8 host devices (one subprocess) --------------------

@pytest.fixture(scope="module")
def worker_results():
  # One subprocess for the module (pytest.ini's --dist=loadfile keeps the
  # module on one xdist worker, so it runs once per session).
  env = host_devices.subprocess_env(8)
  proc = subprocess.run([sys.executable, WORKER], capture_output=True, text=True,
                        env=env, timeout=900, cwd=host_devices.REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_all_to_all(name: str) -> int:
  """all-to-all ops in a forward+backward step: one out and one back per MoE
  layer, each in the forward and the backward pass; the dropless exchange
  also sends the row counts (integers, no backward); the ragged exchange sends
  only counts and offsets by all_to_all (its rows move by ragged_all_to_all,
  here emulated by all_gather)."""
  mesh_name = name.split("/")[1]
  if mesh_name.split("x")[1] == "1":
    return 0  # no expert axis: pure data (and model) parallelism
  if "ragged_reference" in name:
    return 2
  return 5 if "dropless" in name else 4


@pytest.mark.slow
@pytest.mark.parametrize("case", parallel_worker.case_names())
def test_multi_device(worker_results, case):
  result = worker_results[case]
  assert result["ok"], json.dumps(result, indent=1)
  if case.startswith("layer/") and "batch" not in case:
    # group_by="batch" adds GSPMD transposes of the batch on top.
    assert result["num_all_to_all"] == _expected_all_to_all(case), result
  if "/topk/" in case or "/switch/" in case:
    assert result["aux"]["dropped_fraction"] > 0, result  # capacity binds
  if case.startswith("lm/"):
    assert result["num_all_to_all"] == 4, result  # one MoE layer
    assert result["gathered_expert_kernels"] == [], result
    assert result["gathered_attention_kernels"] == [], result  # heads stay split
