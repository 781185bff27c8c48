"""TransformerLM, attention and RoPE, and MoELayer's group_by (causal routing)."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.nn import (MoELayer, NonCausalRoutingWarning, TransformerLM, apply_rope,
                       causal_attention, moe_layer_flags, noncausal_routing_reason)

VOCAB, D_MODEL, BATCH, LENGTH = 32, 16, 4, 8


def _moe(**overrides):
  moe = dict(num_experts=4, top_k=1, expert_hidden=16, router="topk", capacity_factor=1.0)
  moe.update(overrides)
  return moe


def _lm(moe=None, seed=0, **overrides):
  args = dict(vocab_size=VOCAB, num_layers=2, d_model=D_MODEL, num_heads=2,
              moe=_moe() if moe is None else moe)
  args.update(overrides)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NonCausalRoutingWarning)
    return TransformerLM(rngs=nnx.Rngs(seed), **args)


def _tokens(seed=0, batch=BATCH, length=LENGTH):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


# ---------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("router", ["topk", "expert_choice", "dense"])
def test_output_shapes_and_dtypes(router):
  model = _lm(_moe(router=router, group_by="batch"))
  logits, aux = _forward(model, _tokens())
  chex.assert_shape(logits, (BATCH, LENGTH, VOCAB))
  assert logits.dtype == jnp.float32
  expected = {"aux_loss", "z_loss", "weighted_loss", "layers"}
  if router != "dense":
    expected |= {"dropped_fraction", "load_max_over_mean", "router_entropy", "max_violation",
                 "router_logit_max"}
  if router == "expert_choice":
    expected |= {"unrouted_fraction"}
  assert set(aux) == expected
  layers = aux.pop("layers")
  for value in aux.values():
    assert value.shape == () and value.dtype == jnp.float32
  # Per MoE layer (keyed by its Transformer layer index): scalars, the load
  # [E] and each token's first expert [B, L].
  assert sorted(layers) == ([] if router == "dense" else [i for i, is_moe in
                                                          enumerate(model.moe_layers) if is_moe])
  for layer in layers.values():
    assert layer["expert_load"].shape == (model.moe.experts,)
    assert layer["first_expert"].shape == (BATCH, LENGTH)
    np.testing.assert_allclose(float(layer["max_violation"]),
                               float(layer["load_max_over_mean"]) - 1.0, rtol=1e-6)


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  tokens = _tokens()
  model16 = _lm(dtype="bfloat16")
  logits16, aux16 = _forward(model16, tokens)
  assert logits16.dtype == jnp.float32
  assert all(value.dtype == jnp.float32 for name, value in aux16.items() if name != "layers")
  # A dense model (no routing flips) computes in bf16: the logits round
  # differently from float32 with the same init (seed 0), but stay close.
  logits32, _ = _forward(_lm(_moe(router="dense"), dtype=jnp.float32), tokens)
  dense16, _ = _forward(_lm(_moe(router="dense"), dtype=jnp.bfloat16), tokens)
  assert not np.allclose(dense16, logits32, atol=1e-4)
  np.testing.assert_allclose(dense16, logits32, atol=0.1)
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(nnx.state(model16, nnx.Param)))


# ---------------------------------------------------------------- causality


def _later_tokens_changed(tokens, start):
  other = (tokens[:, start:] + 1 + jnp.arange(tokens.shape[1] - start)) % VOCAB
  return tokens.at[:, start:].set(other)


@pytest.mark.parametrize("moe", [
    _moe(router="topk", top_k=1, capacity_factor=1.0),  # position priority, drops
    _moe(router="topk", top_k=2, capacity_factor=0.0),  # dropless top-2
    _moe(router="expert_choice", group_by="batch"),
    _moe(router="topk", top_k=2, batch_prioritized=True, group_by="batch"),
], ids=["top1_capacity", "top2_dropless", "expert_choice_batch", "bpr_batch"])
def test_lm_is_causal(moe):
  model = _lm(moe, num_layers=3)
  tokens = _tokens()
  start = 5
  logits, aux = _forward(model, tokens)
  changed, _ = _forward(model, _later_tokens_changed(tokens, start))
  np.testing.assert_allclose(changed[:, :start], logits[:, :start], rtol=0, atol=1e-6)
  assert not np.allclose(changed[:, start:], logits[:, start:], atol=1e-3)
  if moe["router"] == "topk" and moe["capacity_factor"] > 0:
    assert float(aux["dropped_fraction"]) > 0  # the capacity cut is exercised


def test_lm_expert_choice_over_sequences_sees_the_future():
  model = _lm(_moe(router="expert_choice", group_by="sequence"), num_layers=3)
  tokens = _tokens()
  logits, _ = _forward(model, tokens)
  changed, _ = _forward(model, _later_tokens_changed(tokens, 5))
  assert not np.allclose(changed[:, :5], logits[:, :5], atol=1e-6)


@pytest.mark.parametrize("moe,noncausal", [
    (_moe(router="expert_choice"), True),
    (_moe(router="expert_choice", group_by="batch"), False),
    (_moe(router="topk", top_k=1, batch_prioritized=True), True),
    (_moe(router="topk", top_k=1, batch_prioritized=True, group_by="batch"), False),
    (_moe(router="topk", top_k=2, capacity_factor=1.25), True),
    (_moe(router="topk", top_k=1, granularity=2), True),  # top_k * granularity = 2
    (_moe(router="topk", top_k=2, capacity_factor=0.0), False),  # dropless
    (_moe(router="topk", top_k=2, capacity_factor=2.0), False),  # C >= S: no drops
    (_moe(router="switch", top_k=1, capacity_factor=1.0), False),
    (_moe(router="dense"), False),
])
def test_noncausal_routing_reason(moe, noncausal):
  assert (noncausal_routing_reason(moe) is not None) == noncausal


def test_warns_for_expert_choice_over_sequences():
  with pytest.warns(NonCausalRoutingWarning, match=r"config\.model\.moe\.group_by"):
    TransformerLM(vocab_size=VOCAB, num_layers=1, d_model=D_MODEL, num_heads=2,
                  moe=_moe(router="expert_choice"), rngs=nnx.Rngs(0))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    TransformerLM(vocab_size=VOCAB, num_layers=1, d_model=D_MODEL, num_heads=2,
                  moe=_moe(router="expert_choice", group_by="batch"), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- MoELayer group_by


def _layer(seed=0, **overrides):
  return MoELayer(d_model=D_MODEL, rngs=nnx.Rngs(seed), **_moe(**overrides))


@nnx.jit
def _apply(layer, x):
  return layer(x)


def _x(seed=0, batch=BATCH, length=LENGTH):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))


@pytest.mark.parametrize("overrides", [
    dict(router="expert_choice"), dict(router="topk", top_k=2, batch_prioritized=True)])
def test_group_by_batch_routing_is_causal_in_time(overrides):
  x = _x()
  later = x.at[:, 5:].set(_x(seed=1)[:, 5:])
  causal = _layer(group_by="batch", **overrides)
  np.testing.assert_allclose(_apply(causal, later)[0][:, :5], _apply(causal, x)[0][:, :5],
                             rtol=0, atol=1e-6)
  # The same router over sequences lets later tokens change earlier outputs.
  leaky = _layer(group_by="sequence", **overrides)
  assert not np.allclose(_apply(leaky, later)[0][:, :5], _apply(leaky, x)[0][:, :5],
                         atol=1e-6)


@pytest.mark.parametrize("group_size", [None, 2])
def test_group_by_batch_is_sequence_grouping_of_the_transposed_batch(group_size):
  x = _x()
  by_batch = _layer(router="expert_choice", group_by="batch", group_size=group_size)
  by_sequence = _layer(router="expert_choice", group_by="sequence",
                       group_size=group_size or BATCH)  # same parameters (seed 0)
  y, aux = _apply(by_batch, x)
  y_ref, aux_ref = _apply(by_sequence, jnp.swapaxes(x, 0, 1))
  np.testing.assert_allclose(y, jnp.swapaxes(y_ref, 0, 1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["aux_loss"], aux_ref["aux_loss"], rtol=1e-6)


def test_group_by_validation():
  with pytest.raises(ValueError, match=r"group_by.*'sequence', 'batch'"):
    _layer(group_by="position")
  with pytest.raises(ValueError, match="does not divide the batch size 4"):
    _layer(group_by="batch", group_size=3)(_x())


def test_top2_second_choices_depend_on_later_first_choices():
  """Why top-k (K > 1) with finite capacity over sequences warns.

  E = 4, K = 2, S = 4, capacity_factor 0.5: C = max(1, ceil(0.5 * 2 * 4 / 4)) = 1.
  Router logits = 3 * x[:, :4]. Token 0 picks (e0, e1); tokens 1, 2 pick
  (e2, e3). Every 1st choice is served before any 2nd choice, so if token 3's
  1st choice is e1 it takes e1's only slot and token 0's 2nd choice is dropped;
  if it is e3 (case "a"), token 0 keeps e1.
  """
  layer = _layer(top_k=2, capacity_factor=0.5)
  kernel = jnp.zeros((D_MODEL, 4)).at[jnp.arange(4), jnp.arange(4)].set(3.0)
  layer.router.kernel[...] = kernel
  head = jnp.array([[1.0, 0.7, 0, 0], [0, 0, 1.0, 0.7], [0, 0, 1.0, 0.7]])
  token3_a = jnp.array([[0, 0, 0.7, 1.0]])
  token3_b = jnp.array([[0, 1.0, 0.7, 0]])
  rest = jax.random.normal(jax.random.key(0), (1, 4, D_MODEL - 4))
  x_a = jnp.concatenate([jnp.concatenate([head, token3_a])[None], rest], axis=-1)
  x_b = jnp.concatenate([jnp.concatenate([head, token3_b])[None], rest], axis=-1)
  y_a, _ = _apply(layer, x_a)
  y_b, _ = _apply(layer, x_b)
  assert not np.allclose(y_a[0, 0], y_b[0, 0], atol=1e-4)
  assert noncausal_routing_reason(_moe(top_k=2, capacity_factor=0.5, group_size=4))


# ---------------------------------------------------------------- layout, validation


@pytest.mark.parametrize("num_layers,moe_every,first_dense,router,expected", [
    (4, 1, 0, "topk", (True, True, True, True)),
    (4, 2, 0, "topk", (False, True, False, True)),
    (5, 2, 1, "topk", (False, False, True, False, True)),
    (6, 3, 0, "topk", (False, False, True, False, False, True)),
    (3, 1, 3, "topk", (False, False, False)),
    (4, 1, 0, "dense", (False, False, False, False)),
])
def test_layer_layout(num_layers, moe_every, first_dense, router, expected):
  assert moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                         first_dense_layers=first_dense, router=router) == expected


def test_model_builds_the_layout():
  model = _lm(_moe(top_k=2, expert_hidden=8), num_layers=5, moe_every=2,
              first_dense_layers=1)
  assert model.moe_layers == (False, False, True, False, True)
  for layer, is_moe in zip(model.layers, model.moe_layers):
    assert layer.is_moe == is_moe
    assert (layer.ffn.cfg.router == "topk") == is_moe
    if not is_moe:  # dense FFN with the active hidden width top_k * expert_hidden
      assert layer.ffn.ffn.wi[...].shape == (D_MODEL, 2 * 8)


@pytest.mark.parametrize("overrides,match", [
    (dict(d_model=15), "d_model=15 is not divisible by num_heads=2"),
    (dict(moe_every=0), "moe_every"),
    (dict(first_dense_layers=3), r"first_dense_layers=3 must be in \[0, num_layers=2\]"),
    (dict(first_dense_layers=-1), "first_dense_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(head_dim=7), "even head_dim"),
    (dict(dtype="int32"), "dtype"),
    (dict(moe=_moe(d_model=8)), r"moe must not set \['d_model'\]"),
    (dict(moe=_moe(group_by="time")), "group_by"),
])
def test_constructor_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    _lm(**overrides)


def test_tied_embeddings_share_the_parameter():
  tokens = _tokens() % 16  # rows 16.. of the embedding are never looked up
  for tie in (True, False):
    model = _lm(tie_embeddings=tie)
    logits, _ = _forward(model, tokens)
    model.embed.embedding[...] = model.embed.embedding[...].at[20].multiply(2.0)
    moved, _ = _forward(model, tokens)
    # Tied: row 20 is also the output vector of token 20, so only its logit moves.
    np.testing.assert_allclose(moved[..., :20], logits[..., :20], rtol=1e-6)
    assert np.allclose(moved[..., 20], logits[..., 20]) != tie
    assert (model.output_kernel is None) == tie
  n_tied = sum(p.size for p in jax.tree.leaves(nnx.state(_lm(tie_embeddings=True), nnx.Param)))
  n_untied = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_untied - n_tied == VOCAB * D_MODEL


# ---------------------------------------------------------------- aux


@nnx.jit
def _per_layer_aux(model, tokens):
  x = model.embed(tokens)
  per_layer = []
  for layer in model.layers:
    x, layer_aux = layer(x, deterministic=True, rng=None)
    per_layer.append(layer_aux)
  return per_layer


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_aux_is_the_mean_over_moe_layers(router):
  moe = _moe(router=router, group_by="batch", aux_loss_weight=0.5, z_loss_weight=0.25)
  model = _lm(moe, num_layers=5, moe_every=2, first_dense_layers=1)
  assert model.moe_layers == (False, False, True, False, True)
  tokens = _tokens()
  _, aux = _forward(model, tokens)
  per_layer = _per_layer_aux(model, tokens)
  # Dense layers report zero losses and no metrics; they are left out of the mean.
  assert all(float(per_layer[i]["z_loss"]) == 0.0 for i in (0, 1, 3))
  moe_aux = [per_layer[2], per_layer[4]]
  assert float(moe_aux[0]["z_loss"]) != float(moe_aux[1]["z_loss"])
  names = ["aux_loss", "z_loss", "dropped_fraction", "load_max_over_mean", "router_entropy"]
  if router == "expert_choice":
    names.append("unrouted_fraction")
  for name in names:
    np.testing.assert_allclose(aux[name], (moe_aux[0][name] + moe_aux[1][name]) / 2,
                               rtol=1e-6)
  np.testing.assert_allclose(aux["weighted_loss"],
                             0.5 * aux["aux_loss"] + 0.25 * aux["z_loss"], rtol=1e-6)


def test_dense_model_has_zero_router_losses():
  _, aux = _forward(_lm(_moe(router="dense")), _tokens())
  assert set(aux) == {"aux_loss", "z_loss", "weighted_loss", "layers"}
  assert aux.pop("layers") == {}
  assert all(float(value) == 0.0 for value in aux.values())


# ---------------------------------------------------------------- RoPE, attention


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 8))  # [L=1, N=1, P=8]
  k = jax.random.normal(jax.random.key(1), (1, 1, 8))

  def score(m, n):
    rq = apply_rope(q, jnp.array([m]))
    rk = apply_rope(k, jnp.array([n]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose([score(5, 2), score(13, 10), score(103, 100)], score(3, 0),
                             rtol=1e-5)
  np.testing.assert_allclose(score(2, 5), score(10, 13), rtol=1e-5)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3
  assert abs(score(5, 2) - score(2, 5)) > 1e-3  # depends on m - n, not |m - n|
  # Position 0 is the identity; rotations preserve norms.
  np.testing.assert_allclose(apply_rope(q, jnp.array([0])), q, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([7]))),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_causal_attention_matches_a_loop_reference():
  q, k, v = (jax.random.normal(key, (2, 3, 5, 4))
             for key in jax.random.split(jax.random.key(0), 3))
  out = causal_attention(q, k, v)
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  for l in range(5):  # query l sees keys 0..l; scale 1 / sqrt(P) = 1 / 2
    scores = np.einsum("bnp,bnmp->bnm", q[:, :, l], k[:, :, :l + 1]) / 2.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnm,bnmp->bnp", weights, v[:, :, :l + 1])
    np.testing.assert_allclose(out[:, :, l], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training


def test_jit_and_grad_with_router_noise():
  model = _lm(_moe(top_k=2, capacity_factor=1.0, noise_std=1.0, jitter=0.1,
                   group_by="batch"))
  tokens = _tokens()

  @nnx.jit
  def loss_and_grad(model, tokens, rng):
    def loss_fn(model):
      logits, aux = model(tokens[:, :-1], deterministic=False, rng=rng)
      labels = tokens[:, 1:]
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
      return ce + aux["weighted_loss"]
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = loss_and_grad(model, tokens, jax.random.key(0))
  loss_other_rng, _ = loss_and_grad(model, tokens, jax.random.key(1))
  assert np.isfinite(loss) and abs(float(loss) - np.log(VOCAB)) < 1.0
  assert float(loss) != float(loss_other_rng)  # the noise reaches the routers
  for path in (("embed", "embedding"), ("layers", 0, "attention", "qkv"),
               ("layers", 1, "ffn", "router", "kernel"), ("layers", 1, "ffn", "experts", "wo")):
    grad = grads
    for key in path:
      grad = grad[key]
    assert np.all(np.isfinite(grad[...])) and float(jnp.abs(grad[...]).max()) > 0, path
  # Evaluation ignores the rng.
  evaluate = nnx.jit(lambda model, tokens, rng: model(tokens, deterministic=True, rng=rng))
  eval_a, _ = evaluate(model, tokens, jax.random.key(0))
  eval_b, _ = _forward(model, tokens)
  np.testing.assert_allclose(eval_a, eval_b, rtol=0, atol=0)
