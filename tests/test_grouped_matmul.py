"""Grouped matmul implementations ("xla", "tokamax", "blocked"): the same values
and gradients as a per-group loop; the config option, its validation, and what
"auto" picks on each backend.

tokamax is optional (`pip install tokamax`, in the "test" extra): its cases skip
when it is not installed. On CPU `tokamax.ragged_dot` runs its XLA kernel (its
Pallas GPU/TPU kernels raise NotImplementedError there and tokamax falls back).
"""

import functools
import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import dispatch
from moejax import routing as routing_lib
from moejax.nn import MoELayer
from moejax.nn import experts as experts_lib
from moejax.parallel import expert_parallel
from moejax.routing import config as config_lib

# The module (`moejax.dispatch.grouped_matmul` the attribute is the function).
gm_lib = importlib.import_module("moejax.dispatch.grouped_matmul")
TOKAMAX = config_lib.tokamax_installed()
needs_tokamax = pytest.mark.skipif(not TOKAMAX,
                                   reason="tokamax is not installed (pip install tokamax)")
IMPLEMENTATIONS = [pytest.param(name, marks=needs_tokamax if name == "tokamax" else ())
                   for name in ("xla", "tokamax", "blocked")]
BLOCK = 8


def _problem():
  """x [R, D], w [E, D, H], group sizes (multiples of BLOCK, one empty group,
  rows past the last group) and a cotangent."""
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 5, 1]) * BLOCK
  rows = int(sizes.sum()) + 2 * BLOCK
  x = rng.normal(size=(rows, 6)).astype(np.float32)
  w = rng.normal(size=(4, 6, 5)).astype(np.float32)
  cotangent = rng.normal(size=(rows, 5)).astype(np.float32)
  return x, w, sizes, cotangent


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_per_group_loop(implementation):
  x, w, sizes, cotangent = _problem()
  used = int(sizes.sum())

  @jax.jit
  def value_and_grads(x, w, sizes):
    def loss(x, w):
      y = gm_lib.grouped_matmul(x, w, sizes, BLOCK, implementation)
      return jnp.sum(y[:used] * cotangent[:used]), y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)

  (_, y), (d_x, d_w) = value_and_grads(jnp.asarray(x), jnp.asarray(w),
                                       jnp.asarray(sizes, jnp.int32))
  # The reference: one float64 matmul per group.
  x64, w64, cot64 = (a.astype(np.float64) for a in (x, w, cotangent))
  start = 0
  for group, size in enumerate(sizes):
    part = slice(start, start + size)
    np.testing.assert_allclose(y[part], x64[part] @ w64[group], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x[part], cot64[part] @ w64[group].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_w[group], x64[part].T @ cot64[part], rtol=1e-5, atol=1e-5)
    start += size
  np.testing.assert_array_equal(d_w[1], 0.0)  # the empty group gets no gradient


@needs_tokamax
def test_tokamax_implementation_calls_tokamax(monkeypatch):
  tokamax = gm_lib.tokamax_module()
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return tokamax_ragged_dot(*args, **kwargs)

  tokamax_ragged_dot = tokamax.ragged_dot
  monkeypatch.setattr(tokamax, "ragged_dot", spy)
  x, w, sizes, _ = _problem()
  gm_lib.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), BLOCK, "tokamax")
  assert len(calls) == 1
  gm_lib.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), BLOCK, "xla")
  assert len(calls) == 1  # "xla" is jax.lax.ragged_dot, not tokamax


@needs_tokamax
def test_tokamax_runs_under_a_foreign_command_line():
  # tokamax 0.0.12 parses sys.argv with absl when no absl app has: a notebook
  # kernel's or pytest's arguments must not reach it.
  code = ("import sys; sys.argv = ['kernel', '-f', '/tmp/kernel.json', '-q']\n"
          "import jax.numpy as jnp\n"
          "from moejax.dispatch import grouped_matmul\n"
          "y = grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([1, 3]), 1,"
          " 'tokamax')\n"
          "assert float(y.sum()) == 24.0, y\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def _layer(grouped_matmul, **options):
  return MoELayer(d_model=16, num_experts=8, top_k=2, expert_hidden=32, capacity_factor=0.0,
                  dispatch="dropless", grouped_matmul=grouped_matmul, rngs=nnx.Rngs(0),
                  **options)


def _layer_value_and_grads(layer):
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (4, 32, 16))
  cotangent = jax.random.normal(jax.random.key(2), (4, 32, 16))

  @jax.jit
  def run(params, x):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y * cotangent) + aux["weighted_loss"], y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  return run(params, x)


@functools.cache
def _blocked_layer_value_and_grads(activation):
  return _layer_value_and_grads(_layer("blocked", activation=activation))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + ["auto"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_same_numbers_with_each_grouped_matmul(implementation, activation):
  (_, y), grads = _layer_value_and_grads(_layer(implementation, activation=activation))
  (_, y_ref), grads_ref = _blocked_layer_value_and_grads(activation)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    # Relative to the gradient's scale (the expert kernels' grads are sums over rows).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("name,expected_implementation,expected_block", [
    ("auto", "blocked", BLOCK), ("blocked", "blocked", BLOCK), ("xla", "xla", 1),
    pytest.param("tokamax", "tokamax", 1, marks=needs_tokamax),
])
def test_moe_layer_threads_grouped_matmul_to_the_experts(monkeypatch, name,
                                                          expected_implementation,
                                                          expected_block):
  calls = []

  def spy(x, w, group_sizes, block_size=1, implementation=None):
    calls.append((implementation, block_size))
    return gm_lib.grouped_matmul(x, w, group_sizes, block_size, implementation)

  monkeypatch.setattr(experts_lib, "grouped_matmul", spy)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  # 4 * 32 tokens * k = 2 over E = 8: 32 rows per expert on average; the
  # blocked loop's block is a quarter of that, 8.
  _layer_value_and_grads(_layer(name))
  assert set(calls) == {(expected_implementation, expected_block)}


@pytest.mark.parametrize("backend,installed,expected", [
    ("cpu", True, "blocked"), ("cpu", False, "blocked"),
    ("gpu", True, "tokamax"), ("gpu", False, "xla"),
    ("tpu", True, "tokamax"), ("tpu", False, "xla"),
])
def test_auto_per_backend(monkeypatch, backend, installed, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(gm_lib, "_import_tokamax",
                      lambda: object() if installed else ImportError("no tokamax"))
  assert gm_lib.resolve_grouped_matmul("auto") == expected
  for name in ("xla", "blocked"):  # explicit names are kept on every backend
    assert gm_lib.resolve_grouped_matmul(name) == name


class _RecordingExperts:
  """Records what the dispatcher asks of the grouped matmul; returns the rows."""

  def __init__(self):
    self.calls = []

  def grouped(self, rows, group_sizes, block_size, implementation=None):
    self.calls.append((implementation, block_size))
    return rows


@pytest.mark.parametrize("backend,installed,expected", [
    ("cpu", True, ("blocked", 64)), ("gpu", True, ("tokamax", 1)),
    ("gpu", False, ("xla", 1)), ("tpu", True, ("tokamax", 1)),
])
def test_dropless_dispatch_auto_block_size_and_implementation(monkeypatch, backend,
                                                              installed, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(gm_lib, "_import_tokamax",
                      lambda: object() if installed else ImportError("no tokamax"))
  logits = jax.random.normal(jax.random.key(0), (2, 256, 4))
  routing = routing_lib.route(logits, router="topk", top_k=2, capacity_factor=0.0)
  experts = _RecordingExperts()
  x = jax.random.normal(jax.random.key(1), (2, 256, 8))
  dispatch.dropless_dispatch(x, routing, experts)
  # Blocked: 2 * 256 * 2 = 1024 assignments over E = 4 experts, 256 rows each
  # on average; the block is a quarter of that, 64. The ragged kernels: 1.
  assert experts.calls == [expected]


def test_explicit_block_size_with_auto_keeps_its_meaning():
  # block_size=1 has always meant jax.lax.ragged_dot, larger sizes the blocked loop.
  logits = jax.random.normal(jax.random.key(0), (1, 16, 4))
  routing = routing_lib.route(logits, router="topk", top_k=2, capacity_factor=0.0)
  x = jnp.ones((1, 16, 8))
  for block_size, expected in ((1, "xla"), (4, "blocked")):
    experts = _RecordingExperts()
    dispatch.dropless_dispatch(x, routing, experts, block_size=block_size)
    assert experts.calls == [(expected, block_size)]


def test_sharded_experts_pass_the_implementation_on():
  # The expert-parallel wrapper (one shard, no mesh axes) hands the grouped
  # matmul's implementation and block size to the local experts.
  calls = []

  class Local:
    def grouped(self, rows, group_sizes, block_size, implementation=None, hidden_fn=None):
      calls.append((implementation, block_size))
      return rows

  for exchange in ("padded", "ragged"):
    sharded = expert_parallel.ShardedExperts(Local(), expert_axes=(), model_axes=(),
                                             num_shards=1, exchange=exchange)
    rows = jnp.arange(32.0).reshape(16, 2)
    out = sharded.grouped(rows, jnp.array([8, 0, 8], jnp.int32), 8, "xla")
    np.testing.assert_array_equal(out, rows)
  assert calls == [("xla", 8), ("xla", 8)]


# --- the config option ------------------------------------------------------

def test_config_default_and_key():
  assert routing_lib.MoEConfig().grouped_matmul == "auto"
  assert config_lib.GROUPED_MATMULS == ("auto", "xla", "tokamax", "blocked")


@pytest.mark.parametrize("build", [
    lambda: routing_lib.validate(routing_lib.MoEConfig(grouped_matmul="triton")),
    lambda: _layer("triton"),
])
def test_unknown_grouped_matmul_names_the_option_and_values(build):
  with pytest.raises(ValueError) as info:
    build()
  message = str(info.value)
  assert message == ("unknown grouped_matmul 'triton'; valid values: "
                     "['auto', 'xla', 'tokamax', 'blocked']")


def test_tokamax_not_installed_is_a_clear_config_error(monkeypatch):
  monkeypatch.setattr(config_lib, "tokamax_installed", lambda: False)
  with pytest.raises(ValueError) as info:
    _layer("tokamax")
  message = str(info.value)
  assert "grouped_matmul='tokamax'" in message and "pip install tokamax" in message
  assert "\n" not in message
  _layer("auto")  # auto needs no tokamax
  with pytest.raises(ValueError, match="pip install tokamax"):
    gm_lib.grouped_matmul(jnp.ones((8, 2)), jnp.ones((1, 2, 2)), jnp.array([8]), 1,
                          "tokamax")


def test_tokamax_that_fails_to_import_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(config_lib, "tokamax_installed", lambda: True)
  monkeypatch.setattr(gm_lib, "_import_tokamax",
                      lambda: ImportError("jaxlib version mismatch"))
  with pytest.raises(ImportError, match="pip install tokamax.*jaxlib version mismatch"):
    gm_lib.grouped_matmul(jnp.ones((8, 2)), jnp.ones((1, 2, 2)), jnp.array([8]), 1,
                          "tokamax")


def test_config_key_in_the_run_config():
  from moejax.train import config as train_config  # pylint: disable=import-outside-toplevel
  assert train_config.moe_config().grouped_matmul == "auto"
