"""The router contract and the 2025-26 routing: DeepSeek-V3's gate, Mixtral's
top-k, capacity rounding, padding, every router through every dispatcher it
declares (1 and 8 devices), bias balancing with exact resume, and a router
registered from outside the package."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import routing
from moejax.nn import MoELayer
from moejax.routing import capacity as capacity_lib

import host_devices  # tests/host_devices.py: the environment of N host devices

REPO = pathlib.Path(__file__).resolve().parents[1]
D_MODEL = 16


def _deepseek_v3_gate(logits, bias, num_groups, top_groups, top_k, route_scale):
  """NumPy loop transcription of DeepSeek-V3's published Gate.forward
  (score_func="sigmoid", with a bias): sigmoid scores; bias added for
  selection; groups scored by the sum of their top-2 biased scores; experts
  outside the top_groups groups masked to -inf; top-k; weights = unbiased
  scores of the selected, normalized, times route_scale."""
  tokens, num_experts = logits.shape
  experts = np.zeros((tokens, top_k), np.int64)
  weights = np.zeros((tokens, top_k), np.float32)
  for t in range(tokens):
    scores = (1 / (1 + np.exp(-logits[t].astype(np.float64)))).astype(np.float32)
    select = scores + bias
    per_group = num_experts // num_groups
    group_scores = [np.sort(select[g * per_group:(g + 1) * per_group])[-2:].sum()
                    for g in range(num_groups)]
    best_groups = sorted(range(num_groups), key=lambda g: (-group_scores[g], g))[:top_groups]
    masked = np.full(num_experts, -np.inf, np.float32)
    for g in best_groups:
      masked[g * per_group:(g + 1) * per_group] = select[g * per_group:(g + 1) * per_group]
    chosen = sorted(range(num_experts), key=lambda e: (-masked[e], e))[:top_k]
    w = scores[chosen]
    experts[t] = chosen
    weights[t] = w / w.sum() * route_scale
  return experts, weights


@pytest.mark.parametrize("seed", range(6))
def test_sigmoid_bias_group_limited_matches_deepseek_v3_gate(seed):
  rng = np.random.default_rng(seed)
  num_experts, num_groups, top_groups, top_k = 16, 4, 2, 4
  logits = rng.normal(size=(3, 10, num_experts)).astype(np.float32)
  bias = (rng.normal(size=num_experts) * 0.3).astype(np.float32)
  out = routing.route(jnp.asarray(logits), router="topk", top_k=top_k, score_fn="sigmoid",
                      bias=jnp.asarray(bias), num_groups=num_groups, top_groups=top_groups,
                      renormalize=True, routed_scaling_factor=2.5, capacity_factor=0.0)
  experts = np.asarray(out.expert).reshape(3, 10, top_k)
  weights = np.asarray(out.weight).reshape(3, 10, top_k)
  for g in range(3):
    ref_experts, ref_weights = _deepseek_v3_gate(logits[g], bias, num_groups, top_groups,
                                                 top_k, 2.5)
    np.testing.assert_array_equal(experts[g], ref_experts)
    np.testing.assert_allclose(weights[g], ref_weights, rtol=1e-6)
  # Bias changes selection but never a weight's source: the weights are
  # unbiased scores of the selected experts.
  assert not np.any(np.asarray(out.slot) == out.capacity)  # dropless


def test_bias_affects_selection_only():
  # One token, scores sigmoid(0) = 0.5 for both experts; a bias of +1 on
  # expert 1 selects it, and its weight stays sigmoid(0) = 0.5 (K = 1, no
  # renormalization).
  logits = jnp.zeros((1, 1, 2))
  out = routing.route(logits, router="switch", score_fn="sigmoid",
                      bias=jnp.array([0.0, 1.0]), capacity_factor=0.0)
  assert int(out.expert[0, 0]) == 1
  np.testing.assert_allclose(float(out.weight[0, 0]), 0.5, rtol=1e-7)


def test_mixtral_topk_selects_on_logits():
  # Logits 1 ulp apart at 0.1 (a gap of 7.5e-9): exp(-7.5e-9) rounds to 1.0
  # in float32, so the softmax gives both the same probability and "softmax"
  # breaks the tie to the lower index; Mixtral selects on the logits.
  base = np.float32(0.1)
  logits = np.array([[[base, np.nextafter(base, np.float32(1)), -5.0, -5.0]]], np.float32)
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  assert float(probs[0, 0, 0]) == float(probs[0, 0, 1])  # the tie the softmax makes
  softmax = routing.route(jnp.asarray(logits), router="switch", capacity_factor=0.0)
  mixtral = routing.route(jnp.asarray(logits), router="switch", score_fn="softmax_topk",
                          capacity_factor=0.0)
  assert int(softmax.expert[0, 0]) == 0 and int(mixtral.expert[0, 0]) == 1
  # Weights: softmax over the K selected logits.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 8, 6)).astype(np.float32)
  out = routing.route(jnp.asarray(logits), router="topk", top_k=2, score_fn="softmax_topk",
                      capacity_factor=0.0)
  for g in range(2):
    for s in range(8):
      top = np.argsort(-logits[g, s], kind="stable")[:2]
      w = np.exp(logits[g, s, top] - logits[g, s, top].max())
      np.testing.assert_array_equal(np.asarray(out.expert).reshape(2, 8, 2)[g, s], top)
      np.testing.assert_allclose(np.asarray(out.weight).reshape(2, 8, 2)[g, s], w / w.sum(),
                                 rtol=1e-6)


@pytest.mark.parametrize("tokens,experts,k,factor", [(10, 4, 2, 1.25), (64, 8, 1, 1.0),
                                                     (7, 3, 2, 0.5), (32, 16, 2, 2.0)])
def test_capacity_rounding_reproduces_vmoe(tokens, experts, k, factor):
  # vmoe.moe.compute_capacity: ceil(S * K * f / E), then up to a multiple of 4.
  vmoe = int(np.ceil(tokens * k * factor / experts))
  vmoe += (-vmoe) % 4
  assert capacity_lib.token_choice_capacity(
      num_tokens=tokens, num_experts=experts, top_k=k, capacity_factor=factor,
      min_capacity=1, rounding=4) == vmoe


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("expert_choice", 1)])
def test_padding_takes_no_capacity_and_no_metric(router, top_k):
  rng = np.random.default_rng(1)
  real = rng.normal(size=(1, 6, 4)).astype(np.float32)
  junk = (rng.normal(size=(1, 6, 4)) * 50).astype(np.float32)  # padded positions
  padded = np.concatenate([junk[:, :3], real, junk[:, 3:]], axis=1)
  mask = np.zeros((1, 12), bool)
  mask[:, 3:9] = True
  options = dict(router=router, top_k=top_k, capacity_factor=1.0)
  alone = routing.route(jnp.asarray(real), **options)
  with_pad = routing.route(jnp.asarray(padded), mask=jnp.asarray(mask), **options)
  # Capacity comes from S (12 here, 6 alone), so compare who is served: every
  # real token's kept experts are a superset of those it keeps alone, and no
  # padded token is processed.
  weights_alone = np.asarray(alone.combine_weights())[0]
  weights_pad = np.asarray(with_pad.combine_weights())[0]
  assert np.all(weights_pad[~mask[0]] == 0)
  assert np.all((weights_alone > 0) <= (weights_pad[3:9] > 0))
  assert float(with_pad.metrics["dropped_fraction"]) <= float(alone.metrics["dropped_fraction"])
  # The losses ignore the padding's garbage logits.
  full = routing.route(jnp.asarray(padded), **options)
  assert abs(float(with_pad.z_loss) - float(alone.z_loss)) < 1e-5
  assert float(full.z_loss) > 10 * float(alone.z_loss)


ROUTER_CASES = [  # (router, options) at matched active compute (K = 2)
    ("topk", dict(top_k=2)),
    ("switch", dict(top_k=1)),
    ("expert_choice", dict(top_k=1, capacity_factor=2.0)),
    ("sinkhorn", dict(top_k=2)),
    ("hash", dict(top_k=2)),
    ("soft_moe", dict(top_k=1, capacity_factor=2.0)),
    ("topk", dict(top_k=2, score_fn="sigmoid", bias_update_rate=1e-3, num_groups=2,
                  top_groups=1, routed_scaling_factor=1.5, aux_loss_type="sequence")),
]


def _layer(router, options, dispatch, **extra):
  return MoELayer(d_model=D_MODEL, num_experts=4, expert_hidden=8, router=router,
                  dispatch=dispatch, group_by="batch", rngs=nnx.Rngs(0),
                  tokens_per_group=4, **options, **extra)


def _dispatchers(router, options):
  cls = routing.get_router(router)
  names = list(cls.dispatchers)
  if "dropless" in names and options.get("capacity_factor", 1.25) != 0:
    names.remove("dropless")  # dropless needs capacity_factor=0: checked below
  return names


@pytest.mark.parametrize("router,options", ROUTER_CASES)
def test_every_router_trains_through_every_dispatcher(router, options):
  x = jax.random.normal(jax.random.key(0), (4, 6, D_MODEL))
  tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 50)
  outputs = {}
  for dispatch in _dispatchers(router, options):
    layer = _layer(router, options, dispatch)

    def loss(layer):
      y, aux = layer(x, deterministic=False, rng=jax.random.key(2), token_ids=tokens)
      return jnp.mean(y ** 2) + aux["weighted_loss"], y
    (value, y), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    outputs[dispatch] = np.asarray(y)
  reference = next(iter(outputs.values()))
  for dispatch, y in outputs.items():
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-6, err_msg=dispatch)
  if "dropless" in routing.get_router(router).dispatchers:
    dense = _layer(router, {**options, "capacity_factor": 0.0}, "gather")
    dropless = _layer(router, {**options, "capacity_factor": 0.0}, "dropless")
    np.testing.assert_allclose(dropless(x, token_ids=tokens)[0], dense(x, token_ids=tokens)[0],
                               rtol=1e-5, atol=1e-6)


def test_soft_moe_layer_matches_loop_reference():
  layer = _layer("soft_moe", dict(top_k=1, capacity_factor=2.0), "einsum")
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 2, D_MODEL)))
  y, _ = layer(jnp.asarray(x))
  phi = np.asarray(layer.router.slot_params[...])  # [D, E, P]
  scale = float(layer.router.scale[...])
  wi, wo = np.asarray(layer.experts.wi[...]), np.asarray(layer.experts.wo[...])
  expected = np.zeros_like(x)
  for position in range(2):  # group_by="batch": a group = the 4 tokens at a position
    tokens = x[:, position]  # [S, D]
    normed = tokens / np.sqrt((tokens ** 2).sum(-1, keepdims=True) + 1e-6)
    slots = phi / np.sqrt((phi ** 2).sum(0, keepdims=True) + 1e-6)
    logits = scale * np.einsum("sd,dep->sep", normed, slots)
    dispatch = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    flat = logits.reshape(4, -1)
    combine = (np.exp(flat - flat.max(1, keepdims=True))
               / np.exp(flat - flat.max(1, keepdims=True)).sum(1, keepdims=True))
    slot_in = np.einsum("sep,sd->epd", dispatch, tokens)
    hidden = np.asarray(jax.nn.gelu(jnp.einsum("epd,edh->eph", slot_in, wi)))
    slot_out = np.einsum("eph,ehd->epd", hidden, wo).reshape(-1, D_MODEL)
    expected[:, position] = combine @ slot_out
  np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-4, atol=2e-5)


def test_hash_routes_equal_tokens_alike_and_sinkhorn_only_in_training():
  layer = _layer("hash", dict(top_k=1), "gather", capacity_factor=0.0)
  tokens = jnp.array([[3, 3, 7, 3, 7, 9]] * 4)
  x = jax.random.normal(jax.random.key(4), (4, 6, D_MODEL))
  _, aux = layer(x, token_ids=tokens)
  first = np.asarray(aux["first_expert"])
  assert first[0, 0] == first[0, 1] == first[0, 3] == first[2, 0]
  assert first[0, 2] == first[1, 4]
  sinkhorn = _layer("sinkhorn", dict(top_k=1), "gather", capacity_factor=0.0)
  topk = _layer("topk", dict(top_k=1), "gather", capacity_factor=0.0)
  np.testing.assert_array_equal(sinkhorn(x)[0], topk(x)[0])  # evaluation: plain top-k


def test_bias_update_moves_against_the_load():
  layer = _layer("topk", dict(top_k=1, bias_update_rate=0.01), "gather")
  # load [0.5, 0.25, 0.25, 0]: mean 0.25, sign(mean - load) = [-1, 0, 0, +1].
  layer.after_step({"expert_load": jnp.array([0.5, 0.25, 0.25, 0.0])})
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), [-0.01, 0, 0, 0.01])
  assert isinstance(layer.router.bias, routing.RouterState)  # not an nnx.Param
  with pytest.raises(ValueError, match="bias_update_rate"):
    _layer("expert_choice", dict(top_k=1, bias_update_rate=0.01), "gather")


def test_expert_dropout_only_in_training():
  layer = _layer("topk", dict(top_k=2), "gather", expert_dropout=0.5)
  plain = _layer("topk", dict(top_k=2), "gather")
  x = jax.random.normal(jax.random.key(5), (4, 6, D_MODEL))
  np.testing.assert_array_equal(layer(x)[0], plain(x)[0])
  dropped = layer(x, deterministic=False, rng=jax.random.key(0))[0]
  assert float(jnp.max(jnp.abs(dropped - plain(x, deterministic=False,
                                                rng=jax.random.key(0))[0]))) > 1e-3
  with pytest.raises(ValueError, match="expert_dropout"):
    _layer("topk", dict(top_k=2), "gather", expert_dropout=1.0)


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from moejax import parallel
    from moejax.nn import MoELayer
    cases = json.loads(sys.argv[1])
    mesh = parallel.make_mesh({"data": 2, "expert": 4, "model": 1})
    x = jax.random.normal(jax.random.key(0), (8, 8, 16))
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 50)
    out = {}
    for name, (router, options, dispatch) in cases.items():
      layer = MoELayer(d_model=16, num_experts=4, expert_hidden=8, router=router,
                       dispatch=dispatch, group_by="batch", rngs=nnx.Rngs(0),
                       tokens_per_group=8, **options)
      one, aux1 = layer(x, token_ids=tokens)
      with parallel.activate(mesh):
        sharding = parallel.batch_sharding(mesh)
        many, aux8 = jax.jit(lambda x, t: layer(x, token_ids=t))(
            jax.device_put(x, sharding), jax.device_put(tokens, sharding))
      out[name] = [float(jnp.max(jnp.abs(one - many))),
                   float(abs(aux1["aux_loss"] - aux8["aux_loss"])),
                   float(jnp.max(jnp.abs(aux1["expert_load"] - aux8["expert_load"])))]
    # Expert dropout through the expert-parallel experts (training mode).
    layer = MoELayer(d_model=16, num_experts=4, expert_hidden=8, router="topk", top_k=2,
                     group_by="batch", expert_dropout=0.5, rngs=nnx.Rngs(0))
    with parallel.activate(mesh):
      sharding = parallel.batch_sharding(mesh)
      y, _ = jax.jit(lambda x: layer(x, deterministic=False, rng=jax.random.key(3)))(
          jax.device_put(x, sharding))
    out["expert_dropout_finite"] = [0.0 if bool(jnp.all(jnp.isfinite(y))) else 1.0, 0.0, 0.0]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_every_router_on_8_devices_matches_one_device():
  cases = {}
  for router, options in ROUTER_CASES:
    options = {k: v for k, v in options.items() if k != "bias_update_rate"}
    for dispatch in _dispatchers(router, options):
      cases[f"{router}-{len(cases)}-{dispatch}"] = (router, options, dispatch)
    if "dropless" in routing.get_router(router).dispatchers:
      cases[f"{router}-{len(cases)}-dropless"] = (router, {**options, "capacity_factor": 0.0},
                                                  "dropless")
  env = host_devices.subprocess_env(8)
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, json.dumps(cases)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  diffs = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(diffs) == set(cases) | {"expert_dropout_finite"}
  for name, (y, aux_loss, load) in diffs.items():
    assert y < 1e-5 and aux_loss < 1e-5 and load < 1e-6, (name, y, aux_loss, load)


class _FirstExpertRouter(routing.Router):
  """A toy router from outside the package: every token to expert 0 (K=1)."""

  scoring = "constant"

  def __init__(self, cfg, *, d_model, tokens_per_group=None, rngs):
    super().__init__(cfg, d_model=d_model, rngs=rngs)
    self.temperature = nnx.Param(jnp.ones((), jnp.float32))  # its own parameter

  @classmethod
  def capacity(cls, cfg, num_tokens, capacity_factor):
    return num_tokens

  @classmethod
  def experts_per_token(cls, cfg):
    return 1.0

  @classmethod
  def validate(cls, cfg):
    if cfg.top_k != 1:
      raise ValueError("router='first_expert' is top-1")

  @classmethod
  def router_params(cls, cfg, d_model, tokens_per_group=None):
    return 1

  def __call__(self, x, ctx):
    from moejax.routing.token_choice import token_choice  # pylint: disable=g-import-not-at-top
    num_groups, num_tokens, _ = x.shape
    experts = jnp.zeros((num_groups, num_tokens, 1), jnp.int32)
    weights = jnp.broadcast_to(self.temperature[...], experts.shape).astype(jnp.float32)
    return token_choice(experts, weights, jnp.zeros((num_groups, num_tokens)),
                        num_experts=self.cfg.experts, capacity=num_tokens,
                        batch_prioritized=False, mask=ctx.mask)


def _small_config(**overrides):
  from test_train import small_config  # pylint: disable=g-import-not-at-top
  return small_config(**{"model.moe.group_by": "batch", **overrides})


def test_router_registered_outside_the_package_trains(tmp_path):
  from moejax import train as trainer  # pylint: disable=g-import-not-at-top
  routing.register_router("first_expert_test", _FirstExpertRouter)
  try:
    record = trainer.train_and_evaluate(_small_config(**{
        "model.moe.router": "first_expert_test", "model.moe.top_k": 1,
        "train.steps": 4, "train.eval_every": 4, "train.log_every": 2}), str(tmp_path))
  finally:
    del routing.ROUTERS["first_expert_test"]
  assert np.isfinite(record["train/loss"])
  assert record["train/layer0/max_violation"] == pytest.approx(3.0)  # all load on 1 of 4


def test_bias_balancing_resumes_exactly(tmp_path):
  from test_train import train_losses  # pylint: disable=g-import-not-at-top
  from moejax import train as trainer  # pylint: disable=g-import-not-at-top
  overrides = {"model.moe.bias_update_rate": 1e-2, "model.moe.aux_loss_type": "none",
               "model.moe.score_fn": "sigmoid", "train.steps": 8, "train.log_every": 2,
               "train.checkpoint_every": 4, "train.eval_every": 8}
  full, part = tmp_path / "full", tmp_path / "part"
  trainer.train_and_evaluate(_small_config(**overrides), str(full))
  trainer.train_and_evaluate(_small_config(**{**overrides, "train.steps": 4,
                                              "train.schedule_steps": 8}), str(part))
  trainer.train_and_evaluate(_small_config(**overrides), str(part))
  a, b = train_losses(full), train_losses(part)
  assert sorted(a) == sorted(b)
  for step in a:
    assert abs(a[step] - b[step]) < 1e-6, step
  with open(full / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  assert last["train/bias_norm"] > 0  # the bias moved and is logged
