"""Gather dispatch (default on CPU/GPU): tokens are gathered into per-expert
capacity buffers [E, G*C, D], the experts run as one batched matmul, and the
outputs are gathered back. Work and memory are O(G*S*K*D), independent of E.
"""

import jax
import jax.numpy as jnp

from moejax.dispatch import permute
from moejax.dispatch.base import Experts
from moejax.routing import Routing


def capacity_layout(routing: Routing) -> tuple[jax.Array, jax.Array]:
  """Global token ids and buffer rows of all assignments, flattened.

  Buffer row of assignment (g, a) is expert*(G*C) + g*C + slot, so the buffer
  reshapes to [E, G*C, D] with each group's C slots contiguous per expert.

  Returns:
    token: <int32>[G*A] index into the [G*S] flattened tokens.
    dest: <int32>[G*A] buffer row; E*G*C for dropped assignments.
  """
  num_groups = routing.num_groups
  capacity = routing.capacity
  group = jnp.arange(num_groups, dtype=jnp.int32)[:, None]
  num_rows = routing.num_experts * num_groups * capacity
  dest = routing.expert * (num_groups * capacity) + group * capacity + routing.slot
  dest = jnp.where(routing.kept, dest, num_rows)
  token = group * routing.num_tokens + routing.token
  return token.reshape(-1), dest.reshape(-1)


def gather_dispatch(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """[G, S, D] tokens -> [G, S, D] combined expert outputs, through capacity
  buffers filled by index (gather/scatter): the contract of `dispatch.base`,
  computing what `einsum_dispatch` computes without its one-hot tensors."""
  num_groups, num_tokens, d_model = x.shape
  num_experts, capacity = routing.num_experts, routing.capacity
  total_tokens = num_groups * num_tokens
  num_rows = num_experts * num_groups * capacity
  token, dest = capacity_layout(routing)
  source = permute.buffer_sources(token, dest, num_rows, total_tokens)
  buffer = permute.to_buffer(x.reshape(total_tokens, d_model), token, dest, source,
                             total_tokens, routing.choices_per_token)
  out = experts(buffer.reshape(num_experts, num_groups * capacity, d_model))
  y = permute.from_buffer(out.reshape(num_rows, -1), routing.weight.reshape(-1),
                          token, dest, source, total_tokens, routing.choices_per_token)
  return y.reshape(num_groups, num_tokens, -1)
