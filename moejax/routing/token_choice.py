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

from typing import Optional

import jax
import jax.numpy as jnp

from moejax.routing import metrics as metrics_lib
from moejax.routing.types import Routing


def _priority_rank(priority: jax.Array, batch_prioritized: bool,
                   mask: Optional[jax.Array]) -> jax.Array:
  """<int32>[G, S] rank of each token within its group (0 = served first).

  Padded tokens (mask False) rank after every real token, so they never
  take a slot a real token wants.
  """
  num_groups, num_tokens = priority.shape
  if not batch_prioritized and mask is None:
    return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32),
                            (num_groups, num_tokens))
  # Descending priority (BPR) or position; the stable sort keeps ties in
  # position order, and padding sorts last.
  key = -priority if batch_prioritized else jnp.zeros_like(priority)
  if mask is not None:
    key = jnp.where(mask, key, jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)
  group = jnp.arange(num_groups)[:, None]
  rank = jnp.zeros((num_groups, num_tokens), jnp.int32)
  return rank.at[group, order].set(jnp.arange(num_tokens, dtype=jnp.int32))


def _slots_in_priority_order(expert: jax.Array, priority: jax.Array,
                             num_experts: int, num_priorities: int) -> jax.Array:
  """Position of each assignment within its expert's queue.

  Args:
    expert: <int32>[G, A] chosen expert per assignment.
    priority: <int32>[G, A] unique priority per assignment (lower first),
      in [0, num_priorities).
    num_experts: E.
    num_priorities: a bound on the priorities.

  Returns:
    <int32>[G, A] number of assignments to the same expert with a lower
    priority (before any capacity cut).
  """
  num_groups, num_assign = expert.shape
  group = jnp.arange(num_groups)[:, None]
  key = expert * num_priorities + priority  # unique within a group
  order = jnp.argsort(key, axis=-1)
  sorted_expert = jnp.take_along_axis(expert, order, axis=-1)
  counts = jnp.zeros((num_groups, num_experts), jnp.int32).at[group, expert].add(1)
  starts = jnp.cumsum(counts, axis=-1) - counts
  sorted_slot = (jnp.arange(num_assign, dtype=jnp.int32)
                 - jnp.take_along_axis(starts, sorted_expert, axis=-1))
  return jnp.zeros_like(expert).at[group, order].set(sorted_slot)


def token_choice(experts: jax.Array, weights: jax.Array, priority: jax.Array, *,
                 num_experts: int, capacity: int, batch_prioritized: bool,
                 mask: Optional[jax.Array] = None) -> Routing:
  """Gives each token's K chosen experts slots under a per-expert capacity.

  Args:
    experts: <int32>[G, S, K] each token's experts, first choice first
      (`routing.scores.select_experts`).
    weights: <float32>[G, S, K] their combine weights.
    priority: <float32>[G, S] score of each token's first choice (used with
      `batch_prioritized`).
    num_experts: E.
    capacity: C, slots per expert per group.
    batch_prioritized: serve tokens by descending priority instead of
      position.
    mask: <bool>[G, S] real tokens, or None (all real). Padded tokens take no
      slot: their assignments are dropped and count in no load metric.

  Returns:
    A token-major `Routing` (A = S*K) with zero losses (the router sets them)
    and the load metrics.
  """
  num_groups, num_tokens, top_k = experts.shape
  rank = _priority_rank(priority, batch_prioritized, mask)  # [G, S]
  choice = jnp.arange(top_k, dtype=jnp.int32)
  order = choice[None, None, :] * num_tokens + rank[:, :, None]  # [G, S, K]
  num_priorities = num_tokens * top_k
  if mask is not None:
    # Every choice of a padded token queues after every real assignment.
    order = jnp.where(mask[..., None], order, order + num_priorities)
    num_priorities *= 2

  expert = experts.reshape(num_groups, num_tokens * top_k).astype(jnp.int32)
  slot = _slots_in_priority_order(expert, order.reshape(num_groups, -1), num_experts,
                                  num_priorities)
  kept = slot < capacity
  valid = None
  if mask is not None:
    valid = jnp.repeat(mask, top_k, axis=-1)
    kept = kept & valid
  slot = jnp.where(kept, slot, capacity)
  weight = jnp.where(kept, weights.reshape(num_groups, -1), 0.0)
  token = jnp.broadcast_to(
      jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k),
      (num_groups, num_tokens * top_k))
  group = jnp.arange(num_groups)[:, None]
  requested = jnp.ones_like(expert) if valid is None else valid.astype(jnp.int32)
  counts = jnp.zeros((num_groups, num_experts), jnp.int32).at[group, expert].add(requested)
  zero = jnp.zeros((), jnp.float32)
  return Routing(
      token=token, expert=expert, slot=slot, weight=weight.astype(jnp.float32),
      aux_loss=zero, z_loss=zero,
      metrics=jax.lax.stop_gradient(metrics_lib.load_metrics(counts, kept, valid)),
      num_tokens=num_tokens, num_experts=num_experts, capacity=capacity,
      choices_per_token=top_k)
