"""Compiling for hardware this host lacks (moejax.aot), FSDP, and force_balance.

The real TPU compiles need libtpu (in the test install, `.[test]`); the GPU
compile needs the CUDA plugin (`.[aot]`, left out of the test install since it
logs at every jax import): without them those tests skip, naming what to install.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import host_devices  # noqa: E402

from moejax import aot  # noqa: E402
from moejax import parallel  # noqa: E402
from moejax.nn import MoELayer  # noqa: E402

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
try:
  HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
except ModuleNotFoundError:  # no jax_plugins namespace at all
  HAS_CUDA_PLUGIN = False
NO_LIBTPU = "libtpu is not installed (pip install -e '.[aot]' or '.[test]')"
NO_CUDA = ("the CUDA compiler plugin is not installed (pip install -e '.[aot]'; the test "
           "install leaves it out)")


def _aot(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = host_devices.subprocess_env(1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile-only programs are not cached
  return subprocess.run([sys.executable, "-m", "moejax.aot", *args], env=env,
                        cwd=host_devices.REPO, capture_output=True, text=True,
                        timeout=timeout)


# --- topologies, the HLO reader, the roofline ---------------------------------

@pytest.mark.parametrize("name,devices,hosts,platform", [
    ("v4-32", 16, 4, "tpu"), ("v5p-64", 32, 8, "tpu"), ("v5e-16", 16, 4, "tpu"),
    ("v5e-256", 256, 64, "tpu"), ("v6e-8", 8, 1, "tpu"), ("h100-8", 8, 1, "gpu"),
    ("h100-16", 16, 2, "gpu"), ("h200-8", 8, 1, "gpu"), ("b200-8", 8, 1, "gpu"),
])
def test_parse_topology(name, devices, hosts, platform):
  topology = aot.parse_topology(name)
  assert (topology.devices, topology.hosts, topology.platform) == (devices, hosts, platform)


@pytest.mark.parametrize("name,message", [
    ("v4-33", "no v4 slice of that size; valid sizes: v4-8, v4-16, v4-32"),
    ("v5e-12", "no v5e slice of that size"),
    ("h100-12", "whole hosts of 8"),
    ("tpu-8", "unknown topology; valid: TPU: v4-N"),
])
def test_parse_topology_refuses(name, message):
  with pytest.raises(aot.AotError, match=message):
    aot.parse_topology(name)


HLO = """
  %a2a = bf16[8,128,64]{2,1,0} all-to-all(%x), channel_id=1, replica_groups={{0,1}}
  %ar-start = ((f32[1024]{0}), f32[1024]{0}) all-reduce-start(%g), to_apply=%add
  %ar-done = f32[1024]{0} all-reduce-done(%ar-start)
  %r = bf16[256,64]{1,0} ragged-all-to-all(%in, %out, %a, %b, %c, %d)
  %ag = f32[4,16]{1,0} all-gather(%p), dimensions={0}
  %fusion = f32[16]{0} fusion(%ag), kind=kLoop, calls=%all-gather-like
"""


def test_collectives_counts_ops_once_and_sizes_them():
  counts, moved = aot.collectives(HLO)
  assert counts == {"all-to-all": 1, "ragged-all-to-all": 1, "all-reduce": 1,
                    "all-gather": 1, "reduce-scatter": 0, "collective-permute": 0}
  # all-to-all 8*128*64*2 + all-reduce twice 1024*4 + ragged 256*64*2 + gather 4*16*4.
  assert moved == 8 * 128 * 64 * 2 + 2 * 1024 * 4 + 256 * 64 * 2 + 4 * 16 * 4


def test_roofline_is_the_slowest_of_compute_memory_and_communication():
  chip = aot.CHIPS["v5e"]
  estimate = aot.roofline(chip, flops=197e12, bytes_accessed=819e9 * 2,
                          collective_bytes=200e9 * 0.5, cross_host=False)
  assert estimate["compute_seconds"] == pytest.approx(1.0)
  assert estimate["memory_seconds"] == pytest.approx(2.0)
  assert estimate["communication_seconds"] == pytest.approx(0.5)
  assert estimate["estimated_step_seconds"] == pytest.approx(2.0)
  across = aot.roofline(chip, flops=0.0, bytes_accessed=None, collective_bytes=1e9,
                        cross_host=True)
  assert across["estimated_step_seconds"] == pytest.approx(1e9 / chip.network)


# --- real compiles --------------------------------------------------------------

@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_aot_compiles_dropless_for_tpu_with_the_ragged_exchange():
  """The TPU build takes the platform's "auto" choices: the ragged exchange
  (ragged-all-to-all in the program), not this host's padded one."""
  result = _aot("--config=configs/default.py", "--topology=v5e-8", "--config.mesh.expert=4",
                "--config.model.moe.dispatch=dropless", "--config.model.moe.capacity_factor=0")
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  record = json.loads(result.stdout)
  assert record["platform"] == "tpu" and record["devices"] == 8
  assert record["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  assert record["fits"] and 0 < record["peak_memory_bytes"] < record["memory_capacity_bytes"]
  assert record["collectives"]["ragged-all-to-all"] >= 8  # 4 MoE layers, there and back
  assert record["flops_per_device"] > 0 and record["bytes_accessed_per_device"] > 0
  assert 0 < record["estimated_mfu"] < 1


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_aot_reports_a_step_that_does_not_fit_in_one_line():
  result = _aot("--config=configs/default.py", "--topology=v5e-1",
                "--config.model.d_model=4096", "--config.model.num_heads=32",
                "--config.model.moe.expert_hidden=16384", "--config.model.moe.num_experts=16",
                "--config.train.batch_size=8", "--config.model.num_layers=2")
  assert result.returncode == 1, result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: the train step needs ")
  assert "GiB available on v5e-1 (TPU v5e); largest " in lines[0]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason=NO_CUDA)
def test_aot_compiles_for_h100():
  result = _aot("--config=configs/default.py", "--topology=h100-8", "--config.mesh.expert=8")
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout)
  assert record["platform"] == "gpu" and record["device_kind"].startswith("NVIDIA H100")
  assert record["collectives"]["all-to-all"] >= 8 and record["fits"]


@pytest.mark.skipif(HAS_LIBTPU and HAS_CUDA_PLUGIN, reason="both compilers are installed")
def test_aot_without_the_compiler_names_the_install():
  topology = "h100-8" if not HAS_CUDA_PLUGIN else "v5e-8"
  result = _aot("--config=configs/default.py", f"--topology={topology}")
  assert result.returncode == 1
  assert result.stderr.count("\n") == 1 and "pip install -e '.[aot]'" in result.stderr


def test_aot_bad_topology_is_one_line():
  result = _aot("--config=configs/default.py", "--topology=v9-8")
  assert result.returncode == 1
  assert result.stderr.startswith("error: --topology=v9-8: unknown topology")
  assert result.stderr.count("\n") == 1


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_auto_choices_follow_the_mesh_platform():
  """On a mesh of compile-only TPU devices "auto" resolves for TPU (inside
  jit too); without a mesh, for this host."""
  from moejax.dispatch.grouped_matmul import resolve_grouped_matmul
  from moejax.parallel.expert_parallel import resolve_exchange
  devices = aot.topology_devices(aot.parse_topology("v5e-8"))
  mesh = parallel.make_mesh({"data": 8, "expert": 1, "model": 1}, devices=devices)
  assert (parallel.platform(), resolve_exchange("auto"), resolve_grouped_matmul("auto")) == (
      "cpu", "padded", "blocked")
  seen = {}

  def traced(x):
    seen["inside"] = (parallel.platform(), resolve_exchange("auto"))
    return x
  with parallel.activate(mesh):
    assert parallel.platform() == "tpu"
    assert resolve_exchange("auto") == "ragged"
    assert resolve_grouped_matmul("auto") in ("tokamax", "xla")
    jax.jit(traced).lower(jax.ShapeDtypeStruct((8,), jnp.float32))
  assert seen["inside"] == ("tpu", "ragged")


# --- FSDP -----------------------------------------------------------------------

FSDP_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from moejax import data as data_lib, model as model_lib, parallel
from moejax.train import config as config_lib, optim, steps as steps_lib

def run(mesh, **train):
  c = config_lib.default_config()
  c.model.moe.group_by = "batch"
  c.train.batch_size, c.train.seq_len = 16, 32
  c.train.update(train)
  c.mesh.update(mesh)
  m = model_lib.make_mesh(c, jax.devices()[:int(np.prod(list(mesh.values())))])
  tx = optim.make_optimizer(c.train)
  g, abstract_params, abstract_opt = model_lib.abstract_state(c, 512, m, tx)
  ds = data_lib.make_dataset(c.data, seq_len=32, global_batch_size=16, seed=0)
  with parallel.activate(m):
    g, p = model_lib.init_params(c, 512, m)
    o = jax.jit(lambda p: tx.init(steps_lib.trainable(p)))(p)
    step = steps_lib.make_train_step(g, tx, optim.learning_rate_schedule(c.train), 0,
                                     qk_clip_tau=c.train.qk_clip_tau)
    spec = data_lib.batch_spec(c.data, seq_len=32, global_batch_size=16,
                               sharding=parallel.batch_sharding(m))
    compiled = step.lower(abstract_params, abstract_opt, spec,
                          jax.ShapeDtypeStruct((), jnp.int32)).compile()
    for s in range(2):
      b = model_lib.global_batch(ds.train_batch(s), parallel.batch_sharding(m))
      p, o, metrics, _ = compiled(p, o, b, jnp.int32(s))
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(p)]
  return {"loss": float(metrics["train/loss"]),
          "max_logit": float(metrics.get("train/max_attention_logit", 0.0)),
          "params": [x.ravel()[:64].tolist() for x in leaves],
          "paths": [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)],
          "arguments": compiled.memory_analysis().argument_size_in_bytes,
          "fsdp_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(p)
                                if "fsdp" in str(x.sharding.spec)})}

# Muon with QK-clip (train steps 0 and 1 at its full learning rate): Muon's
# Newton-Schulz reshapes kernels split over "fsdp" and "model"
# (`optim._auto_sharded`), and the clip rescales split query/key heads.
MUON = dict(optimizer="muon", qk_clip_tau=1.0, warmup_steps=0)
print(json.dumps({name: run(mesh, **train) for name, mesh, train in [
    ("one", {"data": 1, "fsdp": 1, "expert": 1, "model": 1}, {}),
    ("data8", {"data": 8, "fsdp": 1, "expert": 1, "model": 1}, {}),
    ("fsdp8", {"data": 1, "fsdp": 8, "expert": 1, "model": 1}, {}),
    ("mixed", {"data": 2, "fsdp": 2, "expert": 2, "model": 1}, {}),
    ("muon_one", {"data": 1, "fsdp": 1, "expert": 1, "model": 1}, MUON),
    ("muon_split", {"data": 1, "fsdp": 2, "expert": 2, "model": 2}, MUON)]}))
"""


def test_fsdp_matches_one_device_and_divides_the_state():
  """Two train steps from the abstract state's compiled program: the same
  numbers on 1 device, data 8, fsdp 8 and data 2 x fsdp 2 x expert 2 (1e-5),
  and per-device arguments (parameters, optimizer state, batch) ~1/8 under
  fsdp 8; Muon with QK-clip the same on fsdp 2 x expert 2 x model 2 as on
  1 device."""
  env = host_devices.subprocess_env(8)
  result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900, cwd=host_devices.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads(result.stdout.strip().splitlines()[-1])
  one = runs["one"]
  for name in ("data8", "fsdp8", "mixed"):
    assert runs[name]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for got, want in zip(runs[name]["params"], one["params"], strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  muon = runs["muon_one"]
  assert muon["max_logit"] > 0 and muon["loss"] != pytest.approx(one["loss"], rel=1e-5)
  assert runs["muon_split"]["loss"] == pytest.approx(muon["loss"], rel=1e-5)
  assert runs["muon_split"]["max_logit"] == pytest.approx(muon["max_logit"], rel=1e-5)
  # The router kernel is AdamW's: at step 0 its update is about the sign of
  # each gradient entry, and entries near 0 flip with the summation order of
  # split heads, so it is compared through the loss only.
  for path, got, want in zip(muon["paths"], runs["muon_split"]["params"], muon["params"],
                             strict=True):
    if "router" not in path:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
  assert runs["data8"]["fsdp_specs"] == [] and runs["fsdp8"]["fsdp_specs"]
  assert runs["fsdp8"]["arguments"] < 0.2 * runs["data8"]["arguments"]


def test_param_spec_splits_the_model_width_of_matrices_only():
  mesh = jax.sharding.AbstractMesh((1, 4, 2, 1), parallel.AXES)
  spec = parallel.rules.param_spec
  assert spec(("expert", "embed", "mlp"), (8, 64, 32), mesh) == jax.P("expert", "fsdp", None)
  assert spec(("embed",), (64,), mesh) == jax.P(None)           # a norm scale stays whole
  assert spec(("layers", "embed"), (4, 64), mesh) == jax.P(None, None)  # also stacked
  assert spec(("vocab", "embed"), (100, 6), mesh) == jax.P(None, None)  # 6 % 4: whole
  assert spec(("embed", "router"), (64, 8), mesh) == jax.P("fsdp", None)


# --- force_balance ----------------------------------------------------------------

@pytest.mark.parametrize("router,top_k", [("topk", 2), ("switch", 1), ("sinkhorn", 2)])
def test_force_balance_gives_every_expert_the_same_load(router, top_k):
  layer = MoELayer(d_model=16, num_experts=8, top_k=top_k, expert_hidden=16, router=router,
                   capacity_factor=1.0, force_balance=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 16)) * 3.0  # skewed logits
  _, aux = layer(x, deterministic=False, rng=jax.random.key(2))
  load = np.asarray(aux["expert_load"])
  np.testing.assert_allclose(load, np.full(8, 1 / 8), rtol=1e-6)
  assert float(aux["dropped_fraction"]) == 0.0
  free = MoELayer(d_model=16, num_experts=8, top_k=top_k, expert_hidden=16, router=router,
                  capacity_factor=1.0, rngs=nnx.Rngs(0))
  _, skewed = free(x, deterministic=False, rng=jax.random.key(2))
  if router != "sinkhorn":  # S-BASE balances by itself
    assert np.max(np.asarray(skewed["expert_load"])) > 1.2 / 8  # the router alone is skewed


def test_force_balance_still_trains_the_router():
  layer = MoELayer(d_model=16, num_experts=4, top_k=2, expert_hidden=16, force_balance=True,
                   capacity_factor=1.0, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))

  def loss(state):
    y, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(y ** 2)
  grads = jax.grad(loss)(state)
  assert float(jnp.abs(grads["router"]["kernel"][...]).sum()) > 0


@pytest.mark.parametrize("router", ["expert_choice", "soft_moe", "hash", "dense"])
def test_force_balance_refuses_routers_that_assign_their_own_way(router):
  with pytest.raises(ValueError, match="force_balance applies to the learned token-choice"):
    MoELayer(d_model=16, num_experts=4, top_k=1, expert_hidden=16, router=router,
             force_balance=True, tokens_per_group=8, rngs=nnx.Rngs(0))
