"""Grouped matmul: rows sorted by group, each group multiplied by its own kernel.

`jax.lax.ragged_dot` is the grouped matmul of GPU/TPU. XLA:CPU lowers it to a
dense loop that costs ~34x a plain matmul of the same FLOPs, so on CPU we run
a *blocked* grouped matmul: every group is padded to a multiple of
`block_size` rows (the dispatcher lays rows out that way), and one loop runs a
[block_size, D] x [D, H] matmul per occupied block with its group's kernel
(MegaBlocks, Gale et al. 2022, uses the same block-sparse layout on GPU). The
loop stops after the last occupied block, so the work is the real rows plus
at most block_size - 1 padding rows per group.

Inside `jax.shard_map` (expert parallelism) the loop carries start as zeros
typed as varying over the mesh axes the inputs vary over, like the loop
body's results (shard_map's varying-axes check, check_vma, requires a carry
to keep its type), and the backward pass sums each gradient over the axes
its input is invariant over (the transpose of using an invariant value in a
varying computation, as for built-in ops).

Implementations (`config.model.moe.grouped_matmul`):
  * "xla": `jax.lax.ragged_dot`, XLA's own lowering.
  * "tokamax": `tokamax.ragged_dot` (an optional dependency), which runs the
    first of its kernels that takes the inputs on this device: Pallas Mosaic
    GPU (Hopper, Blackwell), Pallas Triton (GPUs), Pallas Mosaic TPU (v5+,
    every dimension >= 128; the MegaBlocks TPU kernel), else XLA's
    `ragged_dot_general` (always the case on CPU, where the tests run it).
    The backward pass runs the same kernels (a grouped matmul for d_x, one
    contracting the rows for d_w).
  * "blocked": the blocked loop above, for CPU.
  * "auto": "blocked" on CPU; on GPU/TPU "tokamax" when it imports, else "xla".
"""

import functools
from typing import Optional

from absl import flags
import jax
import jax.numpy as jnp

from moejax.routing.config import check_grouped_matmul


@functools.cache
def _import_tokamax():
  """The tokamax module, or the ImportError raised importing it."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    return error
  # tokamax (0.0.12) reads its options from absl flags and, where no absl app
  # has parsed them, parses all of sys.argv itself, which raises on any other
  # program's arguments (pytest's, a notebook kernel's); upstream parses only
  # its own since openxla/tokamax#957. Outside an absl app its options keep
  # their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def tokamax_module():
  """`tokamax`; ImportError naming `pip install tokamax` when it does not import."""
  module = _import_tokamax()
  if isinstance(module, ImportError):
    raise ImportError(f"grouped_matmul='tokamax' needs the tokamax package (pip install "
                      f"tokamax); importing it failed: {module}") from module
  return module


def resolve_grouped_matmul(name: str) -> str:
  """The implementation `name` runs on the ambient mesh's platform ("auto"
  resolved; `parallel.mesh.platform`: the default backend without a mesh).

  "auto" is "blocked" on CPU (XLA:CPU's ragged_dot costs ~34x a dense matmul,
  see DESIGN.md) and a ragged kernel on GPU/TPU: tokamax's when it imports,
  else XLA's.
  """
  check_grouped_matmul(name)
  if name != "auto":
    return name
  # moejax.parallel imports this module (collectives use vary_like).
  from moejax.parallel.mesh import platform  # pylint: disable=import-outside-toplevel
  if platform() == "cpu":
    return "blocked"
  return "xla" if isinstance(_import_tokamax(), ImportError) else "tokamax"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   block_size: int = 1, implementation: Optional[str] = None) -> jax.Array:
  """y[r] = x[r] @ w[group of r].

  Args:
    x: [R, D] rows sorted by group.
    w: [E, D, H] one kernel per group.
    group_sizes: <int32>[E] rows per group; multiples of block_size.
    block_size: rows per block of the "blocked" loop, which needs R to be a
      multiple of it; the ragged implementations ignore it.
    implementation: a name in `routing.config.GROUPED_MATMULS` ("auto" resolved by
      `resolve_grouped_matmul`); None = "xla" for block_size 1, else "blocked".

  Returns:
    [R, H]; rows past the last group are zero (blocked) or unspecified
    (ragged kernels) and must not be read.
  """
  if implementation is None:
    implementation = "xla" if block_size == 1 else "blocked"
  implementation = resolve_grouped_matmul(implementation)
  if implementation == "xla":
    return jax.lax.ragged_dot(x, w, group_sizes)
  if implementation == "tokamax":
    # implementation=None: tokamax tries its kernels in order and falls back
    # to XLA where none supports the inputs or the device.
    return tokamax_module().ragged_dot(x, w, group_sizes.astype(jnp.int32))
  if x.shape[0] % block_size:
    raise ValueError(f"rows ({x.shape[0]}) must be a multiple of block_size ({block_size})")
  return _blocked_matmul(x, w, group_sizes.astype(jnp.int32), block_size)


def varying_axes(x: jax.Array) -> frozenset:
  """Manual mesh axes over which `x` varies inside shard_map (empty outside)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)  # older jax; jax 0.10: aval.mat.varying
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
  return frozenset(vma)


def vary_like(zeros: jax.Array, *inputs: jax.Array) -> jax.Array:
  """`zeros` cast to vary over the union of the inputs' varying axes (a no-op
  outside shard_map, or when it varies over them already)."""
  axes = frozenset().union(*(varying_axes(x) for x in inputs)) - varying_axes(zeros)
  if not axes:
    return zeros
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is None:  # jax < 0.8: pvary
    return jax.lax.pvary(zeros, tuple(sorted(axes)))
  return pcast(zeros, tuple(sorted(axes)), to="varying")


def _sum_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """`grad` summed over the axes it varies over but `primal` does not (so it
  has the type of `primal`); a no-op outside shard_map."""
  axes = varying_axes(grad) - varying_axes(primal)
  return jax.lax.psum(grad, tuple(sorted(axes))) if axes else grad


def _block_layout(group_sizes: jax.Array, num_rows: int, block_size: int):
  """Group of every block and the number of occupied blocks."""
  ends = jnp.cumsum(group_sizes)
  block_start = jnp.arange(num_rows // block_size, dtype=jnp.int32) * block_size
  block_group = jnp.searchsorted(ends, block_start, side="right")
  block_group = jnp.minimum(block_group, group_sizes.shape[0] - 1).astype(jnp.int32)
  return block_group, ends[-1] // block_size


def _block(x: jax.Array, index: jax.Array, block_size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, index * block_size, block_size, axis=0)


def _put_block(y: jax.Array, value: jax.Array, index: jax.Array, block_size: int):
  return jax.lax.dynamic_update_slice_in_dim(y, value.astype(y.dtype),
                                             index * block_size, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_matmul(x, w, group_sizes, block_size):
  block_group, num_blocks = _block_layout(group_sizes, x.shape[0], block_size)

  def body(i, y):
    value = _block(x, i, block_size) @ w[block_group[i]]
    return _put_block(y, value, i, block_size)

  y = jnp.zeros((x.shape[0], w.shape[-1]), jnp.result_type(x, w))
  return jax.lax.fori_loop(0, num_blocks, body, vary_like(y, x, w, group_sizes))


def _blocked_matmul_fwd(x, w, group_sizes, block_size):
  return _blocked_matmul(x, w, group_sizes, block_size), (x, w, group_sizes)


def _blocked_matmul_bwd(block_size, residuals, d_y):
  x, w, group_sizes = residuals
  block_group, num_blocks = _block_layout(group_sizes, x.shape[0], block_size)

  def body(i, carry):
    d_x, d_w = carry
    group = block_group[i]
    d_y_block = _block(d_y, i, block_size)
    d_x = _put_block(d_x, d_y_block @ w[group].T, i, block_size)
    # The kernel gradient accumulates in float32 over the group's blocks.
    update = jnp.dot(_block(x, i, block_size).T, d_y_block,
                     preferred_element_type=jnp.float32)
    d_w = d_w.at[group].add(update)
    return d_x, d_w

  d_x = vary_like(jnp.zeros_like(x), x, w, group_sizes, d_y)
  d_w = vary_like(jnp.zeros(w.shape, jnp.float32), x, w, group_sizes, d_y)
  d_x, d_w = jax.lax.fori_loop(0, num_blocks, body, (d_x, d_w))
  return _sum_like(d_x, x), _sum_like(d_w.astype(w.dtype), w), None


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)
