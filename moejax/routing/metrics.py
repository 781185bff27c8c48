"""Router metrics, reported with every `Routing` (no gradients flow through)."""

import jax
import jax.numpy as jnp


def router_entropy(probs: jax.Array) -> jax.Array:
  """<float32>[] mean over tokens of the entropy (nats) of the router softmax."""
  log_probs = jnp.log(jnp.clip(probs, 1e-30, None))
  return jnp.mean(-jnp.sum(probs * log_probs, axis=-1))


def load_metrics(expert_counts: jax.Array, kept: jax.Array) -> dict[str, jax.Array]:
  """Load metrics from per-group choice counts and the kept mask.

  Args:
    expert_counts: [G, E] assignments requested per expert (before drops).
    kept: <bool>[G, A] whether each assignment got a slot.

  Returns:
    expert_load: <float32>[E] fraction of all requested assignments per expert.
    load_max_over_mean: <float32>[] max_e load / mean_e load (1.0 = balanced).
    dropped_fraction: <float32>[] fraction of assignments that found no slot.
  """
  counts = jnp.sum(expert_counts, axis=0).astype(jnp.float32)
  load = counts / jnp.sum(counts)
  return {
      "expert_load": load,
      "load_max_over_mean": jnp.max(load) * load.shape[0],
      "dropped_fraction": jnp.mean((~kept).astype(jnp.float32)),
  }
