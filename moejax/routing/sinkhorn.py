"""Sinkhorn-balanced router scores (S-BASE: Clark et al. 2022, "Unified
Scaling Laws for Routed Language Models", §2.2 and App. A; the iteration is
Sinkhorn & Knopp 1967).

BASE layers solve a balanced linear assignment of tokens to experts; S-BASE
replaces the exact solver by a few Sinkhorn iterations on exp(logits), which
approach the doubly-constrained matrix closest (in KL) to softmax(logits):
every token row sums to 1 and every expert column to (real tokens) / E. Top-k
over that matrix picks experts with almost equal loads.

Letters: G groups, S tokens per group, E experts.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def sinkhorn_scores(logits: jax.Array, num_iterations: int,
                    mask: Optional[jax.Array] = None) -> jax.Array:
  """Balances exp(logits) per group by alternate column / row normalization.

  The scores are for SELECTING experts only (e.g. lax.top_k over the last
  axis). As in S-BASE, the weight that scales an expert's output should come
  from the router's own softmax(logits) at the selected experts, not from
  these scores: they encode load balance, not the router's confidence, and
  back-propagating through the iterations is wasted work.

  Args:
    logits: <float32>[G, S, E] router logits.
    num_iterations: static number of rounds; each round normalizes the expert
      columns, then the token rows. 0 returns softmax(logits) over experts.
    mask: <bool>[G, S], True for real tokens; None means all tokens are real.

  Returns:
    <float32>[G, S, E] non-negative scores. Every real token's row sums to 1
    (exactly up to rounding, as the last step is the row normalization);
    each expert column sums to (number of real tokens in the group) / E in the
    limit of many iterations. Padded tokens have all-zero rows and do not
    count towards any column; a group of padding only is all zeros.
  """
  num_experts = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(logits.shape[:2], dtype=bool)
  real = mask.astype(bool)[:, :, None]  # [G, S, 1]

  # Balanced-assignment target: rows carry one unit of mass per real token,
  # so the E columns share the group's n_real units equally (the only column
  # target with the same total as the rows). What balances the experts is
  # that the targets are equal: a common factor cancels in the row step, so
  # n_real / E changes no output; it keeps the iterates the textbook ones.
  # max(., 1): a padding-only group has no target; its output is zeroed below.
  num_real = jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=1)[:, None, None], 1.0)
  log_column_target = jnp.log(num_real / num_experts)

  # Iterate in the log domain: the updates of scaling exp(logits - max) by row and
  # column factors, but skewed logits cannot underflow a column to 0 and divide by it.
  # Padded rows: 0 (finite, so no NaN reaches the output), kept out of the
  # column sums by the -inf below.
  scores = jnp.where(real, logits, 0.0)
  # The first row normalization turns exp(logits - row max) into softmax;
  # Sinkhorn's fixed point does not depend on that row scaling, and starting
  # from the router probabilities makes num_iterations = 0 meaningful.
  scores = scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)

  def one_round(_, scores):
    # Column step: each expert column sums to n_real / E over real tokens.
    column = jax.nn.logsumexp(jnp.where(real, scores, -jnp.inf), axis=1,
                              keepdims=True)
    # -inf only for a padding-only group; shifting by 0 keeps it finite.
    column = jnp.where(jnp.isfinite(column), column, 0.0)
    scores = scores - column + log_column_target
    # Row step: each token's row sums to 1.
    return scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)

  scores = jax.lax.fori_loop(0, num_iterations, one_round, scores)
  return jnp.where(real, jnp.exp(scores), 0.0)
