"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
Choice Routing", §3.1): each expert takes the C tokens of the group with the
highest probability for it. Loads are balanced by construction; a token may be
taken by 0..E experts.

Expert choice ranks tokens across the group, so a group that spans the
sequence lets a decoder see future tokens (Wang et al. 2024, §5.2). Route
groups across the batch at one position in causal decoders.
"""

import jax
import jax.numpy as jnp

from moejax.routing import metrics as metrics_lib
from moejax.routing.types import Routing


def expert_choice(probs: jax.Array, *, capacity: int) -> Routing:
  """Each expert takes its top-C tokens; the weight is that probability.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    capacity: C <= S, tokens per expert per group.

  Returns:
    An expert-major `Routing` (A = E*C) without z_loss (set by `route`). Its
    aux_loss is 0: the Expert Choice paper uses no balancing loss, since every
    expert processes exactly C tokens.
  """
  num_groups, num_tokens, num_experts = probs.shape
  # lax.top_k breaks ties towards the lower token position.
  weight, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C]
  token = token.reshape(num_groups, num_experts * capacity).astype(jnp.int32)
  expert = jnp.broadcast_to(
      jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), capacity),
      token.shape)
  slot = jnp.broadcast_to(
      jnp.tile(jnp.arange(capacity, dtype=jnp.int32), num_experts), token.shape)

  group = jnp.arange(num_groups)[:, None]
  experts_per_token = jnp.zeros((num_groups, num_tokens), jnp.int32).at[
      group, token].add(1)
  counts = jnp.full((num_groups, num_experts), capacity, jnp.int32)
  metrics = metrics_lib.load_metrics(counts, jnp.ones_like(token, dtype=bool))
  metrics["router_entropy"] = metrics_lib.router_entropy(probs)
  metrics["unrouted_fraction"] = jnp.mean((experts_per_token == 0).astype(jnp.float32))
  return Routing(
      token=token, expert=expert, slot=slot,
      weight=weight.reshape(num_groups, -1).astype(jnp.float32),
      aux_loss=jnp.zeros((), jnp.float32),
      z_loss=jnp.zeros((), jnp.float32),
      metrics=jax.lax.stop_gradient(metrics),
      num_tokens=num_tokens, num_experts=num_experts, capacity=capacity,
      choices_per_token=None)
