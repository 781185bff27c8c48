"""The dispatcher contract.

A dispatcher is a function `(x, routing, experts) -> y`:
  x: [G, S, D] tokens in routing groups; routing: a `moejax.routing.Routing`;
  experts: an object with
    `experts(buffer [E, N, D]) -> [E, N, D]` (every expert on its own rows), and
    `experts.grouped(rows [R, D], group_sizes [E], block_size, implementation)
      -> [R, D]` (rows sorted by expert, `group_sizes[e]` rows each, each
      group's rows a multiple of `block_size`; rows past the groups are
      ignored; `implementation` names the grouped matmul, see
      `dispatch.grouped_matmul`);
  y: [G, S, D] the weighted sum of each token's expert outputs (zero for a
     token no expert processed).
Dispatchers read only the assignment fields of `Routing`; experts never see it.
"""

from typing import Optional, Protocol

import jax


class Experts(Protocol):
  def __call__(self, buffer: jax.Array) -> jax.Array: ...

  def grouped(self, rows: jax.Array, group_sizes: jax.Array, block_size: int,
              implementation: Optional[str] = None) -> jax.Array: ...
