"""Router metrics, reported with every `Routing` (no gradients flow through)."""

from typing import Optional

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean of `values` over the entries where `mask` is True (all if None)."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def router_entropy(probs: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """<float32>[] mean over (real) tokens of the entropy (nats) of the scores
  `probs` <float32>[G, S, E] (each token's sum to 1)."""
  log_probs = jnp.log(jnp.clip(probs, 1e-30, None))
  return masked_mean(-jnp.sum(probs * log_probs, axis=-1), mask)


def load_metrics(expert_counts: jax.Array, kept: jax.Array,
                 valid: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Load metrics from per-group choice counts and the kept mask.

  Args:
    expert_counts: [G, E] assignments requested per expert (before drops).
    kept: <bool>[G, A] whether each assignment got a slot.
    valid: <bool>[G, A] assignments of real tokens (None = all); the others
      count in no metric.

  Returns:
    expert_counts: <float32>[E] requested assignments per expert (summed, not
      averaged, over devices under expert parallelism).
    expert_load: <float32>[E] fraction of all requested assignments per expert.
    load_max_over_mean: <float32>[] max_e load / mean_e load (1.0 = balanced).
    dropped_fraction: <float32>[] fraction of assignments that found no slot.
  """
  counts = jnp.sum(expert_counts, axis=0).astype(jnp.float32)
  load = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return {
      "expert_counts": counts,
      "expert_load": load,
      "load_max_over_mean": jnp.max(load) * load.shape[0],
      "dropped_fraction": masked_mean((~kept).astype(jnp.float32), valid),
  }
