"""The ragged all-to-all of the dropless expert-parallel exchange.

`jax.lax.ragged_all_to_all` sends slice i of the caller's `operand`
(rows `input_offsets[i] : input_offsets[i] + send_sizes[i]`) to device
`i // (K / X)` of the axis (K slices, X devices), where it is written at row
`output_offsets[i]` of that device's `output`; `recv_sizes[i]` is the size of
slice i *received* (from device `i // (K / X)`), so
`send_sizes == all_to_all(recv_sizes)`. Rows of `output` that nothing writes
keep their value. XLA implements it on GPU and TPU; XLA:CPU does not
("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU").

`ragged_all_to_all_reference` computes the same function from an
`all_gather` of every argument and one scatter. It moves X times the data, so
it is not an exchange to train with; it lets the ragged exchange's offset
bookkeeping, its gradients and its agreement with one device be tested on
CPU (tests/parallel_worker.py), and `tests/test_parallel.py` pins it to the
example in the `jax.lax.ragged_all_to_all` docstring.
"""

import jax
import jax.numpy as jnp

from moejax.dispatch.grouped_matmul import vary_like


def ragged_all_to_all_reference(operand: jax.Array, output: jax.Array,
                                input_offsets: jax.Array, send_sizes: jax.Array,
                                output_offsets: jax.Array, recv_sizes: jax.Array, *,
                                axis_name) -> jax.Array:
  """`jax.lax.ragged_all_to_all` built from `all_gather` (any backend).

  Same arguments and result; slices must not overlap in `operand` and their
  destinations must lie inside `output` (as the real collective requires).
  `recv_sizes` is implied by the senders' `send_sizes` and is not read.
  """
  del recv_sizes
  num_slices = input_offsets.shape[0]
  devices = jax.lax.axis_size(axis_name)
  if num_slices % devices:
    raise ValueError(f"ragged_all_to_all: {num_slices} slices are not divisible by the "
                     f"{devices} devices of axis {axis_name!r}")
  per_device = num_slices // devices
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)  # noqa: E731  [X, ...]

  def mine(offsets):  # [X, K] -> [X, K/X]: the slices every device sends me
    return jax.lax.dynamic_slice_in_dim(gather(offsets), me * per_device, per_device, axis=1)

  start, size, dest = mine(input_offsets), mine(send_sizes), mine(output_offsets)
  row = jnp.arange(operand.shape[0], dtype=start.dtype)[None, None, :]
  inside = (row >= start[..., None]) & (row < (start + size)[..., None])  # [X, K/X, N]
  target = jnp.where(inside, dest[..., None] + row - start[..., None], output.shape[0])
  target = jnp.min(target, axis=1).reshape(-1)  # [X*N]: a row is in at most one slice
  rows = gather(operand).reshape((-1,) + operand.shape[1:])
  return output.at[target].set(rows, mode="drop")


def ragged_all_to_all(operand: jax.Array, output: jax.Array, *offsets_and_sizes: jax.Array,
                      axis_name, reference: bool = False) -> jax.Array:
  """`jax.lax.ragged_all_to_all`, or its all_gather reference if `reference`.

  `output` is first cast to vary over the mesh axes `operand` varies over:
  the collective's result has the type of `output`, and it holds rows of
  other devices.
  """
  output = vary_like(output, operand)
  if reference:
    return ragged_all_to_all_reference(operand, output, *offsets_and_sizes,
                                       axis_name=axis_name)
  return jax.lax.ragged_all_to_all(operand, output, *offsets_and_sizes, axis_name=axis_name)
