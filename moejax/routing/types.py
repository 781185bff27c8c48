"""The `Routing` value: everything a router decides, and nothing else.

Routers produce a `Routing`; dispatchers consume it. A routing is a list of
*assignments* per group: assignment `a` of group `g` sends token `token[g, a]`
to slot `slot[g, a]` of expert `expert[g, a]`, and the expert's output for it
comes back multiplied by `weight[g, a]`.

Letters: G groups, S tokens per group, E experts, C capacity (slots per expert
per group), K choices per token, A assignments per group.

Two layouts exist:
  * token-major (token choice): A = S * K and assignment `a` belongs to token
    `a // K`; `choices_per_token == K`.
  * expert-major (expert choice): A = E * C and assignment `a` is slot `a % C`
    of expert `a // C`; `choices_per_token is None`.
Dispatchers may use the token-major structure for speed but must accept both.

An assignment that found its expert full is *dropped*: its `slot` equals
`capacity` (one past the last slot) and its `weight` is 0, so the token's
output from that expert is zero and the residual carries the token.

A third, *dense* form holds Soft MoE (Puigcerver et al. 2023): every slot
is a weighted average of all the group's tokens, and every token a weighted
average of all slots. Then `token`, `expert`, `slot` and `weight` are None
and `dispatch` / `combine` <float32>[G, S, E, C] hold the weights (C slots
per expert); only the einsum dispatcher consumes it.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Routing:
  """Assignments of tokens to expert slots, with losses and metrics.

  Attributes:
    token: <int32>[G, A] position of the assigned token within its group.
    expert: <int32>[G, A] expert index of the assignment.
    slot: <int32>[G, A] slot in the expert's capacity buffer; `capacity` when
      the assignment was dropped.
    weight: <float32>[G, A] combine weight; 0 when dropped.
    aux_loss: <float32>[] load-balancing loss (Switch form, balanced = 1.0).
    z_loss: <float32>[] router z-loss (ST-MoE).
    metrics: dict of router metrics (see `routing.metrics`).
    num_tokens: S, tokens per group.
    num_experts: E.
    capacity: C, slots per expert per group.
    choices_per_token: K for the token-major layout, None otherwise.
    dispatch: <float32>[G, S, E, C] dense dispatch weights (Soft MoE: the
      weight of token s in slot c of expert e), or None.
    combine: <float32>[G, S, E, C] dense combine weights (the weight of
      that slot's output in token s), or None.
  """

  token: Optional[jax.Array]
  expert: Optional[jax.Array]
  slot: Optional[jax.Array]
  weight: Optional[jax.Array]
  aux_loss: jax.Array
  z_loss: jax.Array
  metrics: dict[str, Any]
  num_tokens: int = struct.field(pytree_node=False)
  num_experts: int = struct.field(pytree_node=False)
  capacity: int = struct.field(pytree_node=False)
  choices_per_token: Optional[int] = struct.field(pytree_node=False, default=None)
  dispatch: Optional[jax.Array] = None
  combine: Optional[jax.Array] = None

  @property
  def is_dense(self) -> bool:
    """Whether this is the dense (Soft MoE) form."""
    return self.dispatch is not None

  @property
  def num_groups(self) -> int:
    return (self.dispatch if self.is_dense else self.token).shape[0]

  def first_expert(self) -> jax.Array:
    """<int32>[G, S] each token's first expert: its first choice (token
    choice, even if dropped), else the expert of its largest combine weight;
    -1 where no expert processes the token."""
    if self.choices_per_token is not None:
      return self.expert.reshape(self.num_groups, self.num_tokens, -1)[..., 0]
    weights = self.combine_weights()
    return jnp.where(jnp.any(weights > 0, axis=-1),
                     jnp.argmax(weights, axis=-1), -1).astype(jnp.int32)

  def token_choices(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each token's experts in rank order, as a trace records them.

    Returns (experts <int32>[G, S, K'], weights <float32>[G, S, K'], kept
    <bool>[G, S, K']). Token choice: K' = K, the choices in selection order
    (a dropped one has kept False and weight 0). Otherwise (expert choice,
    Soft MoE): K' = E, the experts by descending combine weight, kept where
    the weight is > 0 (expert choice gives a token 0..E experts).
    """
    if self.choices_per_token is not None:
      shape = (self.num_groups, self.num_tokens, self.choices_per_token)
      kept = self.kept.reshape(shape)
      return (self.expert.reshape(shape).astype(jnp.int32),
              jnp.where(kept, self.weight.reshape(shape), 0.0).astype(jnp.float32), kept)
    weights, experts = jax.lax.top_k(self.combine_weights(), self.num_experts)
    return experts.astype(jnp.int32), weights, weights > 0

  @property
  def kept(self) -> jax.Array:
    """<bool>[G, A] whether each assignment got a slot."""
    return self.slot < self.capacity

  def combine_weights(self) -> jax.Array:
    """<float32>[G, S, E]: weight of expert e's output for token s.

    Zero where the expert does not process the token (not chosen, or dropped).
    This is the canonical, layout-free view of a routing. For the dense
    form: the combine weights summed over each expert's slots.
    """
    if self.is_dense:
      return jnp.sum(self.combine, axis=-1)
    num_groups = self.token.shape[0]
    dense = jnp.zeros((num_groups, self.num_tokens, self.num_experts), jnp.float32)
    group = jnp.arange(num_groups)[:, None]
    return dense.at[group, self.token, self.expert].add(
        jnp.where(self.kept, self.weight, 0.0).astype(jnp.float32))
