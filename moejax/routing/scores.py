"""Scores and top-K selection of token-choice routers.

One function, `select_experts`, turns router logits into each token's K
experts and their combine weights, for every scoring rule moejax knows:

  * score_fn="softmax": probabilities p = softmax(logits) in float32; the K
    most probable experts are selected on p (ties to the lower expert index),
    exactly as vmoe and flaxformer do, so their routings are reproduced bit
    for bit, including near-ties that the float32 softmax rounds to equal
    probabilities.
  * score_fn="softmax_topk" (Mixtral, Jiang et al. 2024, §2.1: softmax over
    the top-K logits): selection on the logits themselves, weights the softmax
    over the K selected logits. Mathematically the same experts and weights
    as "softmax" with renormalization, but a 1-ulp logit gap stays a gap.
  * score_fn="sigmoid" (DeepSeek-V3, arXiv 2412.19437, §2.1.2 eq. 15-16):
    s = sigmoid(logits); weights are s of the selected experts, normalized
    over the K when `renormalize`. Without a bias or expert groups, selection
    is done on the logits (sigmoid is monotone, so the experts are the same,
    and saturated sigmoids cannot tie).

  * score_fn="sqrtsoftplus" (DeepSeek-V4, 2026): s = sqrt(softplus(logits)),
    otherwise as "sigmoid" (selection on s plus the bias, weights the
    unbiased s of the picks, normalized over the K when `renormalize`).
    Monotone too, so without a bias or groups selection is on the logits.

Then, for every rule:
  * `bias` <float32>[E] (auxiliary-loss-free balancing, Wang et al. 2024)
    is added to the selection scores only; weights come from unbiased scores.
  * group-limited routing (DeepSeek-V3's node-limited routing, §2.1.2 and
    its published gate): the E experts form `num_groups` contiguous groups,
    a group's score is the sum of its two highest (biased) selection scores,
    and experts outside the `top_groups` best groups are excluded before the
    top-K. (DeepSeek-V3's code scores a group by its maximum when it has no
    bias; moejax always uses the top-2 sum, as the paper describes.)
  * weights are multiplied by `routed_scaling_factor` (DeepSeek-V3's
    route_scale) after any renormalization.

Letters: G groups, S tokens per group, E experts, K choices per token.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
  """Each token's K experts (first choice first) and what the losses need.

  Attributes:
    experts: <int32>[G, S, K] selected experts in selection order.
    weights: <float32>[G, S, K] combine weights.
    scores: <float32>[G, S, E] per-expert scores of the balancing losses:
      softmax probabilities, or sigmoid scores normalized over E.
    priority: <float32>[G, S] the unbiased score of the first choice (Batch
      Prioritized Routing serves higher first).
  """
  experts: jax.Array
  weights: jax.Array
  scores: jax.Array
  priority: jax.Array


def _limit_to_top_groups(select: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
  """Sets the selection scores of experts outside the best groups to -inf."""
  *lead, num_experts = select.shape
  grouped = select.reshape(*lead, num_groups, num_experts // num_groups)
  best_two = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0]
  group_score = jnp.sum(best_two, axis=-1)  # [G, S, num_groups]
  _, chosen = jax.lax.top_k(group_score, top_groups)
  keep = jnp.sum(jax.nn.one_hot(chosen, num_groups, dtype=jnp.int32), axis=-2) > 0
  grouped = jnp.where(keep[..., None], grouped, -jnp.inf)
  return grouped.reshape(select.shape)


def select_experts(logits: jax.Array, *, top_k: int, score_fn: str = "softmax",
                   renormalize: bool = False, bias: Optional[jax.Array] = None,
                   num_groups: int = 1, top_groups: int = 1,
                   routed_scaling_factor: float = 1.0,
                   experts: Optional[jax.Array] = None) -> Selection:
  """Selects each token's K experts and their weights (see the module docstring).

  Given `experts` (a balanced assignment, a replayed trace), they are weighted
  on the rule's own code path: given its own picks, its weights bit for bit.

  Args:
    logits: <float32>[G, S, E] router logits (after any noise).
    top_k: K.
    score_fn: "softmax", "softmax_topk", "sigmoid" or "sqrtsoftplus".
    renormalize: divide the K weights by their sum ("softmax_topk" always is).
    bias: <float32>[E] added to the selection scores only, or None.
    num_groups, top_groups: group-limited routing; 1, 1 = off.
    routed_scaling_factor: multiplies the weights.
    experts: <int>[G, S, K] experts chosen otherwise, or None (top-K).

  Returns:
    A `Selection`.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  if score_fn in ("sigmoid", "sqrtsoftplus"):
    unbiased = (jax.nn.sigmoid(logits) if score_fn == "sigmoid"
                else jnp.sqrt(jax.nn.softplus(logits)))
    loss_scores = unbiased / jnp.sum(unbiased, axis=-1, keepdims=True)
    on_logits = bias is None and num_groups == 1
  elif score_fn == "softmax_topk":
    unbiased, loss_scores, on_logits = probs, probs, True
  elif score_fn == "softmax":
    unbiased, loss_scores, on_logits = probs, probs, False
  else:
    raise ValueError(f"unknown score_fn {score_fn!r}")

  top_select = None
  if experts is None:
    select = logits if on_logits else unbiased
    if bias is not None:
      select = select + bias.astype(jnp.float32)
    if num_groups > 1:
      select = _limit_to_top_groups(select, num_groups, top_groups)
    # lax.top_k breaks ties towards the lower index, as the contract requires.
    top_select, experts = jax.lax.top_k(select, top_k)
  if score_fn == "softmax_topk":
    top_logits = jnp.take_along_axis(logits, experts, axis=-1)
    weights = jax.nn.softmax(top_logits, axis=-1)
    priority = jnp.take_along_axis(probs, experts[..., :1], axis=-1)[..., 0]
  else:
    weights = (top_select if top_select is not None and bias is None and num_groups == 1
               and not on_logits else jnp.take_along_axis(unbiased, experts, axis=-1))
    priority = weights[..., 0]
    if renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  if routed_scaling_factor != 1.0:
    weights = weights * routed_scaling_factor
  return Selection(experts=experts.astype(jnp.int32), weights=weights.astype(jnp.float32),
                   scores=loss_scores, priority=priority)
