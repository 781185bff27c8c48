"""Token-choice routing: each token picks its K most probable experts.

Switch Transformer (K = 1, Fedus et al. 2021) and GShard / top-k (Lepikhin et
al. 2020; Shazeer et al. 2017). Slots are filled in priority order: every
token's 1st choice before any token's 2nd choice (GShard), and within one
choice rank by position in the group or, with `batch_prioritized`, by
descending top-1 probability (Batch Prioritized Routing, V-MoE, Riquelme et al.
2021, §3.1). An assignment that finds its expert full is dropped.

Slots come from one sort of the group's S*K assignments by (expert, priority),
which costs O(S*K log(S*K)) whatever E is; no [S, E] one-hot is cumulated.
"""

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing import metrics as metrics_lib
from moejax.routing.types import Routing


def _priority_rank(top_probs: jax.Array, batch_prioritized: bool) -> jax.Array:
  """<int32>[G, S] rank of each token within its group (0 = served first)."""
  num_groups, num_tokens = top_probs.shape[:2]
  if not batch_prioritized:
    return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32),
                            (num_groups, num_tokens))
  # Descending top-1 probability; the stable sort keeps ties in position order.
  order = jnp.argsort(-top_probs[..., 0], axis=-1, stable=True)
  group = jnp.arange(num_groups)[:, None]
  rank = jnp.zeros((num_groups, num_tokens), jnp.int32)
  return rank.at[group, order].set(jnp.arange(num_tokens, dtype=jnp.int32))


def _slots_in_priority_order(expert: jax.Array, priority: jax.Array,
                             num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Position of each assignment within its expert's queue.

  Args:
    expert: <int32>[G, A] chosen expert per assignment.
    priority: <int32>[G, A] unique priority per assignment (lower first),
      in [0, A).
    num_experts: E.

  Returns:
    slot: <int32>[G, A] number of assignments to the same expert with a lower
      priority (before any capacity cut).
    counts: <int32>[G, E] assignments per expert.
  """
  num_groups, num_assign = expert.shape
  group = jnp.arange(num_groups)[:, None]
  key = expert * num_assign + priority  # unique within a group
  order = jnp.argsort(key, axis=-1)
  sorted_expert = jnp.take_along_axis(expert, order, axis=-1)
  counts = jnp.zeros((num_groups, num_experts), jnp.int32).at[group, expert].add(1)
  starts = jnp.cumsum(counts, axis=-1) - counts
  sorted_slot = (jnp.arange(num_assign, dtype=jnp.int32)
                 - jnp.take_along_axis(starts, sorted_expert, axis=-1))
  slot = jnp.zeros_like(expert).at[group, order].set(sorted_slot)
  return slot, counts


def token_choice(probs: jax.Array, *, top_k: int, capacity: int,
                 batch_prioritized: bool, renormalize: bool) -> Routing:
  """Routes each token to its top-K experts under a per-expert capacity.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    top_k: K, experts per token.
    capacity: C, slots per expert per group.
    batch_prioritized: serve tokens by descending top-1 probability instead of
      by position.
    renormalize: divide each token's K weights by their sum.

  Returns:
    A token-major `Routing` (A = S*K) without z_loss (set by `route`).
  """
  num_groups, num_tokens, num_experts = probs.shape
  # lax.top_k breaks ties towards the lower index, as the contract requires.
  top_probs, top_experts = jax.lax.top_k(probs, top_k)  # [G, S, K]
  weight = top_probs
  if renormalize:
    weight = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)

  rank = _priority_rank(top_probs, batch_prioritized)  # [G, S]
  choice = jnp.arange(top_k, dtype=jnp.int32)
  priority = choice[None, None, :] * num_tokens + rank[:, :, None]  # [G, S, K]

  expert = top_experts.reshape(num_groups, num_tokens * top_k).astype(jnp.int32)
  slot, counts = _slots_in_priority_order(
      expert, priority.reshape(num_groups, -1), num_experts)
  kept = slot < capacity
  slot = jnp.where(kept, slot, capacity)
  weight = jnp.where(kept, weight.reshape(num_groups, -1), 0.0)
  token = jnp.broadcast_to(
      jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k),
      (num_groups, num_tokens * top_k))

  metrics = metrics_lib.load_metrics(counts, kept)
  metrics["router_entropy"] = metrics_lib.router_entropy(probs)
  return Routing(
      token=token, expert=expert, slot=slot, weight=weight.astype(jnp.float32),
      aux_loss=losses.load_balancing_loss(probs, counts),
      z_loss=jnp.zeros((), jnp.float32),
      metrics=jax.lax.stop_gradient(metrics),
      num_tokens=num_tokens, num_experts=num_experts, capacity=capacity,
      choices_per_token=top_k)
