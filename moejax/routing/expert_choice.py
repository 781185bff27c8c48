"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
Choice Routing", §3.1): each expert takes the C tokens of the group with the
highest probability for it. Loads are balanced by construction; a token may be
taken by 0..E experts.

Expert choice ranks tokens across the group, so a group that spans the
sequence lets a decoder see future tokens (Wang et al. 2024, §5.2). Route
groups across the batch at one position in causal decoders.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from moejax.routing import metrics as metrics_lib
from moejax.routing.types import Routing


def expert_choice(probs: jax.Array, *, capacity: int,
                  mask: Optional[jax.Array] = None) -> Routing:
  """Each expert takes its top-C tokens; the weight is that probability.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    capacity: C <= S, tokens per expert per group.
    mask: <bool>[G, S] real tokens (None = all). A padded token is never
      preferred to a real one; where an expert's C slots outnumber the real
      tokens, the slots left for padding are empty (dropped).

  Returns:
    An expert-major `Routing` (A = E*C) without z_loss (set by `route`). Its
    aux_loss is 0: the Expert Choice paper uses no balancing loss, since every
    expert processes exactly C tokens.
  """
  num_groups, num_tokens, num_experts = probs.shape
  ranked = jnp.swapaxes(probs, 1, 2)  # [G, E, S]
  if mask is not None:
    ranked = jnp.where(mask[:, None, :], ranked, -1.0)  # below every probability
  # lax.top_k breaks ties towards the lower token position.
  weight, token = jax.lax.top_k(ranked, capacity)  # [G, E, C]
  token = token.reshape(num_groups, num_experts * capacity).astype(jnp.int32)
  weight = weight.reshape(num_groups, -1)
  expert = jnp.broadcast_to(
      jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), capacity),
      token.shape)
  slot = jnp.broadcast_to(
      jnp.tile(jnp.arange(capacity, dtype=jnp.int32), num_experts), token.shape)
  group = jnp.arange(num_groups)[:, None]
  if mask is None:
    kept = jnp.ones_like(token, dtype=bool)
    counts = jnp.full((num_groups, num_experts), capacity, jnp.int32)
  else:
    kept = mask[group, token]
    slot = jnp.where(kept, slot, capacity)
    weight = jnp.where(kept, weight, 0.0)
    counts = jnp.zeros((num_groups, num_experts), jnp.int32).at[group, expert].add(
        kept.astype(jnp.int32))

  experts_per_token = jnp.zeros((num_groups, num_tokens), jnp.int32).at[
      group, token].add(kept.astype(jnp.int32))
  # Slots left empty for lack of real tokens are not drops of real tokens.
  metrics = metrics_lib.load_metrics(counts, kept, kept)
  metrics["router_entropy"] = metrics_lib.router_entropy(probs, mask)
  metrics["unrouted_fraction"] = metrics_lib.masked_mean(
      (experts_per_token == 0).astype(jnp.float32), mask)
  return Routing(
      token=token, expert=expert, slot=slot, weight=weight.astype(jnp.float32),
      aux_loss=jnp.zeros((), jnp.float32),
      z_loss=jnp.zeros((), jnp.float32),
      metrics=jax.lax.stop_gradient(metrics),
      num_tokens=num_tokens, num_experts=num_experts, capacity=capacity,
      choices_per_token=None)
