"""Dispatchers: same outputs and gradients for the same routing, vs a dense reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dispatch
from moejax import routing as routing_lib
from moejax.dispatch import grouped_matmul


class _LinearExperts:
  """Expert e computes tanh(x @ w[e]); batched and grouped forms."""

  def __init__(self, w):
    self.w = w

  def __call__(self, buffer):
    return jnp.tanh(jnp.einsum("end,edh->enh", buffer, self.w))

  def grouped(self, rows, group_sizes, block_size, implementation=None):
    return jnp.tanh(grouped_matmul(rows, self.w, group_sizes, block_size, implementation))


def _dense_reference(x, combine_weights, w):
  """y[g, s] = sum_e cw[g, s, e] * tanh(x[g, s] @ w[e]), computed for every pair."""
  all_outputs = jnp.tanh(jnp.einsum("gsd,edh->gseh", x, w))
  return jnp.einsum("gse,gseh->gsh", combine_weights, all_outputs)


def _problem(seed, *, groups=3, tokens=16, experts=4, d_model=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (groups, tokens, d_model))
  w = jax.random.normal(keys[1], (experts, d_model, d_model)) / np.sqrt(d_model)
  logits = 2.0 * jax.random.normal(keys[2], (groups, tokens, experts))
  return x, w, logits


ROUTE_CASES = [
    dict(router="topk", top_k=2, capacity_factor=1.0),     # some drops
    dict(router="topk", top_k=2, capacity_factor=0.5),     # many drops
    dict(router="switch", top_k=1, capacity_factor=1.25),
    dict(router="topk", top_k=3, capacity_factor=0.0),     # dropless
    dict(router="topk", top_k=2, capacity_factor=1.0, batch_prioritized=True),
    dict(router="expert_choice", capacity_factor=1.5),     # expert-major layout
]
DISPATCH_FNS = {
    "gather": dispatch.gather_dispatch,
    "einsum": dispatch.einsum_dispatch,
    "dropless_blocked": functools.partial(dispatch.dropless_dispatch, block_size=4),
    "dropless_ragged_dot": functools.partial(dispatch.dropless_dispatch, block_size=1),
    # grouped_matmul="auto" is the blocked loop on CPU, at the default block size.
    "dropless_auto": dispatch.dropless_dispatch,
    "dropless_xla": functools.partial(dispatch.dropless_dispatch, grouped_matmul="xla"),
}
if routing_lib.config.tokamax_installed():  # tests/test_grouped_matmul.py reports a skip
  DISPATCH_FNS["dropless_tokamax"] = functools.partial(dispatch.dropless_dispatch,
                                                       grouped_matmul="tokamax")


@pytest.mark.parametrize("route_kwargs", ROUTE_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("name", sorted(DISPATCH_FNS))
def test_dispatcher_matches_dense_reference(name, route_kwargs):
  x, w, logits = _problem(0)

  def loss(x, w, logits, dispatcher):
    routing = routing_lib.route(logits, **route_kwargs)
    y = dispatcher(x, routing, _LinearExperts(w))
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

  def reference_loss(x, w, logits):
    routing = routing_lib.route(logits, **route_kwargs)
    y = _dense_reference(x, routing.combine_weights(), w)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

  (value, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, w, logits, DISPATCH_FNS[name])
  (ref_value, ref_y), ref_grads = jax.value_and_grad(
      reference_loss, argnums=(0, 1, 2), has_aux=True)(x, w, logits)
  chex.assert_trees_all_close(y, ref_y, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(value, ref_value, atol=1e-4, rtol=1e-5)
  # Gradients w.r.t. tokens, expert kernels and router logits all match.
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-4, rtol=1e-4)
  # The routing drops or skips something in most cases: the reference is not trivial.
  assert float(jnp.max(jnp.abs(grads[2]))) > 0


def test_dropped_token_gets_zero_output():
  # Three tokens all want expert 0 (capacity 1 with capacity_factor 1, S=3, E=3, k=1):
  # only token 0 is served; tokens 1 and 2 get zero output (the residual carries them).
  logits = jnp.array([[[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
  routing = routing_lib.route(logits, router="switch", capacity_factor=1.0)
  assert routing.capacity == 1
  x = jnp.ones((1, 3, 2))
  w = jnp.stack([jnp.eye(2)] * 3)
  for name, fn in DISPATCH_FNS.items():
    y = fn(x, routing, _LinearExperts(w))
    p0 = float(jax.nn.softmax(logits[0, 0])[0])
    np.testing.assert_allclose(y[0, 0], p0 * np.tanh(1.0) * np.ones(2), rtol=1e-6,
                               err_msg=name)
    np.testing.assert_array_equal(y[0, 1:], 0.0, err_msg=name)


def test_dispatchers_jit_and_agree_in_bfloat16():
  x, w, logits = _problem(1, groups=2, tokens=32, experts=8, d_model=16)
  routing = routing_lib.route(logits, router="topk", top_k=2, capacity_factor=1.25)
  experts = _LinearExperts(w.astype(jnp.bfloat16))
  outs = {}
  for name, fn in DISPATCH_FNS.items():
    run = jax.jit(lambda x, routing, fn=fn: fn(x, routing, experts))
    outs[name] = run(x.astype(jnp.bfloat16), routing)
    assert outs[name].dtype == jnp.bfloat16
  for name, out in outs.items():
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(outs["gather"], np.float32), atol=3e-2,
                               err_msg=name)


def test_gather_buffer_size_does_not_grow_with_experts():
  # Buffer rows are E * G * C ~= capacity_factor * k * G * S whatever E is.
  for num_experts in (8, 64, 256):
    logits = jnp.zeros((2, 512, num_experts))
    routing = routing_lib.route(logits, router="topk", top_k=2, capacity_factor=1.25)
    rows = num_experts * 2 * routing.capacity
    assert rows <= 1.25 * 2 * 2 * 512 + 2 * num_experts, (num_experts, rows)


@pytest.mark.parametrize("block_size", [1, 2, 8])
def test_grouped_matmul_matches_per_group_loop(block_size):
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 5, 1]) * block_size  # multiples of the block, one empty
  rows = int(sizes.sum()) + 2 * block_size     # trailing rows belong to no group
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
  used = int(sizes.sum())

  def loss(x, w):
    y = grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), block_size)
    return jnp.sum(y[:used] * cotangent[:used]), y

  (_, y), (d_x, d_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
  start = 0
  for group, size in enumerate(sizes):
    part = slice(start, start + size)
    np.testing.assert_allclose(y[part], x[part] @ w[group], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x[part], cotangent[part] @ w[group].T, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(d_w[group], x[part].T @ cotangent[part], rtol=1e-5,
                               atol=1e-5)
    start += size
  if block_size > 1:  # the blocked loop leaves rows past the groups at zero
    np.testing.assert_array_equal(y[used:], 0.0)
    np.testing.assert_array_equal(d_x[used:], 0.0)


def test_unknown_dispatcher_lists_valid_names():
  with pytest.raises(ValueError, match="einsum.*gather|gather.*einsum") as info:
    dispatch.get_dispatcher("scatter")
  assert "dropless" in str(info.value)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_default_block_size_on_cpu():
  # ~a quarter of the rows an expert receives on average, a power of two.
  assert dispatch.dropless.default_block_size(16384, 64) == 64
  assert dispatch.dropless.default_block_size(16384, 256) == 16
  assert dispatch.dropless.default_block_size(100, 64) == 8
