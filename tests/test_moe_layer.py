"""MoELayer: wiring against a dense reference, dtypes, granularity, validation."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moejax import routing as routing_lib
from moejax.nn import MoELayer
from moejax.parallel import expert_parallel

D_MODEL = 16


def _x(batch=2, length=12, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))


def _reference(layer: MoELayer, x, group_size, **route_kwargs):
  """Routes with `route` and runs every expert on every token (gelu experts)."""
  tokens = x.reshape(-1, D_MODEL)
  logits = (tokens @ layer.router.kernel[...]).reshape(-1, group_size, layer.num_experts)
  routing = routing_lib.route(logits, router=layer.cfg.router, top_k=layer.top_k,
                              capacity_factor=layer.cfg.capacity_factor, **route_kwargs)
  wi, wo = layer.experts.wi[...], layer.experts.wo[...]
  hidden = jax.nn.gelu(jnp.einsum("td,edh->teh", tokens, wi))
  outputs = jnp.einsum("teh,ehd->ted", hidden, wo)  # every expert on every token
  weights = routing.combine_weights().reshape(tokens.shape[0], layer.num_experts)
  return jnp.einsum("te,ted->td", weights, outputs).reshape(x.shape), routing


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
@pytest.mark.parametrize("router,top_k,group_size", [
    ("topk", 2, None), ("switch", 1, 6), ("expert_choice", 1, 24), ("topk", 3, 4)])
def test_layer_matches_reference(dispatch, router, top_k, group_size):
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=top_k, expert_hidden=32,
                   router=router, capacity_factor=1.0, group_size=group_size,
                   dispatch=dispatch, rngs=nnx.Rngs(0))
  x = _x()
  y, aux = layer(x)
  expected, routing = _reference(layer, x, group_size or x.shape[1])
  chex.assert_shape(y, x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["aux_loss"], routing.aux_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["z_loss"], routing.z_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["weighted_loss"],
                             1e-2 * routing.aux_loss + 1e-3 * routing.z_loss, rtol=1e-6)


def test_dropless_layer_equals_gather_with_full_capacity():
  kwargs = dict(d_model=D_MODEL, num_experts=8, top_k=2, expert_hidden=32,
                capacity_factor=0.0, activation="swiglu")
  gather = MoELayer(dispatch="gather", rngs=nnx.Rngs(3), **kwargs)
  dropless = MoELayer(dispatch="dropless", rngs=nnx.Rngs(3), **kwargs)
  x = _x(batch=4, length=16)

  def loss(layer, x):
    y, aux = layer(x)
    return jnp.sum(jnp.sin(y)) + aux["weighted_loss"]

  value_g, grads_g = nnx.value_and_grad(loss, argnums=(0, 1))(gather, x)
  value_d, grads_d = nnx.value_and_grad(loss, argnums=(0, 1))(dropless, x)
  np.testing.assert_allclose(value_g, value_d, rtol=1e-5)
  chex.assert_trees_all_close(grads_g, grads_d, rtol=1e-4, atol=1e-5)
  assert float(gather(x)[1]["dropped_fraction"]) == 0.0


def test_built_from_config_and_jits():
  config = ml_collections.ConfigDict(dict(
      num_experts=8, top_k=2, expert_hidden=32, router="topk", capacity_factor=1.25,
      group_size=None, dispatch="gather", activation="swiglu", num_shared_experts=1,
      granularity=2, aux_loss_weight=1e-2, z_loss_weight=1e-3, batch_prioritized=True,
      jitter=0.0, noise_std=0.0))
  layer = MoELayer(d_model=D_MODEL, rngs=nnx.Rngs(0), **config)
  assert (layer.num_experts, layer.top_k, layer.expert_hidden) == (16, 4, 16)
  x = _x()
  eager_y, eager_aux = layer(x)
  jit_y, jit_aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
  np.testing.assert_allclose(jit_y, eager_y, rtol=1e-5, atol=1e-6)
  assert set(eager_aux) >= {"aux_loss", "z_loss", "weighted_loss", "expert_load",
                            "dropped_fraction", "load_max_over_mean", "router_entropy"}
  chex.assert_shape(eager_aux["expert_load"], (16,))


def test_bfloat16_activations_keep_a_float32_router():
  kwargs = dict(d_model=D_MODEL, num_experts=8, top_k=2, expert_hidden=32,
                capacity_factor=1.0)
  layer32 = MoELayer(rngs=nnx.Rngs(1), **kwargs)
  layer16 = MoELayer(dtype=jnp.bfloat16, rngs=nnx.Rngs(1), **kwargs)
  assert layer16.router.kernel[...].dtype == jnp.float32
  assert layer16.experts.wi[...].dtype == jnp.float32  # float32 master weights
  x = _x(batch=4, length=32)
  y32, aux32 = layer32(x)
  y16, aux16 = layer16(x)
  assert y16.dtype == jnp.bfloat16
  # The router saw float32 inputs and float32 kernels: identical routing decisions.
  np.testing.assert_array_equal(aux16["expert_load"], aux32["expert_load"])
  np.testing.assert_array_equal(aux16["dropped_fraction"], aux32["dropped_fraction"])
  np.testing.assert_allclose(aux16["z_loss"], aux32["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2, rtol=5e-2)


def _expert_params(layer: MoELayer) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(layer.experts, nnx.Param)))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_granularity_keeps_active_parameters(activation):
  def counts(granularity):
    layer = MoELayer(d_model=D_MODEL, num_experts=8, top_k=2, expert_hidden=64,
                     granularity=granularity, activation=activation, rngs=nnx.Rngs(0))
    total = _expert_params(layer)
    per_expert = total // layer.num_experts
    return total, per_expert * layer.top_k, layer
  total1, active1, _ = counts(1)
  for granularity in (2, 4, 8):
    total, active, layer = counts(granularity)
    assert (layer.num_experts, layer.top_k) == (8 * granularity, 2 * granularity)
    assert layer.expert_hidden == 64 // granularity
    assert (total, active) == (total1, active1)
  dense = MoELayer(d_model=D_MODEL, num_experts=8, top_k=2, expert_hidden=64,
                   router="dense", activation=activation, rngs=nnx.Rngs(0))
  dense_params = sum(p.size for p in jax.tree.leaves(nnx.state(dense, nnx.Param)))
  assert dense_params == active1  # the dense baseline has the MoE's active FFN params


def test_shared_experts_are_always_active():
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=1, expert_hidden=32,
                   router="switch", num_shared_experts=2, rngs=nnx.Rngs(0))
  assert layer.shared.wi[...].shape == (D_MODEL, 64)
  x = _x()
  y, _ = layer(x)
  shared_only = layer.shared(x.reshape(-1, D_MODEL)).reshape(x.shape)
  assert float(jnp.max(jnp.abs(y - shared_only))) > 1e-3  # routed experts contribute
  layer.experts.wo[...] = jnp.zeros_like(layer.experts.wo[...])
  y, _ = layer(x)
  np.testing.assert_allclose(y, shared_only, rtol=1e-6, atol=1e-6)


def test_dense_router_has_same_signature():
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=2, expert_hidden=32,
                   router="dense", rngs=nnx.Rngs(0))
  x = _x()
  y, aux = layer(x)
  chex.assert_shape(y, x.shape)
  assert layer.ffn.wi[...].shape == (D_MODEL, 64)
  np.testing.assert_allclose(y, layer.ffn(x), rtol=1e-6)
  assert float(aux["aux_loss"]) == 0.0 and float(aux["weighted_loss"]) == 0.0


def test_router_jitter_only_in_training():
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=2, expert_hidden=32,
                   jitter=0.5, noise_std=1.0, rngs=nnx.Rngs(0))
  x = _x()
  y_eval, _ = layer(x)
  y_eval_again, _ = layer(x, deterministic=True, rng=jax.random.key(5))
  np.testing.assert_array_equal(y_eval, y_eval_again)
  y_train, _ = layer(x, deterministic=False, rng=jax.random.key(5))
  assert float(jnp.max(jnp.abs(y_train - y_eval))) > 1e-3
  with pytest.raises(ValueError, match="rng"):
    layer(x, deterministic=False)


@pytest.mark.parametrize("kwargs,names", [
    (dict(router="switch", top_k=2), ["switch", "top_k"]),
    (dict(top_k=5), ["top_k", "num_experts"]),
    (dict(capacity_factor=-1.0), ["capacity_factor"]),
    (dict(capacity_factor=float("nan")), ["capacity_factor"]),
    (dict(capacity_factor=float("inf")), ["capacity_factor"]),
    (dict(dispatch="dropless", capacity_factor=1.25), ["dropless", "capacity_factor"]),
    (dict(router="expert_choice", capacity_factor=0.0), ["capacity_factor"]),
    (dict(router="no_such_router"), ["no_such_router", "topk", "switch", "expert_choice",
                                     "dense", "soft_moe", "hash"]),
    (dict(dispatch="scatter"), ["scatter", "gather", "einsum", "dropless"]),
    (dict(activation="relu"), ["relu", "gelu", "swiglu"]),
    (dict(granularity=3), ["expert_hidden", "granularity"]),
    (dict(router="switch", top_k=1, granularity=2), ["switch", "granularity"]),
    (dict(capacity=2), ["capacity", "batch_prioritized"]),
    (dict(num_experts=0), ["num_experts"]),
    (dict(group_size=0), ["group_size"]),
])
def test_invalid_options_name_the_argument(kwargs, names):
  options = dict(d_model=D_MODEL, num_experts=4, top_k=1, expert_hidden=32)
  options.update(kwargs)
  with pytest.raises(ValueError) as info:
    MoELayer(rngs=nnx.Rngs(0), **options)
  for name in names:
    assert name in str(info.value), (name, str(info.value))


def test_group_size_must_divide_tokens():
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=1, expert_hidden=32,
                   group_size=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="group_size"):
    layer(_x(batch=2, length=12))


def test_eval_capacity_factor_applies_only_when_deterministic():
  # 4 experts, top-1, 16 tokens: capacity 0.25 gives C = 1 slot per expert,
  # so at most 4 of 16 tokens are processed; capacity 4.0 drops nothing.
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  kwargs = dict(d_model=8, num_experts=4, top_k=1, expert_hidden=8, router="switch",
                rngs=nnx.Rngs(0))
  layer = MoELayer(capacity_factor=0.25, eval_capacity_factor=4.0, **kwargs)
  _, train_aux = layer(x, deterministic=False, rng=jax.random.key(1))
  _, eval_aux = layer(x, deterministic=True)
  assert float(train_aux["dropped_fraction"]) >= 0.75 - 1e-6
  assert float(eval_aux["dropped_fraction"]) == 0.0
  # Same parameters, eval factor = train factor when unset.
  plain = MoELayer(capacity_factor=0.25, **kwargs)
  _, plain_aux = plain(x, deterministic=True)
  assert float(plain_aux["dropped_fraction"]) >= 0.75 - 1e-6
  with pytest.raises(ValueError, match="eval_capacity_factor"):
    MoELayer(capacity_factor=1.0, eval_capacity_factor=-1.0, **kwargs)


def test_dropless_exchange_names():
  with pytest.raises(ValueError, match="unknown dropless_exchange 'ragged_dot'"):
    MoELayer(d_model=8, num_experts=4, top_k=2, expert_hidden=8, capacity_factor=0.0,
             dispatch="dropless", dropless_exchange="ragged_dot", rngs=nnx.Rngs(0))
  assert expert_parallel.resolve_exchange("padded") == "padded"
  assert expert_parallel.resolve_exchange("ragged") == "ragged"
  # XLA:CPU has no ragged all-to-all, so "auto" picks the padded exchange there.
  expected = "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"
  assert expert_parallel.resolve_exchange("auto") == expected


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_router_logit_max_is_the_largest_logit_magnitude(router):
  layer = MoELayer(d_model=D_MODEL, num_experts=4, top_k=2, expert_hidden=16, router=router,
                   capacity_factor=2.0, rngs=nnx.Rngs(0))
  x = _x() * 5.0
  _, aux = layer(x)
  logits = np.asarray(x, np.float32).reshape(-1, D_MODEL) @ np.asarray(layer.router.kernel[...])
  np.testing.assert_allclose(aux["router_logit_max"], np.abs(logits).max(), rtol=1e-5)
  # Padded tokens do not count.
  mask = np.zeros(x.shape[:2], bool)
  mask[:, :2] = True
  _, masked = layer(x, mask=jnp.asarray(mask))
  real = np.asarray(x, np.float32)[:, :2].reshape(-1, D_MODEL) @ np.asarray(
      layer.router.kernel[...])
  np.testing.assert_allclose(masked["router_logit_max"], np.abs(real).max(), rtol=1e-5)


@pytest.mark.parametrize("group_size", [1, 2, 4, None])
def test_batch_groups_are_chunks_of_sequences_at_one_position(group_size):
  """group_by="batch": each group holds the S sequences of one chunk at one
  position, groups ordered (chunk, position), and the inverse restores [B, L]."""
  layer = MoELayer(d_model=8, num_experts=4, top_k=1, expert_hidden=8, group_by="batch",
                   group_size=group_size, rngs=nnx.Rngs(0))
  batch, length = 4, 3
  size = layer.group_size(batch, length)
  ids = jnp.arange(batch * length).reshape(batch, length)  # id = row * L + position
  groups = np.asarray(layer._to_groups(ids, size, ()))
  chunks = batch // size
  assert groups.shape == (chunks * length, size)
  for index, group in enumerate(groups):
    chunk, position = divmod(index, length)
    rows = np.arange(chunk * size, (chunk + 1) * size)
    np.testing.assert_array_equal(group, rows * length + position)
  np.testing.assert_array_equal(layer._from_groups(jnp.asarray(groups), batch, length, ()), ids)
