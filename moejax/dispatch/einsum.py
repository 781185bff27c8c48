"""One-hot einsum dispatch (GShard, Lepikhin et al. 2020, Algorithm 2): dense
dispatch and combine tensors [G, S, E, C] contracted with the tokens. It costs
O(G*S*E*C*D), far more than gather dispatch off TPU, but only uses dense
matmuls, which is what TPUs run best. It is also the one dispatcher of the
dense routing form (Soft MoE), whose dispatch and combine tensors are soft.
"""

import jax
import jax.numpy as jnp

from moejax.dispatch.base import Experts
from moejax.routing import Routing


def dispatch_and_combine_tensors(routing: Routing, dtype) -> tuple[jax.Array, jax.Array]:
  """<dtype>[G, S, E, C] dispatch weights (a 0/1 mask for sparse routings)
  and <float32>[G, S, E, C] combine weights. A dense routing (Soft MoE) is
  already in this form."""
  if routing.is_dense:
    return routing.dispatch.astype(dtype), routing.combine.astype(jnp.float32)
  num_groups, num_tokens = routing.num_groups, routing.num_tokens
  num_experts, capacity = routing.num_experts, routing.capacity
  num_slots = num_experts * capacity
  # Dropped assignments point one past the last slot and so select nothing.
  position = jnp.where(routing.kept, routing.expert * capacity + routing.slot, num_slots)
  weight = routing.weight
  choices = routing.choices_per_token
  if choices is not None:
    one_hot = jax.nn.one_hot(position.reshape(num_groups, num_tokens, choices),
                             num_slots, dtype=jnp.float32)  # [G, S, K, E*C]
    mask = jnp.sum(one_hot, axis=2)
    combine = jnp.einsum("gskp,gsk->gsp", one_hot,
                         weight.reshape(num_groups, num_tokens, choices))
  else:
    group = jnp.arange(num_groups)[:, None]
    zeros = jnp.zeros((num_groups, num_tokens, num_slots), jnp.float32)
    mask = zeros.at[group, routing.token, position].add(1.0, mode="drop")
    combine = zeros.at[group, routing.token, position].add(weight, mode="drop")
  shape = (num_groups, num_tokens, num_experts, capacity)
  return mask.reshape(shape).astype(dtype), combine.reshape(shape)


def einsum_dispatch(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """Runs the experts on routed tokens through one-hot einsums.

  Args:
    x: [G, S, D] tokens.
    routing: the routing of those tokens.
    experts: see `dispatch.base`.

  Returns:
    [G, S, D] combined expert outputs.
  """
  num_groups, _, d_model = x.shape
  mask, combine = dispatch_and_combine_tensors(routing, x.dtype)
  buffer = jnp.einsum("gsec,gsd->egcd", mask, x)
  out = experts(buffer.reshape(routing.num_experts, -1, d_model))
  out = out.reshape(routing.num_experts, num_groups, routing.capacity, -1)
  return jnp.einsum("gsec,egcd->gsd", combine.astype(out.dtype), out)
