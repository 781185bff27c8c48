"""The routing and optimizer recipes of 2026: DeepSeek-V4's hash layers
(`config.model.first_hash_layers`, `MoEConfig.hash_gate`), Muon on MoE
(`config.train.optimizer="muon"`) and Kimi K2's QK-clip
(`config.train.qk_clip_tau`), each against a transcription of the published
formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import evaluate as evaluate_lib
from moejax import routing
from moejax import run as run_lib
from moejax import train as train_lib
from moejax.nn import Experts, TransformerLM
from moejax.nn.attention import CausalSelfAttention, LatentAttention, Rope, clip_factors
from moejax.nn.config import ModelConfig
from moejax.routing import RouteContext, hashing
from moejax.routing import routers as routers_lib
from moejax.scaling import accounting
from moejax.train import config as config_lib
from moejax.train import optim
from moejax.train import resume


def _reference_gate(logits, bias, experts, route_scale):
  """DeepSeek-V4 inference/model.py `Gate.forward`, sqrtsoftplus scores,
  transcribed in numpy: experts given (`tid2eid[input_ids]` in a hash layer),
  weights the unbiased scores there, normalized, times route_scale."""
  scores = np.sqrt(np.log1p(np.exp(logits.astype(np.float64))))
  if experts is None:
    experts = np.argsort(-(scores + bias), axis=-1, kind="stable")
  weights = np.take_along_axis(scores, experts, axis=-1)
  return weights / weights.sum(-1, keepdims=True) * route_scale, experts


def test_a_gated_hash_layer_weighs_its_hashed_experts_as_deepseek_v4():
  cfg = routing.MoEConfig(num_experts=8, top_k=3, score_fn="sqrtsoftplus",
                          routed_scaling_factor=1.5, capacity_factor=0.0,
                          dispatch="dropless").hashed(index=1)
  router = routing.get_router("hash")(cfg, d_model=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 500)
  result = router(x, RouteContext(capacity_factor=0.0, token_ids=ids))
  experts, weights, _ = result.token_choices()
  hashed = hashing.hash_experts(ids, 8, 3, seed=1)  # hash layer 1 has its own map
  np.testing.assert_array_equal(experts, hashed)
  logits = np.asarray(x.reshape(-1, 16) @ router.kernel[...]).reshape(2, 12, 8)
  expected, _ = _reference_gate(logits, 0.0, np.asarray(hashed), 1.5)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  # The router's kernel gets gradients through the weights.
  assert router.router_params(cfg, 16) == 16 * 8


def test_sqrtsoftplus_selection_with_bias_matches_deepseek_v4():
  logits = jax.random.normal(jax.random.key(2), (1, 32, 16)) * 3
  bias = np.linspace(-0.3, 0.3, 16).astype(np.float32)
  result = routing.route(logits, router="topk", top_k=4, score_fn="sqrtsoftplus",
                         bias=jnp.asarray(bias), renormalize=True,
                         routed_scaling_factor=2.5, capacity_factor=0.0)
  expected, order = _reference_gate(np.asarray(logits), bias, None, 2.5)
  experts, weights, _ = result.token_choices()
  np.testing.assert_array_equal(experts, order[..., :4])
  reference = np.take_along_axis(np.sqrt(np.log1p(np.exp(np.asarray(logits, np.float64)))),
                                 order[..., :4], -1)
  np.testing.assert_allclose(weights, reference / reference.sum(-1, keepdims=True) * 2.5,
                             rtol=1e-5)
  del expected


def _reference_qb_dual_update(scores, k, beta):
  """Megatron-Core moe_utils.py `qb_dual_update`, transcribed in numpy: top-K
  of scores - beta; alpha the (K+1)-th value; each expert's new bias the
  (m K / n + 1)-th largest of scores - alpha in its column."""
  m, n = scores.shape
  shifted = scores - beta
  order = np.argsort(-shifted, axis=1, kind="stable")
  alpha = np.take_along_axis(shifted, order[:, k:k + 1], axis=1)
  column = np.sort(scores - alpha, axis=0)[::-1]
  return order[:, :k], column[m * k // n]


def test_quantile_balancing_selection_is_megatrons_dual_update():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 16, 8)).astype(np.float32)
  beta = (rng.normal(size=8) * 0.1).astype(np.float32)
  experts, quantile = routers_lib.quantile_selection(
      jnp.asarray(logits), jnp.asarray(beta), 2,
      RouteContext(capacity_factor=0.0, deterministic=False))
  want_experts, want_quantile = _reference_qb_dual_update(logits.reshape(32, 8), 2, beta)
  np.testing.assert_array_equal(np.asarray(experts).reshape(32, 2), want_experts)
  np.testing.assert_allclose(quantile, want_quantile, rtol=1e-6)


def test_quantile_balancing_balances_a_skewed_router_in_a_few_steps():
  cfg = routing.MoEConfig(num_experts=8, top_k=2, capacity_factor=0.0, dispatch="dropless",
                          quantile_balancing=True)
  router = routing.get_router("topk")(cfg, d_model=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 512, 16))
  # Skew: expert e's logit is raised by e / 4.
  router.kernel[...] = router.kernel[...] + 0.0
  skew = jnp.linspace(0.0, 2.0, 8)
  router.logit_bias = nnx.Param(skew)  # a learned-bias slot, used here as a fixed skew
  ratios = []
  for _ in range(4):
    result = router(x, RouteContext(capacity_factor=0.0, deterministic=False,
                                    rng=jax.random.key(1)))
    load = np.bincount(np.asarray(result.expert).ravel(), minlength=8)
    ratios.append(load.max() / load.mean())
    router.after_step({routing.QB_QUANTILE: result.metrics[routing.QB_QUANTILE]})
    assert abs(float(jnp.mean(router.bias[...]))) < 1e-6  # re-centered
  assert ratios[0] > 1.8 and ratios[-1] < 1.15, ratios
  with pytest.raises(ValueError, match="excludes"):
    routing.validate(routing.MoEConfig(quantile_balancing=True, bias_update_rate=1e-3))


def _reference_swiglu(gate, up, limit):
  """DeepSeek-V4 inference/model.py `Expert.forward`'s activation: up clamped
  to [-limit, limit], gate only from above, silu(gate) * up."""
  up = np.clip(up, -limit, limit)
  gate = np.minimum(gate, limit)
  return gate / (1 + np.exp(-gate)) * up


def test_the_swiglu_clamp_is_deepseek_v4s_asymmetric_one():
  experts = Experts(num_experts=2, d_model=4, hidden=6, activation="swiglu",
                    rngs=nnx.Rngs(0), swiglu_limit=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 5, 4)) * 4  # pre-activations beyond 0.5
  gate = np.einsum("end,edh->enh", x, experts.wi_gate[...])
  up = np.einsum("end,edh->enh", x, experts.wi_up[...])
  assert gate.min() < -0.5 and up.max() > 0.5
  expected = np.einsum("enh,ehd->end", _reference_swiglu(gate, up, 0.5), experts.wo[...])
  np.testing.assert_allclose(experts(x), expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="swiglu_limit clamps SwiGLU"):
    routing.validate(routing.MoEConfig(swiglu_limit=1.0))


def test_first_hash_layers_are_hash_layers_in_both_layouts():
  moe = routing.MoEConfig(num_experts=4, top_k=2, capacity_factor=0.0, dispatch="dropless",
                          expert_hidden=16, bias_update_rate=1e-3, score_fn="sigmoid")
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
  outputs = {}
  for scanned in (False, True):
    model = TransformerLM(vocab_size=50, num_layers=5, d_model=16, num_heads=2, moe=moe,
                          first_dense_layers=1, first_hash_layers=2, scan_layers=scanned,
                          rngs=nnx.Rngs(0))
    routers = [type(model.layout.block(model, i).ffn.router).__name__ for i in (1, 2, 3, 4)]
    assert routers == ["HashRouter", "HashRouter", "TokenChoiceRouter", "TokenChoiceRouter"]
    logits, aux = model(tokens, trace=True)
    outputs[scanned] = logits
    for index in (1, 2):
      np.testing.assert_array_equal(aux["layers"][index]["trace"]["experts"],
                                    hashing.hash_experts(tokens, 4, 2, seed=index - 1))
  assert model.layout.start == 3  # the scan starts above the hash layers
  np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-5)


def test_first_hash_layers_beyond_the_moe_layers_is_one_message():
  with pytest.raises(ValueError, match="first_hash_layers=5 exceeds the 4 MoE layers"):
    ModelConfig.from_mapping({"num_layers": 4, "first_hash_layers": 5})


def test_hash_layers_keep_the_parameter_count_of_the_learned_router():
  base = config_lib.default_config()
  hashed = config_lib.default_config()
  hashed.model.first_hash_layers = 2
  counts = [accounting.counts_from_config(config, 256) for config in (base, hashed)]
  assert counts[0]["params_router"] == counts[1]["params_router"] > 0
  assert counts[0]["params_total"] == counts[1]["params_total"]
  assert counts[0]["flops_per_token"] == counts[1]["flops_per_token"]


def _newton_schulz(matrix, steps=5, coeffs=(3.4445, -4.775, 2.0315), eps=1e-8):
  """Keller Jordan's Muon orthogonalization (github.com/KellerJordan/Muon,
  `zeropower_via_newtonschulz5`), transcribed in numpy float64."""
  a, b, c = coeffs
  x = matrix / (np.linalg.norm(matrix) + eps)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if transposed else x


def _muon_update(params, grads):
  train = config_lib.default_config().train
  train.update(optimizer="muon", warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
               learning_rate=1.0, final_lr_fraction=1.0)
  tx = optim.make_optimizer(train)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_muon_orthogonalizes_each_expert_on_its_own():
  """[E, D, H] expert kernels: each expert's update is the Newton-Schulz of
  its own gradient, scaled by 0.2 sqrt(max(D, H)) (Moonlight), never mixed
  across experts (marin #8621)."""
  rng = np.random.default_rng(0)
  grads = {"layers": {"0": {"ffn": {"experts": {
      "wi": jnp.asarray(rng.normal(size=(3, 8, 12)), jnp.float32)}}}}}
  params = jax.tree.map(jnp.zeros_like, grads)
  update = np.asarray(_muon_update(params, grads)["layers"]["0"]["ffn"]["experts"]["wi"])
  g = np.asarray(grads["layers"]["0"]["ffn"]["experts"]["wi"], np.float64)
  for e in range(3):
    # Nesterov momentum at step 1: (1 + beta) g, a scale Newton-Schulz removes.
    expected = -0.2 * np.sqrt(12) * _newton_schulz(1.95 * g[e])
    np.testing.assert_allclose(update[e], expected, atol=2e-3)
  # Scaling one expert's gradient changes no other expert's update.
  louder = jax.tree.map(lambda x: x.at[0].multiply(100.0), grads)
  other = np.asarray(_muon_update(params, louder)["layers"]["0"]["ffn"]["experts"]["wi"])
  np.testing.assert_allclose(other[1:], update[1:], rtol=1e-5)


def test_muon_takes_the_matrices_and_adamw_the_rest():
  dims = optim.muon_dimensions
  assert dims(("embed", "mlp"), (64, 128)).reduction_axis == (0,)
  wo = dims(("layers", "expert", "mlp", "embed"), (2, 4, 128, 64))
  assert (wo.reduction_axis, wo.output_axis) == ((2,), (3,))
  out = dims(("heads", "head_dim", "embed"), (4, 16, 64))  # attention output [N, P, D]
  assert (out.reduction_axis, out.output_axis) == ((0, 1), (2,))
  qkv = dims(("embed", "qkv", "heads", "head_dim"), (64, 3, 4, 16))  # q, k, v apart
  assert (qkv.reduction_axis, qkv.output_axis) == ((0,), (2, 3))
  for axes, shape in ((("vocab", "embed"), (256, 64)), (("embed", "router"), (64, 8)),
                      (("embed",), (64,)), (("layers", "embed"), (4, 64)),
                      (("embed", None), (64, 1))):
    assert dims(axes, shape) is None, axes


def test_changing_the_optimizer_of_a_run_is_refused():
  config = config_lib.default_config()
  saved = resume.to_json(config)
  config.train.optimizer = "muon"
  config.train.resume_with_changes = True
  with pytest.raises(resume.ConfigChangedError, match="optimizer state of"):
    resume.check(saved, config, step=10, workdir="/w")


def _tiny(**train):
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=3, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, group_by="batch")
  config.train.update(seq_len=16, batch_size=8, steps=30, warmup_steps=2, log_every=5,
                      eval_every=30, eval_batches=1, checkpoint_every=30,
                      learning_rate=1e-2, **train)
  return config


@pytest.mark.parametrize("option", ["first_hash_layers", "muon", "quantile_balancing",
                                    "muon_qk_clip"])
def test_the_recipes_train_with_falling_loss(option, tmp_path):
  config = _tiny(optimizer="muon" if option.startswith("muon") else "adamw")
  if option == "muon_qk_clip":
    config.train.qk_clip_tau = 1.0
  if option == "first_hash_layers":
    config.model.first_hash_layers = 2
  if option == "quantile_balancing":
    config.model.moe.update(quantile_balancing=True, aux_loss_weight=0.0)
  workdir = str(tmp_path / option)
  train_lib.train_and_evaluate(config, workdir)
  steps, losses = run_lib.Run(workdir).series("train/loss")
  # From about 6.7 to 6.4 in 25 steps (a tiny model on the synthetic mixture).
  assert steps == [5, 10, 15, 20, 25, 30] and losses[-1] < losses[0] - 0.15, losses
  logged = run_lib.Run(workdir).series("train/max_attention_logit")[1]
  if option == "muon_qk_clip":
    # S_max of each step, before its clip: the weights it saw were clipped
    # after the step before, so it stays near tau = 1 (moved by one update).
    assert len(logged) == 6 and max(logged) < 1.5, logged
  else:
    assert logged == []


def test_balanced_hash_table_evens_a_zipf_stream_the_random_hash_does_not():
  """Hash Layers' balanced assignment against the random hash at E=8, K=1,
  on a Zipf(0.8) stream over 5,000 ids."""
  rng = np.random.default_rng(0)
  probs = 1.0 / np.arange(1, 5001) ** 0.8
  stream = rng.choice(5000, size=200_000, p=probs / probs.sum())
  counts = np.bincount(stream, minlength=5000)
  ratio = lambda experts: (lambda load: load.max() / load.mean())(  # noqa: E731
      np.bincount(np.ravel(experts), minlength=8))
  assert ratio(hashing.hash_experts(jnp.asarray(stream), 8, 1)) > 1.3
  assert ratio(hashing.balanced_table(counts, 8, 1)[stream]) < 1.001
  # By hand: ids of counts 10, 6, 5, 3, 1 onto 2 experts, greedily to the
  # lighter one: 10 -> a; 6 -> b; 5 -> b (6 < 10); 3 -> a (11 > 10); 1 -> b.
  table = hashing.balanced_table(np.array([10, 6, 5, 3, 1, 0]), 2, 1)
  a = table[0, 0]
  assert [int(table[i, 0] == a) for i in range(5)] == [1, 0, 0, 1, 0]
  # An id never counted keeps its random expert.
  assert table[5, 0] == int(hashing.hash_experts(jnp.array([5]), 2, 1)[0, 0])


def test_a_run_starts_with_the_balanced_table_of_its_training_data(tmp_path):
  config = _tiny()
  config.model.moe.update(router="hash", hash_table="balanced", top_k=1, num_experts=4)
  config.train.update(steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path / "balanced")
  train_lib.train_and_evaluate(config, workdir)
  with evaluate_lib.opened(workdir) as run:
    dataset = run.dataset
    counts = sum(np.bincount(np.asarray(dataset.train_batch(s)["inputs"]).ravel(),
                             minlength=dataset.vocab_size) for s in range(32))
    table = nnx.merge(run.graphdef, run.params).layers[0].ffn.router.table[...]
  np.testing.assert_array_equal(table, hashing.balanced_table(counts, 4, 1, seed=0))


def _reference_max_logits(attention, x):
  """Each head's largest causal logit, from the projections in numpy."""
  length = x.shape[1]
  positions = jnp.arange(length, dtype=jnp.int32)
  if isinstance(attention, LatentAttention):
    q, latents, k_rope, _ = attention._project(x, positions)
    kv = np.einsum("bmr,rnp->bnmp", np.asarray(latents[:, 0]), np.asarray(attention.kv_up[...]))
    k_rope = np.broadcast_to(np.asarray(k_rope), kv.shape[:3] + (attention.rope_dim,))
    k = np.concatenate([kv[..., :attention.nope], k_rope], axis=-1)
    scale = (attention.nope + attention.rope_dim) ** -0.5 * attention.rope.softmax_factor
  else:
    q, k, _, _ = attention._project(x, positions)
    k = np.repeat(np.asarray(k), q.shape[1] // k.shape[1], axis=1)  # head n reads n // G
    scale = q.shape[-1] ** -0.5
  scores = np.einsum("bnlp,bnmp->bnlm", np.asarray(q), k) * scale
  causal = np.tril(np.ones((length, length), bool))
  return np.where(causal, scores, -np.inf).max(axis=(0, 2, 3))


@pytest.mark.parametrize("kind", ["multi_head", "grouped", "latent", "latent_full_query"])
def test_qk_clip_caps_each_heads_largest_logit_at_tau(kind):
  """Kimi K2's QK-clip (arXiv 2507.20534, §2.1): gamma_h = min(1, tau /
  S_max^h); after it each head's largest logit on the same tokens is
  min(S_max^h, tau), with the weights split as the paper splits them."""
  rngs = nnx.Rngs(0)
  if kind.startswith("latent"):
    attention = LatentAttention(d_model=32, num_heads=4, kv_rank=16,
                                q_rank=0 if kind == "latent_full_query" else 24,
                                nope=6, rope=4, v=10, rngs=rngs, rope_options=Rope(
                                    interleave=True, yarn_factor=4.0,
                                    yarn_original_max_positions=16, yarn_mscale_all_dim=0.8))
  else:
    attention = CausalSelfAttention(d_model=32, num_heads=4, head_dim=8, rngs=rngs,
                                    num_kv_heads=2 if kind == "grouped" else None)
  x = 3.0 * jax.random.normal(jax.random.key(1), (2, 9, 32))
  y, largest = attention(x, max_logits=True)
  np.testing.assert_allclose(y, attention(x), rtol=0, atol=0)
  np.testing.assert_allclose(largest, _reference_max_logits(attention, x), rtol=1e-5)
  tau = float(np.sort(np.asarray(largest))[1])  # two or three heads above tau
  gamma = np.minimum(1.0, tau / np.asarray(largest))
  before = {name: np.asarray(getattr(attention, name)[...]) for name in
            ("qkv", "query", "kv", "q_up", "kv_up") if getattr(attention, name, None) is not None}
  attention.clip_logits(largest, tau)
  np.testing.assert_allclose(attention(x, max_logits=True)[1],
                             np.minimum(np.asarray(largest), tau), rtol=1e-5)
  after = {name: np.asarray(getattr(attention, name)[...]) for name in before}
  root = np.sqrt(gamma)
  if kind == "multi_head":  # [D, 3, N, P]: q and k by sqrt(gamma), v as is
    factors = np.stack([root, root, np.ones(4)])[None, :, :, None]
    np.testing.assert_allclose(after["qkv"], before["qkv"] * factors, rtol=1e-6)
  elif kind == "grouped":  # the query by gamma; the shared key heads as they were
    np.testing.assert_allclose(after["query"], before["query"] * gamma[:, None], rtol=1e-6)
    np.testing.assert_array_equal(after["kv"], before["kv"])
  else:  # q_C and k_C by sqrt(gamma), q_R by gamma, v as is (k_R is shared); Pn = 6
    name = "q_up" if "q_up" in before else "query"
    assert after[name].shape[-1] == 10 and after["kv_up"].shape[-1] == 16  # Pn+Pr, Pn+Pv
    np.testing.assert_allclose(after[name][..., :6], before[name][..., :6] * root[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(after[name][..., 6:], before[name][..., 6:] * gamma[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(after["kv_up"][..., :6],
                               before["kv_up"][..., :6] * root[:, None], rtol=1e-6)
    np.testing.assert_array_equal(after["kv_up"][..., 6:], before["kv_up"][..., 6:])
  np.testing.assert_allclose(clip_factors(jnp.array([-2.0, 0.5, 4.0]), 2.0), [1.0, 1.0, 0.5])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_models_qk_clip_gives_each_layer_its_own_factors(scan_layers):
  model = TransformerLM(vocab_size=50, num_layers=3, d_model=32, num_heads=4,
                        moe=dict(num_experts=4, top_k=2, expert_hidden=16, group_by="batch"),
                        scan_layers=scan_layers, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 50)
  _, aux = model(tokens, max_logits=True)
  largest = np.asarray(aux["attention_max_logits"])  # [layers, N]
  assert largest.shape == (3, 4)
  tau = float(np.median(largest))

  def qkv(i):  # a scanned layer's kernel is its unit's slice of the stacked one
    kernel = np.asarray(model.layout.block(model, i).attention.qkv[...])
    unit = model.layout.place(i)[1]
    return kernel if unit is None else kernel[unit]
  before = [qkv(i) for i in range(3)]
  model.clip_logits(aux["attention_max_logits"], tau)
  for i in range(3):
    root = np.sqrt(np.minimum(1.0, tau / largest[i]))
    factors = np.stack([root, root, np.ones(4)])[None, :, :, None]
    np.testing.assert_allclose(qkv(i), before[i] * factors, rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(tau=-1.0), "config.train.qk_clip_tau must be a finite number >= 0"),
    (dict(tau=100.0, qk_norm="head"), "normalizes away"),
    (dict(tau=100.0, lora=4), "keeps frozen"),
])
def test_qk_clip_config_is_checked(overrides, message):
  config = config_lib.default_config()
  config.train.qk_clip_tau = overrides["tau"]
  config.model.qk_norm = overrides.get("qk_norm", "none")
  if "lora" in overrides:
    config.finetune.update(base="/some/run")
    config.finetune.lora.rank = overrides["lora"]
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)
