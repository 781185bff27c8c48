"""Router auxiliary losses. Each formula is written here once."""

import jax
import jax.numpy as jnp


def load_balancing_loss(probs: jax.Array, expert_counts: jax.Array) -> jax.Array:
  """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6).

      loss = E * sum_e f_e * P_e, averaged over groups,
  with f_e the fraction of the group's S*K expert choices that picked e (before
  capacity drops) and P_e the mean router probability of e over the group's
  tokens. A perfectly balanced router scores 1.0 for every K.

  Peers differ for K > 1. flaxformer counts the fraction of *tokens* that
  chose e among their K (sum_e f_e = K), so its loss is K times this one
  (balanced = K). vmoe's `gshard_loss` counts only each token's *first*
  choice (a one-hot of the argmax) and scores 1.0 when balanced for every K,
  but ignores the later choices. We divide by the S*K choices so the loss
  weight means the same thing for every K and every choice counts.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    expert_counts: <int32|float32>[G, E] number of choices per expert per group.

  Returns:
    <float32>[] the loss.
  """
  num_experts = probs.shape[-1]
  choice_fraction = expert_counts / jnp.sum(expert_counts, axis=-1, keepdims=True)
  mean_prob = jnp.mean(probs, axis=1)
  per_group = num_experts * jnp.sum(choice_fraction * mean_prob, axis=-1)
  return jnp.mean(per_group).astype(jnp.float32)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5).

      loss = mean over the G*S tokens of logsumexp_e(logits)^2.

  Args:
    logits: <float32>[G, S, E] router logits (before noise).

  Returns:
    <float32>[] the loss.
  """
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(log_z))
