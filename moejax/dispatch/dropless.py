"""Dropless dispatch (MegaBlocks, Gale et al. 2022): no capacity; assignments
are sorted by expert and the experts run as one grouped matmul over exactly
the rows they received (plus block padding for the CPU blocked loop). Meant
for `capacity_factor=0`; given a routing with drops it skips the dropped
assignments, so its output equals the other dispatchers' for any routing.

The grouped matmul is `config.model.moe.grouped_matmul` (see
`dispatch.grouped_matmul`): the "blocked" loop needs every expert's rows
padded to a multiple of a block size; the ragged kernels ("xla", "tokamax")
take the rows as they are (block size 1).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from moejax.dispatch import permute
from moejax.dispatch.base import Experts
from moejax.dispatch.grouped_matmul import resolve_grouped_matmul
from moejax.routing import Routing

# Rows per block of the CPU blocked grouped matmul: about a quarter of an
# expert's average rows (so padding adds ~1/8), within these bounds.
_MIN_BLOCK, _MAX_BLOCK = 8, 128


def default_block_size(num_assignments: int, num_experts: int,
                       implementation: str = "blocked") -> int:
  """1 for the ragged kernels; a power of two for the blocked loop."""
  if implementation != "blocked":
    return 1
  target = max(1, num_assignments // (4 * num_experts))
  block = 1 << (target.bit_length() - 1)
  return int(min(_MAX_BLOCK, max(_MIN_BLOCK, block)))


def grouped_matmul_layout(grouped_matmul: str, block_size: Optional[int],
                          num_assignments: int, num_experts: int) -> tuple[str, int]:
  """(implementation, block size) of the dropless grouped matmul.

  `grouped_matmul` is resolved for the default backend; block_size None is
  the implementation's default. With grouped_matmul="auto" an explicit block
  size picks the implementation, as before the option existed: 1 = "xla",
  larger = "blocked".
  """
  if grouped_matmul == "auto" and block_size is not None:
    implementation = "xla" if block_size == 1 else "blocked"
  else:
    implementation = resolve_grouped_matmul(grouped_matmul)
  if block_size is None:
    block_size = default_block_size(num_assignments, num_experts, implementation)
  return implementation, block_size


def sorted_layout(routing: Routing, block_size: int):
  """Buffer rows for assignments sorted by expert, each expert block-aligned.

  Returns:
    token: <int32>[N] global token of each assignment (N = G*A).
    dest: <int32>[N] buffer row; R for dropped assignments.
    group_sizes: <int32>[E] rows per expert, rounded up to block_size.
    num_rows: R, a static bound on the padded rows.
  """
  num_groups, num_experts = routing.num_groups, routing.num_experts
  group = jnp.arange(num_groups, dtype=jnp.int32)[:, None]
  token = (group * routing.num_tokens + routing.token).reshape(-1)
  kept = routing.kept.reshape(-1)
  expert = jnp.where(kept, routing.expert.reshape(-1), num_experts)
  num_assignments = expert.shape[0]
  num_rows = num_assignments + num_experts * (block_size - 1)
  num_rows = -(-num_rows // block_size) * block_size

  order = jnp.argsort(expert, stable=True)
  sorted_expert = expert[order]
  counts = jnp.zeros((num_experts,), jnp.int32).at[expert].add(1, mode="drop")
  padded = -(-counts // block_size) * block_size
  starts = jnp.cumsum(counts) - counts
  padded_starts = jnp.cumsum(padded) - padded
  rank = jnp.arange(num_assignments, dtype=jnp.int32) - starts.at[sorted_expert].get(
      mode="fill", fill_value=0)
  sorted_dest = jnp.where(sorted_expert < num_experts,
                          padded_starts.at[sorted_expert].get(mode="fill", fill_value=0)
                          + rank, num_rows)
  dest = jnp.zeros_like(sorted_dest).at[order].set(sorted_dest)
  return token, dest, padded, num_rows


def dropless_dispatch(x: jax.Array, routing: Routing, experts: Experts,
                      block_size: Optional[int] = None,
                      grouped_matmul: str = "auto") -> jax.Array:
  """Runs the experts on every kept assignment through a grouped matmul.

  Args:
    x: [G, S, D] tokens.
    routing: the routing of those tokens.
    experts: see `dispatch.base`.
    block_size: rows per block of the grouped matmul; None = the
      implementation's (`default_block_size`).
    grouped_matmul: a name in `routing.config.GROUPED_MATMULS` (see
      `grouped_matmul_layout` for how it combines with block_size).

  Returns:
    [G, S, D] combined expert outputs.
  """
  num_groups, num_tokens, d_model = x.shape
  total_tokens = num_groups * num_tokens
  implementation, block_size = grouped_matmul_layout(
      grouped_matmul, block_size, routing.token.size, routing.num_experts)
  token, dest, group_sizes, num_rows = sorted_layout(routing, block_size)
  source = permute.buffer_sources(token, dest, num_rows, total_tokens)
  rows = permute.to_buffer(x.reshape(total_tokens, d_model), token, dest, source,
                           total_tokens, routing.choices_per_token)
  out = experts.grouped(rows, group_sizes, block_size, implementation)
  y = permute.from_buffer(out, routing.weight.reshape(-1), token, dest, source,
                          total_tokens, routing.choices_per_token)
  return y.reshape(num_groups, num_tokens, -1)
