"""The model options real MoE checkpoints need (issue 25), each against a
reference: grouped-query attention, qk-norm, multi-head latent attention and
its compressed cache, dense layers of their own width, the router's dtype and
logit bias, the gated shared expert. (transformers' own numbers for whole
models are in tests/test_hf.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import routing
from moejax.nn import MoELayer
from moejax.nn.attention import CausalSelfAttention, Rope
from moejax.nn.transformer import TransformerLM
from moejax.scaling import accounting

DROPLESS = dict(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=0.0,
                dispatch="dropless", activation="swiglu")
LATENT = dict(kv_rank=16, q_rank=24, nope=8, rope=8, v=12)


def _params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_grouped_query_attention_equals_repeated_key_value_heads():
  # GQA with K heads computes multi-head attention whose key/value heads are
  # each repeated N / K times (head n reads key/value head n // (N / K)).
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  gqa = CausalSelfAttention(d_model=32, num_heads=4, head_dim=8, num_kv_heads=2,
                            rngs=nnx.Rngs(0))
  mha = CausalSelfAttention(d_model=32, num_heads=4, head_dim=8, rngs=nnx.Rngs(1))
  kv = gqa.kv[...]                                      # [D, 2, K, P]
  mha.qkv[...] = jnp.concatenate([gqa.query[...][:, None], jnp.repeat(kv, 2, axis=2)], axis=1)
  mha.out[...] = gqa.out[...]
  np.testing.assert_allclose(gqa(x), mha(x), atol=1e-6)


@pytest.mark.parametrize("qk_norm", ["head", "projection"])
def test_qk_norm_normalizes_queries_and_keys(qk_norm):
  attention = CausalSelfAttention(d_model=32, num_heads=4, head_dim=8, num_kv_heads=2,
                                  qk_norm=qk_norm, norm_epsilon=1e-5, rngs=nnx.Rngs(0))
  scale = jax.random.normal(jax.random.key(1), attention.query_norm.scale.shape)
  attention.query_norm.scale[...] = scale
  t = jax.random.normal(jax.random.key(2), (5, 4, 8))
  flat = t.reshape(5, -1) if qk_norm == "projection" else t
  rms = jnp.sqrt(jnp.mean(flat ** 2, axis=-1, keepdims=True) + 1e-5)
  expected = (flat / rms * scale).reshape(t.shape)
  np.testing.assert_allclose(attention._normalized(t, attention.query_norm), expected,
                             rtol=1e-5, atol=1e-6)


def _lm(**kwargs):
  moe = {**DROPLESS, **kwargs.pop("moe", {})}
  return TransformerLM(vocab_size=50, num_layers=3, d_model=32, num_heads=4, moe=moe,
                       rngs=nnx.Rngs(0), tie_embeddings=False, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(num_kv_heads=2, qk_norm="head"),
    dict(num_kv_heads=1, qk_norm="projection", rms_norm_eps=1e-5),
    dict(latent=LATENT, first_dense_layers=1, dense_hidden=48,
         rope=dict(interleave=True, yarn_factor=4.0, yarn_original_max_positions=16,
                   yarn_mscale=1.0, yarn_mscale_all_dim=0.8),
         moe=dict(num_shared_experts=1, score_fn="sigmoid", num_groups=2, top_groups=1,
                  renormalize=True, routed_scaling_factor=2.5)),
    dict(latent=dict(LATENT, q_rank=0), moe=dict(num_shared_experts=1,
                                                 shared_expert_gate=True,
                                                 router_logit_bias=True,
                                                 router_dtype="bfloat16")),
])
def test_decoding_in_pieces_equals_the_forward_pass_and_counts_match(kwargs):
  model = _lm(**kwargs)
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, 50)
  logits, _ = model(tokens)
  cache = model.init_cache(2, 8)
  first, cache = model.decode(tokens[:, :4], cache)
  rest, cache = model.decode(tokens[:, 4:], cache)
  np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), logits, atol=2e-5)
  if "latent" in kwargs:  # the compressed cache: latents and the shared rotary key
    assert cache["keys"].shape == (3, 2, 1, 8, 16) and cache["values"].shape == (3, 2, 1, 8, 8)
  else:
    assert cache["keys"].shape[2] == kwargs["num_kv_heads"]
  counts = accounting.param_counts(
      vocab_size=50, num_layers=3, d_model=32, num_heads=4, tie_embeddings=False,
      moe={**DROPLESS, **kwargs.get("moe", {})},
      **{k: v for k, v in kwargs.items() if k not in ("moe", "rope", "rms_norm_eps")})
  assert counts["total"] == _params(model)


def test_dense_hidden_sets_the_dense_layers_width():
  model = _lm(first_dense_layers=1, dense_hidden=48, moe=dict(num_shared_experts=1))
  assert model.layers[0].ffn.ffn.wi_gate.shape == (32, 48)
  assert model.layers[0].ffn.shared is None        # a plain MLP, as DeepSeek-V3's
  assert model.layers[1].ffn.shared.wi_gate.shape == (32, 16)


def test_yarn_frequencies_follow_the_paper():
  # YaRN (Peng et al. 2023): low-frequency dims (fewer than beta_slow turns
  # over the original context) are divided by the factor, high-frequency ones
  # (more than beta_fast turns) kept.
  rope = Rope(base=10000.0, yarn_factor=4.0, yarn_original_max_positions=64,
              yarn_beta_fast=32.0, yarn_beta_slow=1.0)
  plain = np.asarray(Rope(base=10000.0).frequencies(32))
  scaled = np.asarray(rope.frequencies(32))
  turns = 64 * plain / (2 * np.pi)
  np.testing.assert_allclose(scaled[turns > 32], plain[turns > 32], rtol=1e-6)
  np.testing.assert_allclose(scaled[turns < 1], plain[turns < 1] / 4, rtol=1e-6)
  assert rope.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1.0)


def test_router_dtype_and_logit_bias():
  x = jax.random.normal(jax.random.key(0), (1, 16, 32))
  layer = MoELayer(d_model=32, rngs=nnx.Rngs(0), router_logit_bias=True,
                   router_dtype="bfloat16", **DROPLESS)
  bias = jnp.asarray([2.0, -2.0, 0.0, 0.5])
  layer.router.logit_bias[...] = bias
  logits = (jnp.dot(x[0].astype(jnp.bfloat16), layer.router.kernel[...].astype(jnp.bfloat16))
            + bias.astype(jnp.bfloat16)).astype(jnp.float32)
  expected = routing.route(logits[None], router="topk", top_k=2, capacity_factor=0.0,
                           renormalize=True)
  _, aux = layer(x)
  np.testing.assert_array_equal(aux["first_expert"][0], expected.first_expert()[0])
  for router in ("hash", "soft_moe"):
    with pytest.raises(ValueError, match="select on learned logits"):
      MoELayer(d_model=32, rngs=nnx.Rngs(0), router=router, router_logit_bias=True,
               num_experts=4, top_k=1, expert_hidden=16, capacity_factor=1.0)


def test_gated_shared_expert():
  # Qwen2-MoE: y = routed + sigmoid(x w) * shared(x).
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  options = dict(DROPLESS, num_shared_experts=1)
  gated = MoELayer(d_model=32, rngs=nnx.Rngs(0), shared_expert_gate=True, **options)
  plain = MoELayer(d_model=32, rngs=nnx.Rngs(0), **options)
  nnx.update(plain, nnx.state(gated, nnx.Not(nnx.PathContains("shared_gate"))))
  tokens = x.reshape(-1, 32)
  shared = gated.shared(tokens).reshape(2, 5, 32)
  gate = jax.nn.sigmoid(tokens @ gated.shared_gate[...]).reshape(2, 5, 1)
  np.testing.assert_allclose(gated(x)[0], plain(x)[0] - shared + gate * shared, atol=1e-5)
  with pytest.raises(ValueError, match="needs num_shared_experts"):
    MoELayer(d_model=32, rngs=nnx.Rngs(0), shared_expert_gate=True, **DROPLESS)


def test_latent_and_grouped_attention_on_an_fsdp_mesh():
  # 8 host devices, fsdp 2 x expert 2 x model 2: MLA's up projections are
  # split over "fsdp" along their latent width (they have no model width) and
  # over "model" along the heads, GQA's kv kernel along D; the logits are one
  # device's, and so is MLA's QK-clip (`clip_logits`) of the split heads.
  import os, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = """
import jax, jax.numpy as jnp
from flax import nnx
from moejax import parallel
from moejax.nn.transformer import TransformerLM
moe = dict(num_experts=8, top_k=2, expert_hidden=16, capacity_factor=0.0,
           dispatch="dropless", activation="swiglu", num_shared_experts=1)
tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, 64)
mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "expert": 2, "model": 2})
for extra in (dict(latent=dict(kv_rank=16, q_rank=24, nope=8, rope=8, v=12)),
              dict(num_kv_heads=2, qk_norm="head")):
  model = TransformerLM(vocab_size=64, num_layers=1, d_model=32, num_heads=4, moe=moe,
                        rngs=nnx.Rngs(0), tie_embeddings=False, **extra)
  want, aux = model(tokens, max_logits=True)
  clip = "latent" in extra
  if clip:
    clipped = nnx.clone(model)
    clipped.clip_logits(aux["attention_max_logits"], 1.0)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, parallel.param_shardings(state, mesh))
  specs = {"/".join(map(str, p)): x.sharding.spec for p, x in nnx.to_flat_state(state)}
  split = [p for p in specs if p.endswith(("q_up", "kv_up", "attention/kv"))]
  assert split and all(specs[p][0] == "fsdp" for p in split), specs
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
  def step(s, t):
    split_model = nnx.merge(graphdef, s)
    logits, aux = split_model(t, max_logits=True)
    if clip:
      split_model.clip_logits(aux["attention_max_logits"], 1.0)
    return logits, nnx.state(split_model)
  with parallel.activate(mesh):
    got, state = jax.jit(step)(state, jax.device_put(tokens, batch))
  print(float(jnp.abs(got - want).max()))
  if clip:
    print(max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(clipped)))))
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert all(float(line) < 1e-5 for line in done.stdout.split())


def test_sqrtsoftplus_routing_matches_its_formula():
  # DeepSeek-V4's scores: s = sqrt(softplus(logits)); selection on s + bias
  # (within the best groups), weights the unbiased s of the picks, normalized
  # over the K, times the routed scaling factor.
  rng = np.random.default_rng(0)
  for case in range(20):
    logits = rng.normal(size=(2, 16, 8)).astype(np.float32) * 3
    bias = rng.normal(size=8).astype(np.float32) * (case % 2)
    groups = 2 if case % 3 else 1
    routed = routing.route(jnp.asarray(logits), router="topk", top_k=2,
                           score_fn="sqrtsoftplus", bias=jnp.asarray(bias), renormalize=True,
                           routed_scaling_factor=2.5, num_groups=groups,
                           top_groups=1 if groups > 1 else 1, capacity_factor=0.0)
    scores = np.sqrt(np.log1p(np.exp(logits.astype(np.float64))))
    select = scores + bias
    if groups > 1:  # a group's score: the sum of its two best biased scores
      grouped = select.reshape(2, 16, groups, 8 // groups)
      best = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
      keep = np.argmax(best, axis=-1)[..., None, None] == np.arange(groups)[:, None]
      select = np.where(keep, grouped, -np.inf).reshape(select.shape)
    picks = np.argsort(-select, axis=-1, kind="stable")[..., :2]
    weights = np.take_along_axis(scores, picks, axis=-1)
    weights = weights / weights.sum(-1, keepdims=True) * 2.5
    first = np.asarray(routed.first_expert())
    np.testing.assert_array_equal(first, picks[..., 0])
    combine = np.asarray(routed.combine_weights())
    dense = np.zeros(scores.shape)
    np.put_along_axis(dense, picks, weights, axis=-1)
    np.testing.assert_allclose(combine, dense, atol=1e-5)
