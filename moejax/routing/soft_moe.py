"""Soft MoE routing weights (Puigcerver et al. 2023, "From Sparse to Soft
Mixtures of Experts", §2.1-2.3).

Every expert e has P slots. Each slot is a convex combination of the tokens of
its group (dispatch), and each token's output is a convex combination of all
E*P slot outputs (combine). Both come from one logit tensor, so no token is
dropped and no balancing loss is needed.

Letters: G groups, S tokens per group, D model width, E experts, P slots per
expert.
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

# Same float-noise rounding as moejax/routing/capacity.py: 1.1 * 10 is
# 11.000000000000002 in binary floating point and must not round up to 12.
_SLOT_DECIMALS = 9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis`.

  Args:
    x: <float>[...] any array.
    axis: the axis to normalize over.
    eps: added to the squared norm, so an all-zero vector (a zero-padded
      token) maps to zero with finite gradients instead of 0/0.

  Returns:
    <float>[...] x / sqrt(sum(x^2, axis) + eps), same shape and dtype as x.
  """
  # rsqrt of (norm^2 + eps) rather than x / max(norm, eps): smooth everywhere,
  # so the gradient never sees the kink of max() at small norms.
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_moe_slots(num_tokens: int, num_experts: int, capacity_factor: float,
                   min_capacity: int = 1) -> int:
  """Slots per expert P, so that the E*P slots match capacity_factor * S.

  Soft MoE (§2.1) processes E*P slots per group; with E*P = S the layer costs
  the same as one dense expert applied to every token, so capacity_factor
  plays the role of "experts per token" of sparse routers:
      P = max(min_capacity, ceil(capacity_factor * S / E)).

  Args:
    num_tokens: S, tokens per group.
    num_experts: E.
    capacity_factor: > 0, total slots per group as a multiple of S.
    min_capacity: lower bound on P.

  Returns:
    P, a Python int (a static shape).
  """
  # Elsewhere capacity_factor == 0 means "dropless"; Soft MoE has no such mode
  # and 0 would silently fall back to min_capacity slots.
  if capacity_factor <= 0:
    raise ValueError(f"soft MoE needs capacity_factor > 0, got {capacity_factor}")
  return max(min_capacity, math.ceil(round(
      capacity_factor * num_tokens / num_experts, _SLOT_DECIMALS)))


def soft_moe_weights(
    x: jax.Array, slot_params: jax.Array, scale: jax.Array,
    mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Dispatch and combine weights of Soft MoE.

  Args:
    x: <float32>[G, S, D] tokens.
    slot_params: <float32>[D, E, P] one learned vector (Phi in the paper) per
      slot.
    scale: <float32>[] learned scalar multiplying the normalized logits.
    mask: <bool>[G, S], True for real tokens; None means all tokens are real.

  Returns:
    dispatch: <float32>[G, S, E, P]; dispatch[g, :, e, p] sums to 1 over the
      real tokens of group g (all zeros if the group has none), and is exactly
      0 at padded tokens. Slot inputs are einsum("gsep,gsd->gepd", dispatch, x).
    combine: <float32>[G, S, E, P]; combine[g, s] sums to 1 over the E*P slots
      for a real token and is all zeros for a padded one. Outputs are
      einsum("gsep,gepd->gsd", combine, slot_outputs).
  """
  num_groups, num_tokens, _ = x.shape
  _, num_experts, num_slots = slot_params.shape
  x = x.astype(jnp.float32)
  # §2.3 "Normalization": with large D the raw dot products grow and the
  # softmaxes collapse to one-hots; normalizing tokens and slot parameters over
  # D and learning the temperature keeps the logits O(scale).
  tokens = l2_normalize(x, axis=-1)
  phi = l2_normalize(slot_params.astype(jnp.float32), axis=0)
  # HIGHEST: the default matmul precision on GPU/TPU (TF32 / bf16 passes)
  # perturbs the logits by ~1e-3, enough to move softmax weights visibly.
  logits = jnp.asarray(scale, jnp.float32) * jnp.einsum(
      "gsd,dep->gsep", tokens, phi, precision=jax.lax.Precision.HIGHEST)

  if mask is None:
    mask = jnp.ones((num_groups, num_tokens), dtype=bool)
  real = mask.astype(bool)[:, :, None, None]  # [G, S, 1, 1]

  # §2.1, dispatch D = softmax over the tokens (columns of X Phi) per slot.
  # Padded tokens get logit -inf so they take no share of any slot.
  dispatch_logits = jnp.where(real, logits, -jnp.inf)
  top = jnp.max(dispatch_logits, axis=1, keepdims=True)
  # A group of padding only has top = -inf and -inf - -inf = NaN; any finite
  # shift gives exp(-inf) = 0 there instead.
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  numerator = jnp.where(real, jnp.exp(dispatch_logits - top), 0.0)
  denominator = jnp.sum(numerator, axis=1, keepdims=True)
  # The denominator is 0 only for a padding-only group, whose numerators are
  # all 0: dividing by 1 there yields zero slots instead of NaN.
  dispatch = numerator / jnp.where(denominator > 0, denominator, 1.0)

  # §2.1, combine C = softmax over all E*P slots (rows of X Phi) per token.
  combine = jax.nn.softmax(
      logits.reshape(num_groups, num_tokens, num_experts * num_slots), axis=-1)
  combine = combine.reshape(num_groups, num_tokens, num_experts, num_slots)
  # A padded token's output is discarded anyway; zero rows make that explicit
  # and keep its gradient out of the slot outputs.
  combine = jnp.where(real, combine, 0.0)
  return dispatch, combine
