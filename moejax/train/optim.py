"""The optimizer: AdamW (or Muon on the matrices) with linear warmup, cosine
decay and gradient clipping."""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers
from optax.contrib import scale_by_muon
from optax.transforms import MaskedNode

from moejax.parallel import rules

OPTIMIZERS = ("adamw", "muon")
# Axes Muon treats as independent matrices (never orthogonalized across):
# the scanned layers, the routed experts (marin #8621 took one Frobenius norm
# over [L, E, D, F]), and the fused q / k / v of one kernel.
MUON_BATCH_AXES = ("layers", "expert", "qkv")
# Axes a kernel is applied along (x W): the reduction side of its matrix.
_INPUT_AXES = ("embed", "mlp", "latent")
# Moonlight's update scale: 0.2 sqrt(max(fan_in, fan_out)) matches AdamW's
# update RMS, so Muon runs at AdamW's learning rate (Liu et al. 2025, §2.2).
MUON_CONSISTENT_RMS = 0.2


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps`, then cosine decay to
  `learning_rate * final_lr_fraction` at `schedule_steps` (default `steps`;
  Loshchilov & Hutter 2017), constant after. A function of the step only, so a
  resumed run follows the same curve.

  When `warmup_steps` reaches the end of the schedule (a short smoke test of a
  config with the default warmup), the run is all warmup: the rate rises by
  `learning_rate / warmup_steps` per step, as in the first steps of the
  configured run, never decays, and holds at `learning_rate` after
  `warmup_steps`.
  """
  schedule_steps = train.schedule_steps if train.get("schedule_steps") else train.steps
  if train.warmup_steps >= schedule_steps:
    return optax.linear_schedule(init_value=0.0, end_value=train.learning_rate,
                                 transition_steps=train.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=schedule_steps, end_value=train.learning_rate * train.final_lr_fraction)


def _decay_mask(params):
  """Decay matrices (kernels, embeddings), not RMSNorm scales or vectors. A
  scanned stack's leading "layers" axis does not count, so the scanned and
  unscanned layouts decay the same parameters (`scan_layers` changes no
  number)."""
  def decays(path, p):
    stacked = bool(path) and getattr(path[0], "key", None) == "stack"
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def muon_dimensions(axes: tuple[Optional[str], ...],
                    shape: tuple[int, ...]) -> Optional[MuonDimensionNumbers]:
  """How Muon sees a parameter with logical `axes` (`parallel.rules`), or None
  for AdamW (embeddings, routers, norms, vectors).

  Batch axes (`MUON_BATCH_AXES`) stay independent: an [E, D, H] expert kernel
  is E matrices [D, H]. Of the rest, the reduction side is the first axis when
  the kernel is applied along it (x W: D of [D, H], H of [H, D]), else every
  axis but the last (attention's output [N, P, D] is one [N P, D] matrix)."""
  if "vocab" in axes or "router" in axes:
    return None
  rest = [i for i, axis in enumerate(axes) if axis not in MUON_BATCH_AXES]
  if len(rest) < 2 or min(shape[i] for i in rest) < 2:
    return None
  reduction = rest[:1] if axes[rest[0]] in _INPUT_AXES else rest[:-1]
  output = [i for i in rest if i not in reduction]
  return MuonDimensionNumbers(reduction_axis=tuple(reduction), output_axis=tuple(output))


def _dimensions_of(path: tuple, leaf: Any) -> Any:
  """`muon_dimensions` of one optimizer leaf (its path may end in the nnx
  Variable's `.value`); MaskedNode stays (optax.partition's masked leaves)."""
  if isinstance(leaf, MaskedNode):
    return leaf
  if path and rules.key_name(path[-1]) == "value":
    path = path[:-1]
  return muon_dimensions(rules.leaf_axes(path, leaf), tuple(leaf.shape))


def _dimensions_tree(params) -> Any:
  return jax.tree_util.tree_map_with_path(_dimensions_of, params,
                                          is_leaf=lambda x: isinstance(x, MaskedNode))


def _rms_matched() -> optax.GradientTransformation:
  """Scales each orthogonalized update by 0.2 sqrt(max(fan_in, fan_out)) of
  its matrix (`MUON_CONSISTENT_RMS`)."""
  def update(updates, state, params=None):
    del params

    def scale(path, u):
      dims = _dimensions_of(path, u)
      if isinstance(u, MaskedNode) or dims is None:
        return u
      fan_in = math.prod(u.shape[i] for i in dims.reduction_axis)
      fan_out = math.prod(u.shape[i] for i in dims.output_axis)
      return u * (MUON_CONSISTENT_RMS * math.sqrt(max(fan_in, fan_out)))
    return jax.tree_util.tree_map_with_path(
        scale, updates, is_leaf=lambda x: isinstance(x, MaskedNode)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _auto_sharded(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` whose update runs with an Explicit mesh's axes made Auto (GSPMD
  places the steps), its outputs laid out as the updates and state came in.
  optax's Newton-Schulz reshapes each matrix to [batch, in, out], which an
  Explicit mesh refuses where it merges a split axis (a kernel split over
  "fsdp" or "model"); under Auto, XLA moves the pieces it needs."""
  def update(updates, state, params=None):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
      return tx.update(updates, state, params)
    specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, (updates, state))
    return jax.sharding.auto_axes(tx.update, out_sharding=specs)(updates, state, params)
  return optax.GradientTransformation(tx.init, update)


def _muon(train: ml_collections.ConfigDict, schedule: optax.Schedule
          ) -> optax.GradientTransformation:
  """Muon (Jordan et al. 2024: Nesterov momentum 0.95, then 5 Newton-Schulz
  steps, optax's `scale_by_muon`) on the matrices, one per batch axis
  (`muon_dimensions`), with Moonlight's RMS-matched scale and decoupled weight
  decay (Liu et al. 2025); AdamW (b1, b2, the decay mask of `_decay_mask`) on
  the rest. One schedule and one weight decay for both."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: "adamw" if _dimensions_of(path, leaf) is None else "muon", params)
  muon = optax.chain(
      _auto_sharded(scale_by_muon(beta=0.95, nesterov=True,
                                  weight_dimension_numbers=_dimensions_tree)),
      _rms_matched(),
      optax.add_decayed_weights(train.weight_decay),
      optax.scale_by_learning_rate(schedule))
  adamw = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                      mask=_decay_mask)
  return optax.partition({"muon": muon, "adamw": adamw}, labels)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm (off when grad_clip = 0), then AdamW (decoupled weight
  decay on matrices only, Loshchilov & Hutter 2019) or, with
  `train.optimizer="muon"`, Muon (`_muon`). The state has the same structure
  whatever the other options, so a run can resume with other values."""
  optimizer = train.get("optimizer", "adamw")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"config.train.optimizer must be one of {list(OPTIMIZERS)}, got "
                     f"{optimizer!r}")
  schedule = learning_rate_schedule(train)
  if optimizer == "muon":
    inner = _muon(train, schedule)
  else:
    inner = optax.adamw(schedule, b1=train.b1, b2=train.b2,
                        weight_decay=train.weight_decay, mask=_decay_mask)
  max_norm = train.grad_clip if train.grad_clip else float("inf")
  tx = optax.chain(optax.clip_by_global_norm(max_norm), inner)
  moment_dtype = train.get("moment_dtype", "float32")
  return tx if moment_dtype == "float32" else stored_in(tx, jnp.dtype(moment_dtype))


def stored_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` whose floating-point state is stored in `dtype` (bfloat16 halves the
  memory of Adam's two moments) and computed in float32: each update reads
  the state up to float32, runs `tx`, and rounds the new state back.

  optax's `mu_dtype` covers the first moment only; this covers both. Rounding
  the second moment to bfloat16 (8 bits of mantissa) perturbs each update's
  denominator by at most ~0.2% relative (half of 2^-8 under the square
  root), and the count stays an integer.
  """
  def cast(tree, to):
    return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)

  def init(params):
    return cast(tx.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)
