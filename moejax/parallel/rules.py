"""Logical axis names -> mesh axes, and the logical axes of every parameter.

Two tables, each written once:
  * `LOGICAL_RULES`: which mesh axes split a logical axis ("expert" ->
    "expert", "mlp" -> "model", ...). Layers ask it for axis names instead of
    hard-coding them.
  * `PARAM_AXES`: which logical axes each parameter has, by its path in the
    model (e.g. `layers/0/ffn/experts/wi` [E, D, H] -> ("expert", "embed",
    "mlp"); scanned layers `stack/blocks/0/ffn/experts/wi` [units, E, D, H]
    get a leading "layers" axis). A parameter no rule matches is an error, so a new parameter gets
    a rule instead of being silently replicated.

Letters: E experts, D model width, H hidden width, N heads, P head dim, V vocab.
"""

import re
from typing import Any, Collection, Optional, Sequence, Union

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = Union[None, str, tuple[str, ...]]

# Logical axis -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: dict[str, MeshAxes] = {
    # Activations: a batch row (and a routing group) lives on one device of
    # every (data, expert) pair; the "expert" axis doubles as a batch axis for
    # everything but the routed experts (GShard, Lepikhin et al. 2020, §3.2).
    "batch": ("data", "fsdp", "expert"),
    "expert": "expert",   # routed experts [E, ...]
    "mlp": "model",       # hidden units of experts and dense FFNs
    "heads": "model",     # attention heads (Megatron-LM, Shoeybi et al. 2019)
    "kv_heads": "model",  # key/value heads of grouped-query attention
    "embed": None,        # activations; parameters split it over "fsdp" (`param_spec`)
    "latent": None,       # MLA's latent width; its up projections split it over "fsdp"
    "vocab": None,
    "head_dim": None,
    "qkv": None,
    "router": None,       # router logits over all E: every device routes its own tokens
    "layers": None,       # the stacked-layers axis of scan_layers (nnx.scan)
}

# Parameter path (regex on "/"-joined names, first match wins) -> logical axes.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Routed experts (nn.Experts): wi / wi_gate / wi_up [E, D, H], wo [E, H, D].
    (r"(^|/)experts/(wi|wi_gate|wi_up)$", ("expert", "embed", "mlp")),
    (r"(^|/)experts/wo$", ("expert", "mlp", "embed")),
    # Dense FFN (MoELayer.ffn) and shared experts (MoELayer.shared), nn.MLP.
    (r"(^|/)(ffn|shared)/(wi|wi_gate|wi_up)$", ("embed", "mlp")),
    (r"(^|/)(ffn|shared)/wo$", ("mlp", "embed")),
    (r"(^|/)shared_gate$", ("embed", None)),                     # [D, 1]
    # Routers (routing.routers): replicated, every device routes its own tokens.
    (r"(^|/)router/kernel$", ("embed", "router")),               # [D, E]
    (r"(^|/)router/bias$", ("router",)),                         # [E] RouterState
    (r"(^|/)router/logit_bias$", ("router",)),                   # [E] logit bias
    (r"(^|/)router/slot_params$", ("embed", "router", None)),    # [D, E, P] Soft MoE
    (r"(^|/)router/scale$", ()),                                 # [] Soft MoE
    (r"(^|/)attention/qkv$", ("embed", "qkv", "heads", "head_dim")),  # [D, 3, N, P]
    (r"(^|/)attention/query$", ("embed", "heads", "head_dim")),  # [D, N, P] (GQA)
    (r"(^|/)attention/kv$", ("embed", "qkv", "kv_heads", "head_dim")),  # [D, 2, K, P]
    (r"(^|/)attention/out$", ("heads", "head_dim", "embed")),    # [N, P, D]
    # Multi-head latent attention (nn.attention.LatentAttention): the down
    # projections to the latents are replicated like a dense kernel's input
    # side, the up projections split by head.
    (r"(^|/)attention/(q_down|kv_down)$", ("embed", None)),      # [D, R]
    (r"(^|/)attention/(q_up|kv_up)$", ("latent", "heads", "head_dim")),  # [R, N, P]
    (r"(^|/)embed/embedding$", ("vocab", "embed")),              # [V, D]
    (r"(^|/)output_kernel$", ("embed", "vocab")),                # [D, V]
    (r"(^|/)attention/(query|key)_norm/scale$", ("head_dim",)),  # qk_norm [P] or [N P]
    (r"(^|/)[a-z_]*norm/scale$", ("embed",)),                    # RMSNorm [D]
    # LoRA adapters (qwix, moejax.train.lora) of a weight W: x W + x A B, with A
    # taking W's input axes to the rank r and B the rank to W's output axes;
    # the expert axis is a batch axis of both. The rank is replicated.
    (r"(^|/)experts/(wi|wi_gate|wi_up)_lora_a$", ("expert", "embed", None)),  # [E, D, r]
    (r"(^|/)experts/(wi|wi_gate|wi_up)_lora_b$", ("expert", None, "mlp")),    # [E, r, H]
    (r"(^|/)experts/wo_lora_a$", ("expert", "mlp", None)),       # [E, H, r]
    (r"(^|/)experts/wo_lora_b$", ("expert", None, "embed")),     # [E, r, D]
    (r"(^|/)(ffn|shared)/(wi|wi_gate|wi_up)_lora_a$", ("embed", None)),  # [D, r]
    (r"(^|/)(ffn|shared)/(wi|wi_gate|wi_up)_lora_b$", (None, "mlp")),    # [r, H]
    (r"(^|/)(ffn|shared)/wo_lora_a$", ("mlp", None)),            # [H, r]
    (r"(^|/)(ffn|shared)/wo_lora_b$", (None, "embed")),          # [r, D]
    (r"(^|/)attention/qkv_lora_a$", ("embed", None)),            # [D, r]
    (r"(^|/)attention/qkv_lora_b$", (None, "qkv", "heads", "head_dim")),  # [r, 3, N, P]
    (r"(^|/)attention/query_lora_a$", ("embed", None)),          # [D, r]
    (r"(^|/)attention/query_lora_b$", (None, "heads", "head_dim")),  # [r, N, P]
    (r"(^|/)attention/kv_lora_a$", ("embed", None)),             # [D, r]
    (r"(^|/)attention/kv_lora_b$", (None, "qkv", "kv_heads", "head_dim")),  # [r, 2, K, P]
    (r"(^|/)attention/out_lora_a$", ("heads", "head_dim", None)),  # [N, P, r]
    (r"(^|/)attention/out_lora_b$", (None, "embed")),            # [r, D]
)

# A weight quantized by qwix (QLoRA's base, moejax.train.lora) is stored as
# `<weight>/array/qvalue` (the weight's shape) and `<weight>/array/scale` (the
# same rank, size 1 along the axes a scale is shared over).
QUANTIZED_PATTERN = r"/array/(qvalue|scale)$"


def mesh_axes(logical: Optional[str]) -> tuple[str, ...]:
  """The mesh axes that split logical axis `logical` (() = replicated)."""
  if logical is None:
    return ()
  if logical not in LOGICAL_RULES:
    raise ValueError(f"unknown logical axis {logical!r}; valid axes: "
                     f"{sorted(LOGICAL_RULES)} (moejax.parallel.LOGICAL_RULES)")
  axes = LOGICAL_RULES[logical]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[Optional[str]], mesh: Optional[Any] = None, *,
                    keep: Optional[Collection[str]] = None) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions have these logical names.

  Mesh axes that `mesh` lacks (e.g. a mesh without "model") or that have
  size 1 there, and axes not in `keep` when given, are left out: splitting
  over one device is replicating, and Explicit meshes then type fewer
  dimensions as sharded.
  """
  entries, used = [], set()
  for logical in logical_axes:
    axes = tuple(a for a in mesh_axes(logical)
                 if (mesh is None or mesh.shape.get(a, 1) > 1)
                 and (keep is None or a in keep))
    if used & set(axes):
      raise ValueError(f"logical axes {tuple(logical_axes)} use mesh axes "
                       f"{sorted(used & set(axes))} twice")
    used |= set(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def key_name(key: Any) -> str:
  """The name of one entry of a pytree path (a dict key, an attribute, a
  sequence index) as it appears in a "/"-joined parameter path."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_param(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


# Parameters of router modules (`routing.Router`, attribute `router` of a layer).
ROUTER_STATE_PATTERN = r"(^|/)router/"


# Parameters of a scanned layer stack (`TransformerLM(scan_layers=True)`):
# a leading "layers" axis [units, ...] before the axes of their rule.
STACKED_PATTERN = r"^stack/"


def leaf_axes(path: tuple, leaf: Any) -> tuple[str, ...]:
  """The logical axes of one parameter from its pytree path and shape (the
  rule `param_logical_axes` applies to every leaf)."""
  return _leaf_axes(path, leaf)


def _leaf_axes(path: tuple, leaf: Any) -> tuple[str, ...]:
  names = "/".join(key_name(key) for key in path)
  shape = tuple(getattr(leaf, "shape", ()))
  if re.search(STACKED_PATTERN, names) and shape:
    return ("layers",) + _leaf_axes(path[1:], jax.ShapeDtypeStruct(shape[1:], "float32"))
  if re.search(QUANTIZED_PATTERN, names):
    axes = _leaf_axes(path[:-2], leaf)  # the weight's axes; a size-1 scale axis is replicated
    return tuple(None if size == 1 else axis for axis, size in zip(axes, shape))
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, names):
      if len(axes) != len(shape):
        raise ValueError(f"parameter {names!r} has shape {shape} but its rule "
                         f"{pattern!r} gives {len(axes)} axes {axes}")
      return axes
  if re.search(ROUTER_STATE_PATTERN, names):
    # Any other router parameter (a router registered outside moejax) is
    # replicated: every device routes its own tokens with the whole router.
    return (None,) * len(shape)
  raise ValueError(f"no sharding rule for parameter {names!r} with shape {shape}; "
                   "add one to moejax.parallel.rules.PARAM_AXES")


def param_logical_axes(params_state: Any) -> Any:
  """Logical axes of every parameter.

  Args:
    params_state: an `nnx.State` of parameters (from `nnx.split` or
      `nnx.eval_shape`; leaves are Variables) or a nested dict of arrays.

  Returns:
    The same structure with a tuple of logical names (one per dimension) in
    place of each parameter. Tuples are pytrees: map over the result with
    `is_leaf=lambda x: isinstance(x, tuple)`.

  Raises:
    ValueError: a parameter matches no rule of `PARAM_AXES`, or its rank
      differs from its rule's.
  """
  return jax.tree_util.tree_map_with_path(_leaf_axes, params_state, is_leaf=_is_param)


# The mesh axis that splits parameters and optimizer state (FSDP / ZeRO-3).
FSDP_AXIS = "fsdp"
# The logical dimension FSDP splits: the model width, else MLA's latent width.
FSDP_DIMS = ("embed", "latent")


def param_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int],
               mesh: Any) -> PartitionSpec:
  """PartitionSpec of a parameter: `logical_to_spec` of its axes, plus, on a
  mesh whose "fsdp" axis has size > 1, its "embed" (model width) dimension
  split over "fsdp" when the parameter is a matrix or more (not counting
  scan_layers' "layers" axis) and the width divides
  (MaxText's FSDP rule); MLA's up projections, which have no "embed"
  dimension, split their "latent" one. Vectors (norm scales, router biases) stay whole. A
  layer gathers such a weight before its matmul (`gather_fsdp`), and its
  gradient is reduce-scattered back: per-device parameter and optimizer bytes
  fall by the fsdp size, traded for one all-gather per weight and step.
  """
  spec = logical_to_spec(logical_axes, mesh)
  fsdp = mesh.shape.get(FSDP_AXIS, 1) if mesh is not None else 1
  # The stacked layers of scan_layers do not make a vector a matrix.
  rank = sum(axis != "layers" for axis in logical_axes)
  split = next((axis for axis in FSDP_DIMS if axis in logical_axes), None)
  if fsdp == 1 or rank < 2 or split is None:
    return spec
  dim = list(logical_axes).index(split)
  if shape[dim] % fsdp:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  entries[dim] = FSDP_AXIS
  return PartitionSpec(*entries)


def gather_fsdp(x: jax.Array) -> jax.Array:
  """`x` with its "fsdp" split undone (an all-gather; its transpose, in the
  backward pass, a reduce-scatter). A no-op unless `x` is typed as split over
  "fsdp" on an Explicit mesh; on an Auto mesh GSPMD inserts the gather itself."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or not any(FSDP_AXIS in _entry_axes(e) for e in spec):
    return x
  kept = [tuple(a for a in _entry_axes(e) if a != FSDP_AXIS) for e in spec]
  return jax.sharding.reshard(
      x, PartitionSpec(*[None if not a else a[0] if len(a) == 1 else a for a in kept]))


def _entry_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def param_shardings(params_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding of every parameter on `mesh`, via `LOGICAL_RULES` (and the
  fsdp split of `param_spec`).

  Returns the structure of `params_state` with a NamedSharding in place of
  each parameter (a valid `jax.device_put` / `out_shardings` prefix tree).
  """
  def sharding(path, leaf):
    return NamedSharding(mesh, param_spec(_leaf_axes(path, leaf),
                                          tuple(getattr(leaf, "shape", ())), mesh))
  return jax.tree_util.tree_map_with_path(sharding, params_state, is_leaf=_is_param)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the "batch" mesh axes, rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def shard_like(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`; shardings may be a prefix tree."""
  return jax.device_put(tree, shardings)
