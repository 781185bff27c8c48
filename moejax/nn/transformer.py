"""Decoder-only Transformer LM with dense and MoE feed-forward layers.

    tokens -> embed -> [RMSNorm -> causal attention (RoPE) -> +residual,
                        RMSNorm -> MoE or dense FFN -> +residual] x num_layers
           -> RMSNorm -> output projection (tied to the embedding or not) -> logits

Pre-norm blocks with RMSNorm and no biases (as in T5 / PaLM / LLaMA). The
residual stream and the norms stay float32; attention and FFN matmuls compute
in `dtype` (float32 or bfloat16) from parameters stored in `param_dtype`
(float32 by default; bfloat16 halves their memory); routers, norms and logits
are float32 whatever the dtypes.

Layouts (`scan_layers`): unscanned, every block is its own module
(`layers/<i>/...`) traced one by one; scanned, the repeated unit of the layer
layout (one block, or a dense+MoE pair for moe_every=2) is stacked along a
leading "layers" axis (`stack/blocks/<j>/...`, [units, ...]) and applied by
`jax.lax.scan` over the stacked state, each unit rebuilt with `nnx.merge`
inside the body (`nnx.scan` cannot take modules whose state was created in an
outer trace, as under the trainer's jit and grad), so compile time and
program size of the model stay flat in depth (dense bottom layers, and any
dense layers above the last whole unit, stay unscanned in `bottom/<i>` and
`top/<i>`). Both layouts create their blocks one by one in layer order, so a
seed draws the same weights in either, and compute the same function from
them (`convert_layout` maps one onto the other). `LayerLayout` is the one
place that knows where layer i lives: construction, forward, decode, router
updates and `convert_layout` all walk the layers through it.

Rematerialization (`remat`): each block's activations are recomputed in the
backward pass instead of stored ("full"), or only the outputs of its big
matmuls are kept ("save_matmuls", named with `checkpoint_name`: `qkv`,
`attention_out`, `ffn_hidden`, `ffn_out`), or everything is stored ("none").

Letters: B batch, L sequence, D model width, V vocabulary, N heads, P head dim.
"""

import dataclasses
import re
import os
import sys
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from moejax import routing as routing_lib
from moejax.nn.attention import (QK_NORMS, CausalSelfAttention, LatentAttention, Rope,
                                 explicit_spec, rms_norm)
from moejax.nn.moe_layer import MoELayer
from moejax.routing import MoEConfig
from moejax.parallel.rules import gather_fsdp
from moejax.nn.config import (COMPUTE_DTYPES, PARAM_DTYPES, REMAT_POLICIES, check_finite_above,
                              check_int, layer_moe_configs, moe_layer_flags, resolve_head_dim,
                              scan_layout)

from jax.ad_checkpoint import checkpoint_name

# Router metrics averaged over the MoE layers into the LM's aux (scalars only;
# the per-expert `expert_load` vectors are left out).
ROUTER_METRICS = ("dropped_fraction", "load_max_over_mean", "router_entropy",
                  "unrouted_fraction", "bias_norm", "router_logit_max")
# Names of the activations `remat="save_matmuls"` keeps (checkpoint_name).
MATMUL_NAMES = ("qkv", "attention_out", "ffn_hidden", "ffn_out")
# Parameters that stay float32 whatever param_dtype: routers (and their
# balancing bias) and norm scales.
_FLOAT32_PARAMS = re.compile(r"(^|/)(router/|[a-z_]*norm/)")


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


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attention(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, *, d_model: int, num_heads: int, head_dim: int,
               moe: MoEConfig, rope_base: float, dtype, rngs: nnx.Rngs,
               tokens_per_group: Optional[int] = None, num_kv_heads: Optional[int] = None,
               qk_norm: str = "none", rms_norm_eps: float = 1e-6,
               latent: Optional[Mapping[str, int]] = None, rope: Optional[Rope] = None,
               vocab_size: Optional[int] = None):
    # The norms normalize in float32 whatever the compute dtype: the consumers
    # cast (the router keeps float32, attention and experts cast to `dtype`).
    rope = rope or Rope(base=rope_base)
    self.attention_norm = rms_norm(d_model, rms_norm_eps, rngs)
    if latent:
      self.attention = LatentAttention(d_model=d_model, num_heads=num_heads, **latent,
                                       rope_options=rope, dtype=dtype,
                                       norm_epsilon=rms_norm_eps, rngs=rngs)
    else:
      self.attention = CausalSelfAttention(d_model=d_model, num_heads=num_heads,
                                           head_dim=head_dim, rope=rope, dtype=dtype,
                                           rngs=rngs, num_kv_heads=num_kv_heads,
                                           qk_norm=qk_norm, norm_epsilon=rms_norm_eps)
    self.ffn_norm = rms_norm(d_model, rms_norm_eps, rngs)
    self.ffn = MoELayer(d_model=d_model, moe=moe, tokens_per_group=tokens_per_group,
                        dtype=dtype, rngs=rngs, vocab_size=vocab_size)
    self.is_moe = self.ffn.routed

  def __call__(self, x: jax.Array, *, deterministic: bool, rng: Optional[jax.Array],
               token_ids: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               replay: Optional[jax.Array] = None, trace: bool = False,
               previous: Optional[jax.Array] = None, max_logits: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """<float32>[B, L, D] -> (<float32>[B, L, D], the FFN's aux).

    With `max_logits` the aux also holds "attention_max_logits" <float32>[N],
    each head's largest attention logit (for QK-clip, `clip_logits`).

    replay, trace: see `MoELayer`. With `trace` an MoE block's aux["trace"]
    also holds its router input "router_input" <float32>[B, L, D] and, given
    `previous` (the router input of the MoE layer before), "predicted": the
    experts this layer's router picks for `previous` (cross-layer
    predictability, as Megatron-Core's routing tools measure it)."""
    attended = self.attention(self.attention_norm(x), max_logits=max_logits)
    attended, largest = attended if max_logits else (attended, None)
    x = x + checkpoint_name(attended, "attention_out").astype(jnp.float32)
    hidden = self.ffn_norm(x)
    y, aux = self.ffn(hidden, deterministic=deterministic, rng=rng, token_ids=token_ids,
                      mask=mask, replay=replay, trace=trace)
    if max_logits:
      aux = {**aux, "attention_max_logits": largest}
    if trace and self.is_moe:
      aux["trace"]["router_input"] = hidden
      if previous is not None:
        _, ahead = self.ffn(previous, deterministic=True, token_ids=token_ids, mask=mask,
                            trace=True)
        aux["trace"]["predicted"] = ahead["trace"]["experts"]
    return x + checkpoint_name(y, "ffn_out").astype(jnp.float32), aux

  def decode(self, x: jax.Array, cache, index: jax.Array, token_ids: jax.Array):
    """The block on L new positions with the attention's key/value cache
    (`CausalSelfAttention.decode`); routing as in evaluation. -> (x, cache)."""
    y, cache = self.attention.decode(self.attention_norm(x), cache, index)
    x = x + y.astype(jnp.float32)
    y, _ = self.ffn(self.ffn_norm(x), deterministic=True, token_ids=token_ids)
    return x + y.astype(jnp.float32), cache


def remat_policy(name: str):
  """The `jax.checkpoint` policy of config.model.remat (None: no remat)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {name!r}")
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  return jax.checkpoint_policies.save_only_these_names(*MATMUL_NAMES)


def _apply_block(block: DecoderBlock, x, key, *, deterministic, token_ids, mask, remat,
                 in_scan: bool = False, replay=None, trace: bool = False, previous=None,
                 max_logits: bool = False):
  """block(x) under the remat policy `remat` (see `DecoderBlock.__call__`)."""
  def run(block, x, key, replay, previous):
    return block(x, deterministic=deterministic, rng=key, token_ids=token_ids, mask=mask,
                 replay=replay, trace=trace, previous=previous, max_logits=max_logits)
  if remat == "none":
    return run(block, x, key, replay, previous)
  # A pure function of the block's state (jax.checkpoint, not nnx.remat: the
  # block's variables may come from an outer trace, e.g. router state held
  # fixed under jax.grad, which nnx transforms refuse). The forward pass
  # changes no state. Outside a scan, prevent_cse keeps XLA from merging the
  # recomputation with the forward pass (which would store everything again);
  # inside one, the loop boundary does that and the barrier only costs time.
  graphdef, state = nnx.split(block)

  def pure(state, x, key, replay, previous):
    return run(nnx.merge(graphdef, state), x, key, replay, previous)
  return jax.checkpoint(pure, policy=remat_policy(remat), prevent_cse=not in_scan)(
      state, x, key, replay, previous)


class _Unit(nnx.Module):
  """One repeat of the layer layout (the blocks of one period)."""

  def __init__(self, blocks: list[DecoderBlock]):
    self.blocks = nnx.List(blocks)


def _stack_trees(trees: Sequence[Any]) -> Any:
  """Pytrees of one structure -> one pytree, leaves stacked on a new axis 0."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _stack_units(units: list[_Unit]) -> _Unit:
  """One `_Unit` whose variables hold the units' values stacked [units, ...]."""
  graphdef, _ = nnx.split(units[0])
  return nnx.merge(graphdef, _stack_trees([nnx.state(unit) for unit in units]))


# fn(block, carry, layer_input, in_scan) -> (carry, layer_output): one layer
# of a `LayerLayout.walk`; in_scan says the block runs inside the scan body.
LayerFn = Callable[[DecoderBlock, Any, Any, bool], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class LayerLayout:
  """Where each Transformer layer's block lives, in one layout.

  The one owner of the layout (as flaxformer's scannable decoder block):
  the model's construction (`modules`), its walks (`walk`: forward, decode,
  router updates) and the parameter remapping (`layer_params`,
  `block_params`, used by `convert_layout`) all go through `place`.
  Unscanned, layer i is `layers/<i>`; scanned, layers [start, end) are unit
  (i - start) // period, slot (i - start) % period of `stack/blocks/<slot>`
  (see `scan_layout`), the others `bottom/<i>` and `top/<i - end>`.
  """
  num_layers: int
  scanned: bool
  start: int = 0
  period: int = 1
  units: int = 0

  @classmethod
  def of(cls, flags: tuple[bool, ...], moe_every: int, first_dense_layers: int,
         scanned: bool, first_hash_layers: int = 0) -> "LayerLayout":
    if not scanned:
      return cls(len(flags), False)
    return cls(len(flags), True, *scan_layout(flags, moe_every, first_dense_layers,
                                              first_hash_layers))

  @property
  def end(self) -> int:
    return self.start + self.period * self.units

  def place(self, index: int) -> tuple[tuple[Any, ...], Optional[int]]:
    """(path of layer `index`'s block, its unit on the stack's axis 0 or None)."""
    if not self.scanned:
      return ("layers", index), None
    if index < self.start:
      return ("bottom", index), None
    if index >= self.end:
      return ("top", index - self.end), None
    unit, slot = divmod(index - self.start, self.period)
    return ("stack", "blocks", slot), unit

  def block(self, model: nnx.Module, index: int) -> DecoderBlock:
    """Layer `index`'s block in `model`; a scanned layer's is the stacked
    block of its slot (variables [units, ...])."""
    path, unit = self.place(index)
    if unit is None:
      return getattr(model, path[0])[path[1]]
    return model.stack.blocks[path[2]]

  def modules(self, blocks: list[DecoderBlock]) -> dict[str, nnx.Module]:
    """The model's attributes holding `blocks` [num_layers] in this layout."""
    if not self.scanned:
      return {"layers": nnx.List(blocks)}
    start, end, period = self.start, self.end, self.period
    units = [_Unit(blocks[u:u + period]) for u in range(start, end, period)]
    return {"bottom": nnx.List(blocks[:start]), "stack": _stack_units(units),
            "top": nnx.List(blocks[end:])}

  def walk(self, model: nnx.Module, fn: LayerFn, carry: Any,
           inputs: Optional[Sequence[Any]] = None, *, update: bool = False
           ) -> tuple[Any, list[Any]]:
    """fn over the blocks of `model` in layer order 0 .. num_layers - 1.

    Args:
      model: holds the blocks as `modules` lays them out.
      fn: one layer (`LayerFn`); carry threads from layer to layer.
      inputs: [num_layers] per-layer pytrees (None: none).
      update: keep the changes fn makes to the stacked blocks' variables
        (unstacked blocks are changed in place anyway).

    Returns:
      (the last carry, [num_layers] per-layer outputs).
    """
    inputs = [None] * self.num_layers if inputs is None else list(inputs)
    outputs = [None] * self.num_layers
    for index in range(self.num_layers):
      _, unit = self.place(index)
      if unit is None:
        carry, outputs[index] = fn(self.block(model, index), carry, inputs[index], False)
      elif index == self.start:
        carry, outputs[self.start:self.end] = self._scan(
            model.stack, fn, carry, inputs[self.start:self.end], update)
    return carry, outputs

  def _scan(self, stack: _Unit, fn: LayerFn, carry: Any, inputs: list[Any],
            update: bool) -> tuple[Any, list[Any]]:
    """fn over layers [start, end): jax.lax.scan over the stacked state, each
    unit merged inside the body (a pure function of the state; see
    `_apply_block` on nnx transforms). inputs/outputs: [end - start]."""
    slots = [_stack_trees(inputs[slot::self.period]) for slot in range(self.period)]
    graphdef, state = nnx.split(stack)

    def body(carry, unit_state_and_inputs):
      unit_state, unit_inputs = unit_state_and_inputs
      unit = nnx.merge(graphdef, unit_state)
      unit_outputs = []
      for slot, block in enumerate(unit.blocks):
        carry, output = fn(block, carry, unit_inputs[slot], True)
        unit_outputs.append(output)
      return carry, (unit_outputs, nnx.state(unit) if update else None)

    carry, (stacked, new_state) = jax.lax.scan(body, carry, (state, slots))
    if update:
      nnx.update(stack, new_state)
    return carry, [jax.tree.map(lambda leaf, u=unit: leaf[u], stacked[slot])
                   for unit in range(self.units) for slot in range(self.period)]

  def layer_params(self, flat: Mapping[tuple, Any]
                   ) -> tuple[list[dict[tuple, Any]], dict[tuple, Any]]:
    """A flat {path: value} state in this layout -> ([num_layers] {path in
    the block: value}, {path outside the blocks: value})."""
    by_prefix: dict[tuple, list[tuple[Optional[int], int]]] = {}
    for index in range(self.num_layers):
      prefix, unit = self.place(index)
      by_prefix.setdefault(prefix, []).append((unit, index))
    per_layer: list[dict[tuple, Any]] = [{} for _ in range(self.num_layers)]
    others = {}
    for path, value in flat.items():
      prefix = _block_prefix(path)
      if prefix not in by_prefix:
        others[path] = value
        continue
      for unit, index in by_prefix[prefix]:
        per_layer[index][path[len(prefix):]] = value if unit is None else value[unit]
    return per_layer, others

  def block_params(self, per_layer: list[Mapping[tuple, Any]]) -> dict[tuple, Any]:
    """[num_layers] {path in the block: value} -> flat {path: value} in this
    layout (the inverse of `layer_params`'s first output)."""
    out, stacked = {}, {}
    for index, params in enumerate(per_layer):
      prefix, unit = self.place(index)
      for rest, value in params.items():
        if unit is None:
          out[prefix + rest] = value
        else:
          stacked.setdefault(prefix + rest, [None] * self.units)[unit] = value
    out.update({path: jnp.stack(values) for path, values in stacked.items()})
    return out


def _block_prefix(path: tuple) -> tuple:
  """The part of a state path that could name a block (`LayerLayout.place`),
  e.g. ("layers", 3) or ("stack", "blocks", 1), its index an int (a
  checkpoint's keys may be strings); () if the path is too short."""
  size = 3 if path[:1] == ("stack",) else 2
  if len(path) <= size:
    return ()
  index = path[size - 1]
  try:
    index = int(index)
  except (TypeError, ValueError):
    pass
  return tuple(path[:size - 1]) + (index,)


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
  report = {name: aux[name] for name in ROUTER_METRICS + (
      "aux_loss", "expert_load", "first_expert", "trace", routing_lib.QB_QUANTILE)
            if name in aux}
  if "load_max_over_mean" in aux:
    report["max_violation"] = aux["load_max_over_mean"] - 1.0
  return report


def _checked_dtype(name: str, value: Any, allowed: tuple[str, ...]) -> jnp.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError as error:
    raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}") from error
  if dtype.name not in allowed:
    raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
  return dtype


def _checked_options(*, vocab_size, d_model, num_heads, head_dim, moe, rope_base, dtype,
                     scan_layers, remat, param_dtype, num_kv_heads, qk_norm, rms_norm_eps):
  """Validates `TransformerLM`'s keywords (ValueError naming the first bad
  one) -> (head_dim, compute dtype, storage dtype, MoEConfig)."""
  check_int("vocab_size", vocab_size, 1)
  if not isinstance(scan_layers, bool):
    raise ValueError(f"scan_layers must be true or false, got {scan_layers!r}")
  remat_policy(remat)  # validates the name
  storage_dtype = _checked_dtype("param_dtype", param_dtype, PARAM_DTYPES)
  check_int("d_model", d_model, 1)
  check_int("num_heads", num_heads, 1)
  head_dim = resolve_head_dim(d_model, num_heads, head_dim)
  check_finite_above("rope_base", rope_base, 1)
  check_finite_above("rms_norm_eps", rms_norm_eps, 0)
  if num_kv_heads is not None:
    check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
  if qk_norm not in QK_NORMS:
    raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {qk_norm!r}")
  compute_dtype = _checked_dtype("dtype", dtype, COMPUTE_DTYPES)
  if not isinstance(moe, (Mapping, MoEConfig)) and not hasattr(moe, "keys"):
    raise ValueError(f"moe must be an MoEConfig or a dict of its fields, got "
                     f"{type(moe).__name__}")
  if not isinstance(moe, MoEConfig):
    reserved = sorted({"d_model", "dtype", "rngs"} & set(moe.keys()))
    if reserved:
      raise ValueError(f"moe must not set {reserved}: TransformerLM passes them")
  return head_dim, compute_dtype, storage_dtype, MoEConfig.from_mapping(moe)


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
    first_hash_layers: the first N MoE layers are hash layers
      (`nn.config.layer_moe_configs`).
    tie_embeddings: the output projection is the transposed embedding
      (Press & Wolf 2017); otherwise its own kernel [D, V].
    rope_base: RoPE base (RoFormer, Su et al. 2021).
    dtype: compute dtype ("float32", "bfloat16" or a jnp dtype); logits are
      float32.
    rngs: parameter initialization.
    tokens_per_group: S, the tokens of one routing group, when known (the
      trainer passes it; routers with per-slot parameters, Soft MoE, need it).
    scan_layers: stack the repeated unit of the layout and scan over it
      (see the module docstring); same function, flat compile time.
    remat: "none", "full" or "save_matmuls" (see the module docstring).
    param_dtype: storage dtype of the matmul weights (attention, experts,
      dense FFNs, embedding, output kernel): "float32" or "bfloat16"; routers
      and norms stay float32.
    num_kv_heads: K key/value heads (grouped-query attention; the decode
      cache holds K heads); None = N (multi-head).
    qk_norm: RMSNorm of queries and keys, one of `attention.QK_NORMS`.
    rms_norm_eps: the epsilon of every RMSNorm.
    latent: multi-head latent attention's widths (`LatentAttention`'s
      kv_rank, q_rank, nope, rope, v), or None for standard attention.
    rope: `attention.Rope`'s fields (layout, YaRN) beyond `rope_base`.
    dense_hidden: FFN width of the dense layers (`MoEConfig.dense`); None =
      top_k * expert_hidden plus the shared experts.

  Warns NonCausalRoutingWarning when the MoE routing lets a token see later
  tokens (see `noncausal_routing_reason`).
  """

  def __init__(self, *, vocab_size: int, num_layers: int, d_model: int,
               num_heads: int, moe: Mapping[str, Any], head_dim: Optional[int] = None,
               moe_every: int = 1, first_dense_layers: int = 0,
               tie_embeddings: bool = True, rope_base: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs, tokens_per_group: Optional[int] = None,
               scan_layers: bool = False, remat: str = "none", param_dtype=jnp.float32,
               num_kv_heads: Optional[int] = None, qk_norm: str = "none",
               rms_norm_eps: float = 1e-6, latent: Optional[Mapping[str, int]] = None,
               rope: Optional[Mapping[str, Any]] = None, dense_hidden: Optional[int] = None,
               first_hash_layers: int = 0):
    head_dim, compute_dtype, storage_dtype, moe = _checked_options(
        vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, head_dim=head_dim,
        moe=moe, rope_base=rope_base, dtype=dtype, scan_layers=scan_layers, remat=remat,
        param_dtype=param_dtype, num_kv_heads=num_kv_heads, qk_norm=qk_norm,
        rms_norm_eps=rms_norm_eps)
    flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                            first_dense_layers=first_dense_layers, router=moe.router)

    # V, D, N, P, and how the blocks compute (read by decode, LoRA, quantize).
    self.vocab_size, self.d_model, self.num_heads, self.head_dim = (
        vocab_size, d_model, num_heads, head_dim)
    self.tie_embeddings, self.moe_layers, self.moe = tie_embeddings, flags, moe
    self.dtype, self.param_dtype = compute_dtype, storage_dtype
    self.scan_layers, self.remat = scan_layers, remat
    self.layout = LayerLayout.of(flags, moe_every, first_dense_layers, scan_layers,
                                 first_hash_layers)
    self.embed = nnx.Embed(vocab_size, d_model, param_dtype=jnp.float32, rngs=rngs)
    # Every block is created in layer order from the same rngs in either
    # layout (the scanned stack is stacked afterwards), so a seed gives the
    # same weights whatever scan_layers.
    rope_options = Rope(**{**(rope or {}), "base": rope_base})
    blocks = [DecoderBlock(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                           moe=layer_moe, rope_base=rope_base,
                           dtype=compute_dtype, rngs=rngs, tokens_per_group=tokens_per_group,
                           num_kv_heads=num_kv_heads, qk_norm=qk_norm,
                           rms_norm_eps=rms_norm_eps, latent=latent, rope=rope_options,
                           vocab_size=vocab_size)
              for layer_moe in layer_moe_configs(moe, flags, dense_hidden=dense_hidden,
                                                 first_hash_layers=first_hash_layers)]
    for name, module in self.layout.modules(blocks).items():
      setattr(self, name, module)
    self.final_norm = rms_norm(d_model, rms_norm_eps, rngs)
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
    self.aux_loss_weight = blocks[0].ffn.aux_loss_weight
    self.z_loss_weight = blocks[0].ffn.z_loss_weight
    if storage_dtype != jnp.float32:
      _cast_params(self, storage_dtype)

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
               rng: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               routes: Optional[Mapping[int, jax.Array]] = None,
               trace: bool = False, max_logits: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token logits.

    Args:
      tokens: <int32>[B, L] token ids (they also reach the routers).
      deterministic: turns router noise and expert dropout off.
      rng: key for router noise; split into one key per layer.
      mask: <bool>[B, L] True at real positions (None = all): padding takes
        no expert capacity and counts in no router loss or metric.
      routes: {MoE layer i: <int>[B, L, K]} for every MoE layer, replayed
        instead of the routers' choices (which weight them), or None.
      trace: every MoE layer also reports each token's choices (below).
      max_logits: also report each layer's attention logit maxima (below).

    Returns:
      logits: <float32>[B, L, V]; position l depends on tokens[:, :l+1] only
        (if routing is causal, see `noncausal_routing_reason`).
      aux: <float32>[] scalars averaged over the MoE layers (0.0 if none):
        aux_loss, z_loss, weighted_loss (= aux_loss_weight * aux_loss +
        z_loss_weight * z_loss), max_violation (MaxVio, Wang et al. 2024:
        max load / mean load - 1), and the router metrics in ROUTER_METRICS
        that the routers report (absent without MoE layers); plus "layers":
        {Transformer layer index i: that MoE layer's scalars, its
        expert_load <float32>[E] and first_expert <int32>[B, L]}; with
        `trace` also "trace": {"experts", "weights", "kept" [B, L, K'] (see
        `Routing.token_choices`) and, in every MoE layer but the first,
        "predicted" <int32>[B, L, K']: the experts its router picks from the
        previous MoE layer's router input}; with `max_logits` also
        "attention_max_logits" <float32>[num_layers, N] (`clip_logits`).
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be <int>[B, L], got {tokens.dtype}{list(tokens.shape)}")
    x = self._embed(tokens)  # [B, L, D]
    num_layers = len(self.moe_layers)
    keys = [None] * num_layers
    if not deterministic and rng is not None:
      keys = list(jax.random.split(rng, num_layers))  # layer i's key is keys[i], either layout
    replays = self._replays(routes)

    def layer(block, carry, layer_input, in_scan):
      # With trace, the carry also holds the last MoE layer's router input.
      x, previous = carry if trace else (carry, None)
      key, replay = layer_input
      x, aux = _apply_block(block, x, key, deterministic=deterministic, token_ids=tokens,
                            mask=mask, remat=self.remat, in_scan=in_scan, replay=replay,
                            trace=trace, previous=previous, max_logits=max_logits)
      if trace and block.is_moe:
        previous = aux["trace"].pop("router_input")
      largest = aux.pop("attention_max_logits", None)
      return ((x, previous) if trace else x), ((aux if block.is_moe else None), largest)

    carry = (x, jnp.zeros_like(x)) if trace else x
    carry, outputs = self.layout.walk(self, layer, carry, list(zip(keys, replays)))
    x = carry[0] if trace else carry
    return self._logits(x), self._collect_aux(outputs, trace, max_logits)

  def _collect_aux(self, outputs: list[tuple[Any, Any]], trace: bool, max_logits: bool
                   ) -> dict[str, Any]:
    """`__call__`'s aux from the layers' (MoE aux or None, max logits or
    None)."""
    layer_aux = {index: aux for index, (aux, _) in enumerate(outputs) if aux is not None}
    if trace and layer_aux:  # the first MoE layer has no MoE layer before it
      layer_aux[min(layer_aux)]["trace"].pop("predicted", None)
    aux = _average_aux(list(layer_aux.values()), self.aux_loss_weight, self.z_loss_weight)
    aux["layers"] = {index: _layer_report(layer_aux[index]) for index in sorted(layer_aux)}
    if max_logits:
      aux["attention_max_logits"] = jnp.stack([largest for _, largest in outputs])
    return aux

  def _replays(self, routes: Optional[Mapping[int, jax.Array]]) -> list[Optional[jax.Array]]:
    """[num_layers] the replayed experts of each layer (None: routed)."""
    moe_indices = [i for i, is_moe in enumerate(self.moe_layers) if is_moe]
    if routes is not None and sorted(routes) != moe_indices:
      raise ValueError(f"routes must give experts for every MoE layer {moe_indices}, "
                       f"got layers {sorted(routes)}")
    return [None if routes is None else routes.get(i) for i in range(len(self.moe_layers))]

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """<int>[B, L] -> <float32>[B, L, D]."""
    # The gather [V, D][tokens] is laid out like the tokens (batch-sharded)
    # with D replicated; on an Explicit mesh its type must say so.
    # A table split over "fsdp" is gathered for this use (`gather_fsdp`).
    take = lambda table, ids: jnp.take(table, ids, axis=0)  # noqa: E731
    spec = explicit_spec(tokens)
    if spec is not None:
      take = jax.sharding.auto_axes(take, out_sharding=PartitionSpec(*spec, None))
    return take(gather_fsdp(self.embed.embedding[...]), tokens).astype(jnp.float32)

  def _logits(self, x: jax.Array) -> jax.Array:
    """<float32>[B, L, D] residual stream -> <float32>[B, L, V] logits."""
    batch, length, _ = x.shape
    hidden = self.final_norm(x).reshape(batch * length, self.d_model).astype(self.dtype)
    if self.tie_embeddings:
      kernel = gather_fsdp(self.embed.embedding[...]).astype(self.dtype).T  # [D, V]
    else:
      kernel = gather_fsdp(self.output_kernel[...]).astype(self.dtype)
    # 2-D [B*L, D] x [D, V] dot, accumulated and returned in float32.
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return logits.reshape(batch, length, self.vocab_size)

  def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
    """An empty decoding cache for `batch` sequences of up to `max_length`
    tokens: {"index": <int32>[] positions filled, "keys", "values":
    [num_layers, B, K, max_length, P] in the compute dtype (K key/value
    heads); with multi-head latent attention, "keys" holds the latents
    [num_layers, B, 1, max_length, Rkv] and "values" the rotated shared keys
    [num_layers, B, 1, max_length, Pr]}."""
    # Every layer's attention has the same cache shapes: ask layer 0's.
    keys, values = self.layout.block(self, 0).attention.cache_shapes(batch, max_length)
    layers = len(self.moe_layers)
    return {"index": jnp.zeros((), jnp.int32),
            "keys": jnp.zeros((layers,) + keys, self.dtype),
            "values": jnp.zeros((layers,) + values, self.dtype)}

  def decode(self, tokens: jax.Array, cache: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits of L new tokens after the cache's positions, and the new cache.

    `tokens` <int>[B, L] sit at positions cache["index"] .. + L - 1 (a prompt,
    or the one token sampled last). Routing is the evaluation's
    (deterministic), applied to these tokens only: decoding a sequence in
    pieces gives the logits of `__call__` on the whole sequence when routing
    is token-local (dropless, dense) or groups the tokens at one position
    (group_by="batch", each piece holding all B sequences); see
    `moejax.generate`.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be <int>[B, L], got {tokens.dtype}{list(tokens.shape)}")
    index = cache["index"]

    def layer(block, x, layer_cache, in_scan):
      del in_scan  # decoding keeps no activations for a backward pass
      return block.decode(x, layer_cache, index, tokens)

    # Per-layer inputs and outputs: layer i's (keys, values), each [B, K, max_len, P].
    x, caches = self.layout.walk(self, layer, self._embed(tokens),
                                 list(zip(cache["keys"], cache["values"])))
    return self._logits(x), {"index": index + tokens.shape[1],
                             "keys": jnp.stack([k for k, _ in caches]),
                             "values": jnp.stack([v for _, v in caches])}

  def fill_hash_tables(self, counts) -> int:
    """Builds every balanced hash table (`MoEConfig.hash_table="balanced"`)
    from the training data's token counts <int>[V]; returns how many layers
    have one. Eager (not under jit): a run calls it once when it starts."""
    filled = 0
    for index, is_moe in enumerate(self.moe_layers):
      router = getattr(self.layout.block(self, index).ffn, "router", None) if is_moe else None
      if getattr(router, "table", None) is not None:
        router.fill_table(counts)
        filled += 1
    return filled

  def after_step(self, aux: dict[str, Any]) -> None:
    """Updates every router's state outside the optimizer from the forward
    pass's per-layer aux (`aux["layers"]`), e.g. the balancing bias."""
    def layer(block, carry, layer_aux, in_scan):
      del in_scan
      if block.is_moe:
        block.ffn.after_step(layer_aux)
      return carry, None

    inputs = [aux["layers"][index] if is_moe else None
              for index, is_moe in enumerate(self.moe_layers)]
    self.layout.walk(self, layer, None, inputs, update=True)


  def clip_logits(self, max_logits: jax.Array, tau: float) -> None:
    """QK-clip (Kimi K2's MuonClip, arXiv 2507.20534, §2.1) after an
    optimizer step: every layer's attention rescales its query and key
    weights so that each head whose largest logit in the forward pass,
    `max_logits` <float32>[num_layers, N] (`__call__`'s
    "attention_max_logits"), exceeded `tau` would have peaked at tau
    (`CausalSelfAttention.clip_logits`, `LatentAttention.clip_logits`)."""
    def layer(block, carry, largest, in_scan):
      del in_scan
      block.attention.clip_logits(largest, tau)
      return carry, None

    self.layout.walk(self, layer, None, list(max_logits), update=True)


def _cast_params(model: nnx.Module, dtype) -> None:
  """Stores the matmul weights of `model` in `dtype`; routers (and their
  state) and norm scales stay float32."""
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      name = "/".join(str(p) for p in path)
      if not _FLOAT32_PARAMS.search(name):
        variable.set_value(variable[...].astype(dtype))


def convert_layout(params: Mapping[str, Any], *, scanned: bool, num_layers: int,
                   moe_every: int = 1, first_dense_layers: int = 0,
                   router: str = MoEConfig.router, first_hash_layers: int = 0
                   ) -> dict[str, Any]:
  """The same weights in the other layer layout.

  Args:
    params: a pure nested dict of the model's state (`nnx.to_pure_dict(state)`,
      or a checkpoint's params) in the layout opposite to `scanned`.
    scanned: True maps unscanned (`layers/<i>`) -> scanned (`bottom`, `stack`,
      `top`); False maps back.
    num_layers, moe_every, first_dense_layers, router, first_hash_layers: the
      model's layout (as passed to `TransformerLM`).

  Returns:
    A pure nested dict for `nnx.replace_by_pure_dict` on the other layout.
  """
  flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                          first_dense_layers=first_dense_layers, router=router)
  source, target = (LayerLayout.of(flags, moe_every, first_dense_layers, layout_scanned,
                                   first_hash_layers)
                    for layout_scanned in (not scanned, scanned))
  per_layer, others = source.layer_params(flax.traverse_util.flatten_dict(dict(params)))
  return flax.traverse_util.unflatten_dict({**others, **target.block_params(per_layer)})
