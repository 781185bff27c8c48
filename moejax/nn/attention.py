"""Causal multi-head self-attention with rotary position embeddings.

Multi-head (every query head has its own key and value head) or grouped-query
attention (GQA, Ainslie et al. 2023: K key/value heads, each shared by N / K
consecutive query heads), with an optional RMSNorm of queries and keys
(`QK_NORMS`).

Letters: B batch, L sequence (queries), M sequence (keys), N heads, K
key/value heads, G = N / K query heads per key/value head, P head dim, D
model width, T = B*L tokens. Kernels (stored in float32 or bfloat16) are cast
to the compute dtype at use; the softmax is always float32.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, PartitionSpec

from moejax.parallel.rules import gather_fsdp

# RMSNorm of queries and keys before RoPE: "head" normalizes each head's P
# features (one [P] scale: Qwen3), "projection" a token's whole query (N P)
# and key (K P) projections (OLMoE).
QK_NORMS = ("none", "head", "projection")


def explicit_spec(x: jax.Array) -> Optional[PartitionSpec]:
  """The PartitionSpec in the type of `x` on a mesh with Explicit axes
  (sharding in types), one entry per dimension; None otherwise (no mesh, or
  an Auto mesh, where GSPMD propagates shardings and ops take no annotation;
  or no ambient mesh to name axes in, as when `moejax.train.lora` traces a
  replicated model as on one device).
  """
  if jax.sharding.get_abstract_mesh().empty:
    return None
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  spec = tuple(sharding.spec)
  return PartitionSpec(*spec, *[None] * (x.ndim - len(spec)))


def cache_like(cache: jax.Array, update: jax.Array) -> jax.Array:
  """`cache` [B, N, M, P] in the layout of `update` [B, N, L, P] on an
  Explicit mesh (where `dynamic_update_slice` needs both alike); as is
  otherwise."""
  spec = explicit_spec(update)
  if spec is None or explicit_spec(cache) == spec:
    return cache
  return jax.sharding.reshard(cache, spec)


def weight(param, dtype) -> jax.Array:
  """A kernel parameter's value in the compute `dtype`, cast only when its
  storage differs. Kernels enter their matmul as this value, unsliced and
  unreshaped, so that qwix's interception (LoRA, PTQ: `moejax.train.lora`)
  recognises the parameter; a weight qwix has quantized (a `WithAux` in
  place of the variable) passes through as is, for qwix to find. A weight
  split over the "fsdp" mesh axis is gathered here, for this layer's use.
  """
  if not isinstance(param, nnx.Variable):
    return param
  value = gather_fsdp(param[...])
  return value if getattr(value, "dtype", dtype) == dtype else value.astype(dtype)




def rms_norm(features: int, epsilon: float, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """An RMSNorm over the last axis (`features` wide) with a float32 scale;
  it normalizes in float32 whatever the compute dtype (consumers cast)."""
  return nnx.RMSNorm(features, epsilon=epsilon, dtype=jnp.float32,
                     param_dtype=jnp.float32, rngs=rngs)


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """<float32>[P/2] rotation frequencies theta_i = base^(-2i/P).

  RoFormer (Su et al. 2021), eq. 15.
  """
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return base ** -exponents


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature term 0.1 mscale ln(factor) + 1 (Peng et al.
  2023, eq. 21; 1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding options: the base, the pair layout, and YaRN.

  interleave: pairs are adjacent features (2i, 2i+1) (RoFormer eq. 34,
    DeepSeek's checkpoints) rather than (i, i + P/2) (GPT-NeoX / Llama). The
    two are the same map up to a fixed permutation of a head's features, so
    an interleaved head is de-interleaved (evens, then odds) and rotated as
    halves: q.k is unchanged, and so are the logits.
  yarn_factor > 0: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window
    Extension", §3.2-3.4): frequencies with fewer than beta_slow rotations
    over the original context are interpolated (divided by the factor), those
    with more than beta_fast kept, a linear ramp between; cos and sin are
    scaled by mscale(factor, yarn_mscale) / mscale(factor, yarn_mscale_all_dim)
    (eq. 21; transformers' `_compute_yarn_parameters`).
  """
  base: float = 10000.0
  interleave: bool = False
  yarn_factor: float = 0.0
  yarn_original_max_positions: int = 0
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 0.0

  def frequencies(self, dim: int) -> jax.Array:
    """<float32>[dim/2] rotation frequencies of a `dim`-wide rotary part."""
    if not self.yarn_factor:
      return rope_frequencies(dim, self.base)
    rope_frequencies(dim, self.base)  # validates dim
    pos_freqs = self.base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(self.yarn_factor) * pos_freqs)

    def correction_dim(rotations):  # the feature index that turns `rotations` times
      return (dim * math.log(self.yarn_original_max_positions / (rotations * 2 * math.pi))
              / (2 * math.log(self.base)))
    low = max(math.floor(correction_dim(self.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(self.yarn_beta_slow)), dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (high frequencies)
    return jnp.asarray(interpolation * (1 - keep) + extrapolation * keep, jnp.float32)

  @property
  def attention_factor(self) -> float:
    """The factor on cos and sin (1 without YaRN)."""
    if not self.yarn_factor:
      return 1.0
    if self.yarn_mscale and self.yarn_mscale_all_dim:
      return (yarn_mscale(self.yarn_factor, self.yarn_mscale)
              / yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim))
    return yarn_mscale(self.yarn_factor)

  @property
  def softmax_factor(self) -> float:
    """The factor on MLA's softmax scale: mscale(factor, mscale_all_dim)^2
    (DeepSeek-V2's reference code; 1 without YaRN)."""
    if not (self.yarn_factor and self.yarn_mscale_all_dim):
      return 1.0
    return yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0, *,
               rope: Optional[Rope] = None) -> jax.Array:
  """Rotates query or key vectors by their positions (RoFormer, Su et al. 2021).

  Feature i of the first half and feature i of the second half of each head
  form a pair rotated by the angle position * theta_i (the "rotate half"
  layout of GPT-NeoX / LLaMA; RoFormer eq. 34 pairs adjacent features, which
  is the same map up to a fixed permutation of the head's features: `Rope`'s
  interleave). Hence <rope(q, m), rope(k, n)> depends on m and n only
  through m - n (eq. 16).

  Args:
    x: [..., L, N, P] queries or keys.
    positions: <int>[L] or [..., L] position of each token.
    base: the RoPE base (10000 in RoFormer), when `rope` is not given.
    rope: the full options (layout, YaRN); overrides `base`.

  Returns:
    [..., L, N, P], same dtype as x (the rotation is done in float32); with
    interleave, in the de-interleaved feature order (evens, then odds).
  """
  rope = rope or Rope(base=base)
  if rope.interleave:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  half = x.shape[-1] // 2
  angles = positions.astype(jnp.float32)[..., None] * rope.frequencies(x.shape[-1])
  cos = jnp.cos(angles)[..., None, :]  # [..., L, 1, P/2], broadcast over heads
  sin = jnp.sin(angles)[..., None, :]
  if rope.attention_factor != 1.0:
    cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, max_logits: bool = False):
  """softmax(q k^T / sqrt(P) + causal mask) v, heads-major.

  Args:
    q: [B, N, L, P] (head axis before the sequence axis).
    k, v: [B, N, L, P], or [B, K, L, P] with K dividing N (grouped-query:
      query head n reads key/value head n // (N / K)).

  Returns:
    [B, N, L, P] in the dtype of v; with `max_logits` also <float32>[N]
    (see `_attend`).

  An explicit masked einsum in heads-major layout: on XLA:CPU (B=32, L=128,
  N=4, P=32, float32, 2 cores) it took 8.2 ms forward and 21.9 ms forward +
  backward, against 10.8 ms and 47.3 ms for
  `jax.nn.dot_product_attention(..., is_causal=True)` (its [B, L, N, P]
  layout) and 25 ms / 23 ms for the same einsum in [B, L, N, P] layout.
  """
  length = q.shape[-2]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # key m <= query l
  return _attend(q, k, v, causal, max_logits=max_logits)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
            scale: Optional[float] = None, max_logits: bool = False):
  """softmax(q k^T * scale, keys where `visible` <bool>[L, M]) v; scale
  defaults to 1 / sqrt(P).

  q [B, N, L, P]; k [B, K, M, P], v [B, K, M, P'] -> [B, N, L, P'] in v's dtype. With
  K < N the query heads are viewed as [B, K, G, L, P] (head n = k G + g, the
  order of Hugging Face's `repeat_kv`), so no key or value is copied.
  With `max_logits`, returns (context, <float32>[N]): each head's largest
  visible logit q.k * scale over the batch (QK-clip's S_max, `clip_factors`).
  """
  batch, num_heads, length, head_dim = q.shape
  groups = num_heads // k.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)) if scale is None else jnp.float32(scale)
  heads, kv_heads = ("n", "n") if groups == 1 else ("kg", "k")
  if groups > 1:
    q = q.reshape(batch, k.shape[1], groups, length, head_dim)
  scores = jnp.einsum(f"b{heads}lp,b{kv_heads}mp->b{heads}lm", q, k).astype(jnp.float32)
  scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  context = jnp.einsum(f"b{heads}lm,b{kv_heads}mp->b{heads}lp", weights, v)
  context = context.reshape(batch, num_heads, length, v.shape[-1])  # GQA: merge k, g
  if not max_logits:
    return context
  # Every query sees at least itself, so no head's max is a masked entry.
  return context, jnp.max(scores, axis=(0, -2, -1)).reshape(num_heads)


def clip_factors(max_logits: jax.Array, tau: float) -> jax.Array:
  """QK-clip's per-head factor gamma_h = min(1, tau / S_max^h) (Kimi K2,
  arXiv 2507.20534, §2.1): <float32>[N], 1 where the head's largest logit
  S_max^h (`_attend`'s max_logits) is at most tau. Scaling the head's query
  and key weights so that their product shrinks by gamma_h scales every
  logit of that head by gamma_h, capping the largest at tau."""
  max_logits = max_logits.astype(jnp.float32)
  return jnp.where(max_logits > tau, tau / jnp.maximum(max_logits, tau), 1.0)


def _rescaled(param: nnx.Param, factors: jax.Array) -> None:
  """param <- param * factors (broadcast), computed in float32 and stored in
  the parameter's dtype."""
  value = param[...]
  param.set_value((value.astype(jnp.float32) * factors).astype(value.dtype))


class CausalSelfAttention(nnx.Module):
  """Multi-head or grouped-query causal self-attention with RoPE on queries
  and keys.

  Parameters (no biases, as in PaLM / LLaMA): multi-head (K = N), `qkv`
  <float32>[D, 3, N, P] (query, key, value projections); grouped-query
  (K < N), `query` [D, N, P] and `kv` [D, 2, K, P]; and `out` [N, P, D].
  With qk_norm, `query_norm` and `key_norm` RMSNorm scales ([P] per head, or
  [N P] and [K P] over the projection).
  """

  def __init__(self, *, d_model: int, num_heads: int, head_dim: int,
               rope_base: float = 10000.0, dtype=jnp.float32, rngs: nnx.Rngs,
               num_kv_heads: Optional[int] = None, qk_norm: str = "none",
               norm_epsilon: float = 1e-6, rope: Optional[Rope] = None):
    rope = rope or Rope(base=rope_base)
    rope_frequencies(head_dim, rope.base)  # validates head_dim
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int)
        or num_kv_heads < 1 or num_heads % num_kv_heads):
      raise ValueError(f"num_kv_heads must be a positive integer dividing num_heads="
                       f"{num_heads}, got {num_kv_heads!r}")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {qk_norm!r}")
    self.d_model = d_model
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope = rope
    self.qk_norm = qk_norm
    self.dtype = dtype
    # Fan-in scaling over the contracted axes (D for the projections, N*P for out).
    def projection(*shape):
      init = nnx.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=tuple(range(1, len(shape))))
      return nnx.Param(init(rngs.params(), shape, jnp.float32))

    self.qkv = self.query = self.kv = nnx.data(None)
    if num_kv_heads == num_heads:
      self.qkv = projection(d_model, 3, num_heads, head_dim)
    else:
      self.query = projection(d_model, num_heads, head_dim)
      self.kv = projection(d_model, 2, num_kv_heads, head_dim)
    out_init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    self.out = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, d_model),
                                  jnp.float32))
    self.query_norm = self.key_norm = nnx.data(None)
    if qk_norm != "none":
      per_head = qk_norm == "head"
      self.query_norm = rms_norm(head_dim if per_head else num_heads * head_dim,
                                 norm_epsilon, rngs)
      self.key_norm = rms_norm(head_dim if per_head else num_kv_heads * head_dim,
                               norm_epsilon, rngs)

  def __call__(self, x: jax.Array, *, max_logits: bool = False):
    """[B, L, D] -> [B, L, D] in `dtype`; position l attends to positions <= l.
    With `max_logits`, returns (y, <float32>[N] each head's largest logit),
    what `clip_logits` takes.

    Under a mesh that splits the heads (N over "model") every step keeps them
    split. On an Explicit mesh (sharding in types) a reshape may split or merge
    one axis only, and only if a merged axis's sharding sits on its leading
    part: the projections are einsums over the parameters' own shapes, and
    only the token axis T = B*L is split or merged.
    """
    length = x.shape[1]
    q, k, v, tokens = self._project(x, jnp.arange(length, dtype=jnp.int32))
    if not max_logits:
      return self._output(causal_attention(q, k, v), tokens, x.shape)
    context, largest = causal_attention(q, k, v, max_logits=True)
    return self._output(context, tokens, x.shape), largest

  def clip_logits(self, max_logits: jax.Array, tau: float) -> None:
    """QK-clip (Kimi K2, arXiv 2507.20534, §2.1), after an optimizer step:
    head h's logits shrink by gamma_h = `clip_factors(max_logits, tau)`.
    Multi-head: the head's query and key kernels each by sqrt(gamma_h), as
    Kimi does. Grouped-query: the query kernel by gamma_h (a key head serves
    G query heads, which may need different factors). Refused with qk_norm,
    which normalizes the projections (and bounds the logits itself)."""
    if self.query_norm is not None:
      raise ValueError(f"QK-clip rescales the query and key kernels, which qk_norm="
                       f"{self.qk_norm!r} normalizes away; use one of the two")
    gamma = clip_factors(max_logits, tau)  # [N]
    if self.qkv is not None:
      root = jnp.sqrt(gamma)
      _rescaled(self.qkv, jnp.stack([root, root, jnp.ones_like(root)])[:, :, None])
    else:
      _rescaled(self.query, gamma[:, None])

  def cache_shapes(self, batch: int, max_length: int):
    """Shapes of the (keys, values) decode cache: [B, K, M, P] each."""
    shape = (batch, self.num_kv_heads, max_length, self.head_dim)
    return shape, shape

  def decode(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], index: jax.Array
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of L new tokens at positions index .. index + L - 1 over a
    key/value cache.

    Args:
      x: [B, L, D] the new tokens' inputs.
      cache: (keys, values), each [B, K, M, P] (M >= index + L), holding the
        rotated keys and the values of positions < index.
      index: <int32>[] the position of x's first token.

    Returns:
      ([B, L, D] in `dtype`, the cache with positions index .. index + L - 1
      written). Position index + l attends to cached positions <= index + l,
      so decoding a sequence in pieces computes what `__call__` computes on
      the whole sequence.

    On an Explicit mesh the returned cache is laid out like the new keys (B
    as the tokens, N split over "model" like the heads); a cache in another
    layout (an empty one made replicated) is resharded to it first, which
    for a replicated one is a local slice.
    """
    length = x.shape[1]
    positions = index + jnp.arange(length, dtype=jnp.int32)
    q, k, v, tokens = self._project(x, positions)
    keys, values = (cache_like(part, k) for part in cache)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, index, 0))
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, index, 0))
    visible = jnp.arange(keys.shape[2])[None, :] <= positions[:, None]  # [L, M]
    context = _attend(q, keys.astype(q.dtype), values.astype(v.dtype), visible)
    return self._output(context, tokens, x.shape), (keys, values)

  def _project(self, x: jax.Array, positions: jax.Array):
    """q [B, N, L, P] and k, v [B, K, L, P] (q and k normalized if qk_norm,
    then rotated to `positions`), and x as [T, D]."""
    batch, length, d_model = x.shape
    tokens = x.reshape(batch * length, d_model).astype(self.dtype)  # [T, D]
    # One einsum on each parameter itself (no slicing or reshaping of it), so
    # that a weight interceptor (qwix LoRA / PTQ, moejax.train.lora) sees the
    # `qkv` parameter as the operand: q, k and v then get their own LoRA B.
    # Forward+backward ran as fast as the three 2-D dots it replaced: 47-51
    # vs 46-48 ms (best of 30; B=32, L=128, D=128, N=4, float32, 2 cores).
    # Named "qkv", kept by remat="save_matmuls".
    if self.qkv is not None:
      qkv = checkpoint_name(jnp.einsum("td,dcnp->tcnp", tokens, weight(self.qkv, self.dtype)),
                            "qkv")  # [T, 3, N, P]
      q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
      q = checkpoint_name(jnp.einsum("td,dnp->tnp", tokens, weight(self.query, self.dtype)),
                          "qkv")  # [T, N, P]
      kv = checkpoint_name(jnp.einsum("td,dcnp->tcnp", tokens, weight(self.kv, self.dtype)),
                           "qkv")  # [T, 2, K, P]
      k, v = kv[:, 0], kv[:, 1]
    if self.query_norm is not None:
      q, k = self._normalized(q, self.query_norm), self._normalized(k, self.key_norm)

    def heads(t):  # [T, heads, P] -> [B, L, heads, P]
      return t.reshape(batch, length, t.shape[1], self.head_dim)

    q = apply_rope(heads(q), positions, rope=self.rope)  # [B, L, N, P]
    k = apply_rope(heads(k), positions, rope=self.rope)  # [B, L, K, P]
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, heads(v)))  # heads-major
    return q, k, v, tokens

  def _normalized(self, t: jax.Array, norm: nnx.RMSNorm) -> jax.Array:
    """[T, heads, P] through qk_norm's RMSNorm (over P, or over heads x P),
    normalized in float32, returned in t's dtype."""
    if self.qk_norm == "head":
      return norm(t).astype(t.dtype)
    flat = norm(t.reshape(t.shape[0], -1))
    return flat.reshape(t.shape).astype(t.dtype)

  def _output(self, context: jax.Array, tokens: jax.Array, shape) -> jax.Array:
    """[B, N, L, P] attention context -> [B, L, D] through the out projection."""
    batch, length, d_model = shape
    context = jnp.swapaxes(context, 1, 2)  # [B, L, N, P]
    context = context.reshape(batch * length, self.num_heads, self.head_dim)
    # With split heads the einsum sums partial products over the "model"
    # devices; an Explicit mesh needs its output typed (laid out like the tokens).
    y = jnp.einsum("tnp,npd->td", context, weight(self.out, self.dtype),
                   out_sharding=explicit_spec(tokens))
    return y.reshape(batch, length, d_model)


class LatentAttention(nnx.Module):
  """Multi-head latent attention (MLA: DeepSeek-V2, arXiv 2405.04434, §2.1;
  DeepSeek-V3), causal, with decoupled RoPE.

  Per token: a query (full, or from a compressed latent of width Rq), and one
  latent c of width Rkv plus one rotary key k_R of width Pr shared by every
  head. Keys are [k_C(c), k_R], values v_C(c), per head:

      q = W_q x  or  W_qU norm(W_qD x)      [N, Pn + Pr] (Pr rotated)
      [c, k_R] = W_kvD x;  c = norm(c)       [Rkv], [Pr] (rotated)
      [k_C, v] = W_kvU c                     [N, Pn], [N, Pv]

  The decode cache holds only c and the rotated k_R ([B, 1, M, Rkv] and
  [B, 1, M, Pr]: (Rkv + Pr) / (2 N P) of a multi-head cache); keys and values
  are rebuilt from it at each step.

  Parameters: `query` [D, N, Pn + Pr] or `q_down` [D, Rq], `q_norm`, `q_up`
  [Rq, N, Pn + Pr]; `kv_down` [D, Rkv + Pr], `kv_norm`, `kv_up` [Rkv, N,
  Pn + Pv]; `out` [N, Pv, D]. The softmax scale is 1 / sqrt(Pn + Pr), times
  YaRN's mscale(factor, mscale_all_dim)^2 when set (`Rope.softmax_factor`).
  """

  def __init__(self, *, d_model: int, num_heads: int, kv_rank: int, q_rank: int, nope: int,
               rope: int, v: int, rope_options: Optional[Rope] = None, dtype=jnp.float32,
               norm_epsilon: float = 1e-6, rngs: nnx.Rngs):
    self.rope = rope_options or Rope()
    rope_frequencies(rope, self.rope.base)  # validates the rotary width
    self.d_model, self.num_heads, self.dtype = d_model, num_heads, dtype
    self.kv_rank, self.q_rank, self.nope, self.rope_dim, self.v_dim = (
        kv_rank, q_rank, nope, rope, v)

    def kernel(*shape, inputs=1):
      init = nnx.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=tuple(range(inputs)),
          out_axis=tuple(range(inputs, len(shape))))
      return nnx.Param(init(rngs.params(), shape, jnp.float32))

    self.query = self.q_down = self.q_norm = self.q_up = nnx.data(None)
    if q_rank:
      self.q_down = kernel(d_model, q_rank)
      self.q_norm = rms_norm(q_rank, norm_epsilon, rngs)
      self.q_up = kernel(q_rank, num_heads, nope + rope)
    else:
      self.query = kernel(d_model, num_heads, nope + rope)
    self.kv_down = kernel(d_model, kv_rank + rope)
    self.kv_norm = rms_norm(kv_rank, norm_epsilon, rngs)
    self.kv_up = kernel(kv_rank, num_heads, nope + v)
    self.out = kernel(num_heads, v, d_model, inputs=2)

  def cache_shapes(self, batch: int, max_length: int):
    """Shapes of the decode cache: (latents [B, 1, M, Rkv], rotated shared
    keys [B, 1, M, Pr])."""
    return (batch, 1, max_length, self.kv_rank), (batch, 1, max_length, self.rope_dim)

  def __call__(self, x: jax.Array, *, max_logits: bool = False):
    """[B, L, D] -> [B, L, D] in `dtype`; position l attends to positions <= l.
    With `max_logits`, (y, <float32>[N]) as `CausalSelfAttention`'s."""
    length = x.shape[1]
    q, latent, k_rope, tokens = self._project(x, jnp.arange(length, dtype=jnp.int32))
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return self._attend(q, latent, k_rope, causal, tokens, x.shape, max_logits)

  def clip_logits(self, max_logits: jax.Array, tau: float) -> None:
    """QK-clip for MLA (Kimi K2, arXiv 2507.20534, §2.1): head h's logit
    q_C.k_C + q_R.k_R shrinks by gamma_h = `clip_factors(max_logits, tau)`
    with q_C and k_C each scaled by sqrt(gamma_h) and q_R by gamma_h; the
    rotary key k_R, shared by every head, is untouched. q_C and q_R are the
    head's first Pn and last Pr columns of `query` (or `q_up`), k_C the first
    Pn of `kv_up`."""
    gamma = clip_factors(max_logits, tau)[:, None]  # [N, 1]
    root = jnp.sqrt(gamma)
    # [N, Pn + Pr] and [N, Pn + Pv] factors by broadcasting (laid out like the
    # heads when they are split over "model"; a concatenation would mix layouts).
    no_pe = lambda width: jnp.arange(width) < self.nope  # noqa: E731
    query = self.query if self.query is not None else self.q_up
    _rescaled(query, jnp.where(no_pe(self.nope + self.rope_dim), root, gamma))
    _rescaled(self.kv_up, jnp.where(no_pe(self.nope + self.v_dim), root, 1.0))

  def decode(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], index: jax.Array):
    """As `CausalSelfAttention.decode`, with the compressed cache
    (`cache_shapes`)."""
    length = x.shape[1]
    positions = index + jnp.arange(length, dtype=jnp.int32)
    q, latent, k_rope, tokens = self._project(x, positions)
    latents, rotary = (cache_like(part, new) for part, new in zip(cache, (latent, k_rope)))
    latents = jax.lax.dynamic_update_slice(latents, latent.astype(latents.dtype),
                                           (0, 0, index, 0))
    rotary = jax.lax.dynamic_update_slice(rotary, k_rope.astype(rotary.dtype), (0, 0, index, 0))
    visible = jnp.arange(latents.shape[2])[None, :] <= positions[:, None]  # [L, M]
    y = self._attend(q, latents.astype(q.dtype), rotary.astype(q.dtype), visible, tokens,
                     x.shape)
    return y, (latents, rotary)

  def _project(self, x: jax.Array, positions: jax.Array):
    """q [B, N, L, Pn + Pr] (rotary part rotated), the normalized latents
    [B, 1, L, Rkv] and rotated shared keys [B, 1, L, Pr], and x as [T, D]."""
    batch, length, d_model = x.shape
    tokens = x.reshape(batch * length, d_model).astype(self.dtype)
    if self.query is not None:
      q = jnp.einsum("td,dnp->tnp", tokens, weight(self.query, self.dtype))
    else:
      q_latent = jnp.dot(tokens, weight(self.q_down, self.dtype))
      q_latent = self.q_norm(q_latent).astype(self.dtype)
      q = jnp.einsum("tr,rnp->tnp", q_latent, weight(self.q_up, self.dtype))
    q = checkpoint_name(q, "qkv")
    compressed = checkpoint_name(jnp.dot(tokens, weight(self.kv_down, self.dtype)), "qkv")
    latent = self.kv_norm(compressed[:, :self.kv_rank]).astype(self.dtype)  # [T, Rkv]
    q = q.reshape(batch, length, self.num_heads, -1)
    q_rope = apply_rope(q[..., self.nope:], positions, rope=self.rope)
    q = jnp.concatenate([q[..., :self.nope], q_rope], axis=-1)
    k_rope = apply_rope(compressed[:, self.kv_rank:].reshape(batch, length, 1, self.rope_dim),
                        positions, rope=self.rope)  # [B, L, 1, Pr]
    latent = latent.reshape(batch, length, 1, self.kv_rank)
    return (jnp.swapaxes(q, 1, 2), jnp.swapaxes(latent, 1, 2), jnp.swapaxes(k_rope, 1, 2),
            tokens)

  def _attend(self, q, latents, k_rope, visible, tokens, shape, max_logits: bool = False):
    """Attention of q over the keys and values rebuilt from latents [B, 1, M,
    Rkv] and k_rope [B, 1, M, Pr] -> [B, L, D] (and with `max_logits` each
    head's largest logit <float32>[N])."""
    batch, length, d_model = shape
    kv = jnp.einsum("bmr,rnp->bnmp", latents[:, 0], weight(self.kv_up, self.dtype))
    k_nope, v = kv[..., :self.nope], kv[..., self.nope:]  # [B, N, M, Pn], [B, N, M, Pv]
    # The shared rotary key, copied to every head, laid out like the heads
    # (split over "model" on an Explicit mesh, where concatenation needs both alike).
    shared = cache_like(jnp.broadcast_to(k_rope, k_nope.shape[:3] + (self.rope_dim,)), k_nope)
    k = jnp.concatenate([k_nope, shared], axis=-1)
    scale = (self.nope + self.rope_dim) ** -0.5 * self.rope.softmax_factor
    context = _attend(q, k, v, visible, scale, max_logits)  # [B, N, L, Pv]
    context, largest = context if max_logits else (context, None)
    context = jnp.swapaxes(context, 1, 2).reshape(batch * length, self.num_heads, self.v_dim)
    y = jnp.einsum("tnp,npd->td", context, weight(self.out, self.dtype),
                   out_sharding=explicit_spec(tokens))
    y = y.reshape(batch, length, d_model)
    return (y, largest) if max_logits else y
