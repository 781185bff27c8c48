"""Row permutations between tokens and expert buffers, with gather-only VJPs.

A dispatcher places each kept assignment `n` (token `token[n]`) at buffer row
`dest[n]` and brings the row back multiplied by `weight[n]`. Each buffer row
holds at most one assignment, so the map is a partial permutation and both
directions of both passes are row *gathers*: `source[r]` names the token in
row r (or the zero padding row), `dest[n]` the row of assignment n (or the
zero padding row). XLA's default transpose of a gather is a scatter-add, which
XLA:CPU runs as a serial loop; these custom VJPs avoid it.

Letters: T tokens, N assignments, R buffer rows, D model width, K choices per
token (when assignments are token-major, `n // K` is the token of `n`).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def _pad_row(x: jax.Array) -> jax.Array:
  """Appends one zero row, the target of every sentinel index."""
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


def _take_rows(x_padded: jax.Array, index: jax.Array) -> jax.Array:
  return x_padded.at[index].get(mode="promise_in_bounds")


def _sum_per_token(rows: jax.Array, token: jax.Array, num_tokens: int,
                   choices_per_token: Optional[int]) -> jax.Array:
  """Sums assignment rows [N, D] into token rows [T, D]."""
  if choices_per_token is not None:  # token-major: a reshape, no scatter
    return rows.reshape(num_tokens, choices_per_token, -1).sum(axis=1)
  return jnp.zeros((num_tokens,) + rows.shape[1:], rows.dtype).at[token].add(rows)


def buffer_sources(token: jax.Array, dest: jax.Array, num_rows: int,
                   num_tokens: int) -> jax.Array:
  """<int32>[R] token in each buffer row; `num_tokens` (padding) when empty."""
  return jnp.full((num_rows,), num_tokens, jnp.int32).at[dest].set(token, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def to_buffer(x: jax.Array, token: jax.Array, dest: jax.Array, source: jax.Array,
              num_tokens: int, choices_per_token: Optional[int]) -> jax.Array:
  """Gathers tokens into buffer rows.

  Args:
    x: [T, D] tokens.
    token: <int32>[N] token of each assignment.
    dest: <int32>[N] buffer row of each assignment; R when dropped.
    source: <int32>[R] token of each buffer row; T when empty.
    num_tokens: T.
    choices_per_token: K if assignments are token-major, else None.

  Returns:
    [R, D] buffer; empty rows are zero.
  """
  del token, dest, num_tokens, choices_per_token
  return _take_rows(_pad_row(x), source)


def _to_buffer_fwd(x, token, dest, source, num_tokens, choices_per_token):
  del num_tokens, choices_per_token
  return _take_rows(_pad_row(x), source), (token, dest)


def _to_buffer_bwd(num_tokens, choices_per_token, residuals, d_buffer):
  token, dest = residuals
  rows = _take_rows(_pad_row(d_buffer), dest)
  d_x = _sum_per_token(rows, token, num_tokens, choices_per_token)
  return d_x, None, None, None


to_buffer.defvjp(_to_buffer_fwd, _to_buffer_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def from_buffer(out: jax.Array, weight: jax.Array, token: jax.Array, dest: jax.Array,
                source: jax.Array, num_tokens: int,
                choices_per_token: Optional[int]) -> jax.Array:
  """Weighted sum of each token's expert outputs.

  Args:
    out: [R, D] expert outputs per buffer row.
    weight: <float32>[N] combine weight of each assignment.
    token, dest, source: as in `to_buffer`.
    num_tokens: T.
    choices_per_token: K if assignments are token-major, else None.

  Returns:
    [T, D] in out's dtype, accumulated in float32.
  """
  del source
  rows = _take_rows(_pad_row(out), dest).astype(jnp.float32) * weight[:, None]
  return _sum_per_token(rows, token, num_tokens, choices_per_token).astype(out.dtype)


def _from_buffer_fwd(out, weight, token, dest, source, num_tokens, choices_per_token):
  y = from_buffer(out, weight, token, dest, source, num_tokens, choices_per_token)
  return y, (out, weight, token, dest, source)


def _from_buffer_bwd(num_tokens, choices_per_token, residuals, d_y):
  out, weight, token, dest, source = residuals
  del num_tokens
  num_rows = out.shape[0]
  row_weight = jnp.zeros((num_rows,), jnp.float32).at[dest].set(weight, mode="drop")
  d_y_padded = _pad_row(d_y)
  d_out = (_take_rows(d_y_padded, source).astype(jnp.float32)
           * row_weight[:, None]).astype(out.dtype)
  if choices_per_token is not None:
    d_y_per_assignment = jnp.repeat(d_y, choices_per_token, axis=0)
  else:
    d_y_per_assignment = _take_rows(d_y_padded, token)
  out_rows = _take_rows(_pad_row(out), dest)
  d_weight = jnp.sum(d_y_per_assignment.astype(jnp.float32)
                     * out_rows.astype(jnp.float32), axis=-1)
  return d_out, d_weight, None, None, None


from_buffer.defvjp(_from_buffer_fwd, _from_buffer_bwd)
