"""Decoder-only Transformer LM with dense and MoE feed-forward layers.

    tokens -> embed -> [RMSNorm -> causal attention (RoPE) -> +residual,
                        RMSNorm -> MoE or dense FFN -> +residual] x num_layers
           -> RMSNorm -> output projection (tied to the embedding or not) -> logits

Pre-norm blocks with RMSNorm and no biases (as in T5 / PaLM / LLaMA). The
residual stream and the norms stay float32; attention and FFN matmuls compute
in `dtype` (float32 or bfloat16) from float32 parameters; routers and logits
are float32.

Letters: B batch, L sequence, D model width, V vocabulary, N heads, P head dim.
"""

import math
import os
import sys
import warnings
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from moejax import routing as routing_lib
from moejax.nn.attention import CausalSelfAttention, explicit_spec
from moejax.nn.moe_layer import MoELayer
from moejax.routing import MoEConfig

# Router metrics averaged over the MoE layers into the LM's aux (scalars only;
# the per-expert `expert_load` vectors are left out).
ROUTER_METRICS = ("dropped_fraction", "load_max_over_mean", "router_entropy",
                  "unrouted_fraction", "bias_norm", "router_logit_max")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_RMS_EPSILON = 1e-6


class NonCausalRoutingWarning(UserWarning):
  """A decoder's MoE routing lets a token's output depend on later tokens."""


def _user_stacklevel() -> int:
  """`warnings.warn` stacklevel of the first caller outside moejax.nn and flax
  (nnx calls __init__ through its own frames)."""
  internal = (os.path.dirname(flax.__file__), os.path.dirname(__file__))
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_code.co_filename.startswith(internal):
    frame, level = frame.f_back, level + 1
  return level


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def moe_layer_flags(*, num_layers: int, moe_every: int = 1, first_dense_layers: int = 0,
                    router: str = MoEConfig.router) -> tuple[bool, ...]:
  """Which layers have an MoE FFN (True) rather than a dense FFN (False).

  The layout rule: layer i (0-based, from the embedding up) is MoE iff
      the router routes (not "dense") and i >= first_dense_layers
      and (i - first_dense_layers) % moe_every == moe_every - 1.
  moe_every=1: every layer above the first_dense_layers dense ones is MoE.
  moe_every=2: every other one, starting with the second (dense, MoE, dense,
  MoE, ...: GShard, Lepikhin et al. 2020, §2, replaces "every other FFN
  layer"), so each MoE layer follows a dense one. first_dense_layers keeps the
  bottom layers dense (DeepSeekMoE, Dai et al. 2024, keeps layer 0's FFN dense).
  """
  _check_int("num_layers", num_layers, 1)
  _check_int("moe_every", moe_every, 1)
  _check_int("first_dense_layers", first_dense_layers, 0)
  if first_dense_layers > num_layers:
    raise ValueError(f"first_dense_layers={first_dense_layers} must be in "
                     f"[0, num_layers={num_layers}]")
  routed = routing_lib.get_router(router).routed
  return tuple(routed and i >= first_dense_layers
               and (i - first_dense_layers) % moe_every == moe_every - 1
               for i in range(num_layers))


def noncausal_routing_reason(moe: Any, tokens_per_group: Optional[int] = None
                             ) -> Optional[str]:
  """Why routing with these MoE options is not causal in a decoder, or None.

  A router that compares the tokens of a group lets a token's output depend on
  later positions of its sequence when groups are sequences (Wang et al. 2024,
  "Auxiliary-Loss-Free Load Balancing", §5.2, on Expert Choice). With
  group_by="batch" a group holds the tokens at one position, which is causal.
  Each router declares its own rule (`Router.noncausal_reason`).
  """
  cfg = MoEConfig.from_mapping(moe)
  cls = routing_lib.get_router(cfg.router)
  if not cls.routed:
    return None
  return cls.noncausal_reason(cfg, tokens_per_group or cfg.group_size)


def _rms_norm(d_model: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
  # Normalizes in float32 whatever the compute dtype: the consumers cast (the
  # router keeps float32, attention and experts cast to `dtype`).
  return nnx.RMSNorm(d_model, epsilon=_RMS_EPSILON, dtype=jnp.float32,
                     param_dtype=jnp.float32, rngs=rngs)


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attention(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, *, d_model: int, num_heads: int, head_dim: int,
               moe: MoEConfig, rope_base: float, dtype, rngs: nnx.Rngs,
               tokens_per_group: Optional[int] = None):
    self.attention_norm = _rms_norm(d_model, rngs)
    self.attention = CausalSelfAttention(d_model=d_model, num_heads=num_heads,
                                         head_dim=head_dim, rope_base=rope_base,
                                         dtype=dtype, rngs=rngs)
    self.ffn_norm = _rms_norm(d_model, rngs)
    self.ffn = MoELayer(d_model=d_model, moe=moe, tokens_per_group=tokens_per_group,
                        dtype=dtype, rngs=rngs)
    self.is_moe = self.ffn.routed

  def __call__(self, x: jax.Array, *, deterministic: bool, rng: Optional[jax.Array],
               token_ids: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """<float32>[B, L, D] -> (<float32>[B, L, D], the FFN's aux)."""
    x = x + self.attention(self.attention_norm(x)).astype(jnp.float32)
    y, aux = self.ffn(self.ffn_norm(x), deterministic=deterministic, rng=rng,
                      token_ids=token_ids, mask=mask)
    return x + y.astype(jnp.float32), aux


def _average_aux(layer_aux: list[dict[str, jax.Array]], aux_loss_weight: float,
                 z_loss_weight: float) -> dict[str, jax.Array]:
  """Means over the MoE layers of their losses and scalar router metrics."""
  def mean(name):
    if not layer_aux:
      return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.stack([jnp.asarray(aux[name], jnp.float32) for aux in layer_aux]))

  out = {"aux_loss": mean("aux_loss"), "z_loss": mean("z_loss")}
  out["weighted_loss"] = aux_loss_weight * out["aux_loss"] + z_loss_weight * out["z_loss"]
  for name in ROUTER_METRICS:
    if layer_aux and all(name in aux for aux in layer_aux):
      out[name] = mean(name)
  if "load_max_over_mean" in out:
    out["max_violation"] = out["load_max_over_mean"] - 1.0
  return out


def _layer_report(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One MoE layer's routing metrics (what metrics.jsonl logs per layer)."""
  report = {name: aux[name] for name in ROUTER_METRICS + ("aux_loss", "expert_load",
                                                           "first_expert") if name in aux}
  if "load_max_over_mean" in aux:
    report["max_violation"] = aux["load_max_over_mean"] - 1.0
  return report


class TransformerLM(nnx.Module):
  """Decoder-only LM whose FFNs are MoE layers laid out by `moe_layer_flags`.

  Args:
    vocab_size: V.
    num_layers: number of blocks.
    d_model: D.
    num_heads: N.
    moe: a `routing.MoEConfig` or a mapping of its fields (the keys of
      config.model.moe). Dense layers get the same options with
      router="dense": an FFN of hidden top_k * expert_hidden (+ the shared
      experts), i.e. the active FLOPs of an MoE layer. router="dense" makes
      every layer dense.
    head_dim: P; default d_model // num_heads.
    moe_every, first_dense_layers: the layer layout (see `moe_layer_flags`).
    tie_embeddings: the output projection is the transposed embedding
      (Press & Wolf 2017); otherwise its own kernel [D, V].
    rope_base: RoPE base (RoFormer, Su et al. 2021).
    dtype: compute dtype ("float32", "bfloat16" or a jnp dtype); parameters
      and logits are float32.
    rngs: parameter initialization.
    tokens_per_group: S, the tokens of one routing group, when known (the
      trainer passes it; routers with per-slot parameters, Soft MoE, need it).

  Warns NonCausalRoutingWarning when the MoE routing lets a token see later
  tokens (see `noncausal_routing_reason`).
  """

  def __init__(self, *, vocab_size: int, num_layers: int, d_model: int,
               num_heads: int, moe: Mapping[str, Any], head_dim: Optional[int] = None,
               moe_every: int = 1, first_dense_layers: int = 0,
               tie_embeddings: bool = True, rope_base: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs, tokens_per_group: Optional[int] = None):
    _check_int("vocab_size", vocab_size, 1)
    _check_int("d_model", d_model, 1)
    _check_int("num_heads", num_heads, 1)
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads} "
                         "(or set head_dim)")
      head_dim = d_model // num_heads
    _check_int("head_dim", head_dim, 1)
    if not (isinstance(rope_base, (int, float)) and math.isfinite(rope_base)
            and rope_base > 1):
      raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}")
    try:
      compute_dtype = jnp.dtype(dtype)
    except TypeError as error:
      raise ValueError(f"dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}") from error
    if compute_dtype.name not in COMPUTE_DTYPES:
      raise ValueError(f"dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}")
    if not isinstance(moe, (Mapping, MoEConfig)) and not hasattr(moe, "keys"):
      raise ValueError(f"moe must be an MoEConfig or a dict of its fields, got "
                       f"{type(moe).__name__}")
    if not isinstance(moe, MoEConfig):
      reserved = sorted({"d_model", "dtype", "rngs"} & set(moe.keys()))
      if reserved:
        raise ValueError(f"moe must not set {reserved}: TransformerLM passes them")
    moe = MoEConfig.from_mapping(moe)
    flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                            first_dense_layers=first_dense_layers, router=moe.router)

    self.vocab_size = vocab_size
    self.d_model = d_model
    self.tie_embeddings = tie_embeddings
    self.dtype = compute_dtype
    self.moe_layers = flags
    self.moe = moe
    self.embed = nnx.Embed(vocab_size, d_model, param_dtype=jnp.float32, rngs=rngs)
    self.layers = nnx.List([
        DecoderBlock(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                     moe=moe if is_moe else moe.dense(), rope_base=rope_base,
                     dtype=compute_dtype, rngs=rngs, tokens_per_group=tokens_per_group)
        for is_moe in flags])
    self.final_norm = _rms_norm(d_model, rngs)
    self.output_kernel = nnx.data(None)
    if not tie_embeddings:
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
      self.output_kernel = nnx.Param(init(rngs.params(), (d_model, vocab_size),
                                          jnp.float32))
    reason = noncausal_routing_reason(moe, tokens_per_group) if any(flags) else None
    if reason:
      warnings.warn(
          f"Non-causal MoE routing in a decoder-only LM: {reason}. Tokens can see "
          "the future through routing (Wang et al. 2024, §5.2). Set "
          "config.model.moe.group_by='batch' to route the tokens at one position "
          "together, or change config.model.moe.router.",
          NonCausalRoutingWarning, stacklevel=_user_stacklevel())
    self.aux_loss_weight = self.layers[0].ffn.aux_loss_weight
    self.z_loss_weight = self.layers[0].ffn.z_loss_weight

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
               rng: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token logits.

    Args:
      tokens: <int32>[B, L] token ids (they also reach the routers).
      deterministic: turns router noise and expert dropout off.
      rng: key for router noise; split into one key per layer.
      mask: <bool>[B, L] True at real positions (None = all): padding takes
        no expert capacity and counts in no router loss or metric.

    Returns:
      logits: <float32>[B, L, V]; position l depends on tokens[:, :l+1] only
        (if routing is causal, see `noncausal_routing_reason`).
      aux: <float32>[] scalars averaged over the MoE layers (0.0 if none):
        aux_loss, z_loss, weighted_loss (= aux_loss_weight * aux_loss +
        z_loss_weight * z_loss), max_violation (MaxVio, Wang et al. 2024:
        max load / mean load - 1), and the router metrics in ROUTER_METRICS
        that the routers report (absent without MoE layers); plus "layers":
        {Transformer layer index i: that MoE layer's scalars, its
        expert_load <float32>[E] and first_expert <int32>[B, L]}.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be <int>[B, L], got {tokens.dtype}{list(tokens.shape)}")
    batch, length = tokens.shape
    # The gather [V, D][tokens] is laid out like the tokens (batch-sharded)
    # with D replicated; on an Explicit mesh its type must say so.
    spec = explicit_spec(tokens)
    x = self.embed(tokens, out_sharding=None if spec is None else PartitionSpec(*spec, None))
    x = x.astype(jnp.float32)  # [B, L, D]
    keys = [None] * len(self.layers)
    if not deterministic and rng is not None:
      keys = list(jax.random.split(rng, len(self.layers)))
    layer_aux = {}
    for index, (layer, key) in enumerate(zip(self.layers, keys)):
      x, aux = layer(x, deterministic=deterministic, rng=key, token_ids=tokens, mask=mask)
      if layer.is_moe:
        layer_aux[index] = aux
    hidden = self.final_norm(x).reshape(batch * length, self.d_model).astype(self.dtype)
    if self.tie_embeddings:
      kernel = self.embed.embedding[...].astype(self.dtype).T  # [D, V]
    else:
      kernel = self.output_kernel[...].astype(self.dtype)
    # 2-D [B*L, D] x [D, V] dot, accumulated and returned in float32.
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    aux = _average_aux(list(layer_aux.values()), self.aux_loss_weight, self.z_loss_weight)
    aux["layers"] = {index: _layer_report(layer) for index, layer in layer_aux.items()}
    return logits.reshape(batch, length, self.vocab_size), aux

  def after_step(self, aux: dict[str, Any]) -> None:
    """Updates every router's state outside the optimizer from the forward
    pass's per-layer aux (`aux["layers"]`), e.g. the balancing bias."""
    for index, layer in enumerate(self.layers):
      if layer.is_moe:
        layer.ffn.after_step(aux["layers"][index])
