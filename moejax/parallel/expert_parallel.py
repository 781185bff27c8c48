"""Expert parallelism: the routed part of an MoE layer inside `jax.shard_map`.

GShard (Lepikhin et al. 2020, §3.2) / Switch Transformer (Fedus et al. 2021,
§2.2, Fig. 9): routing groups [G, S, D] are split over the "batch" mesh axes
(a group never spans devices), the routed experts [E, ...] over the "expert"
axes and their hidden units over the "mlp" axes (names from `LOGICAL_RULES`).
Each device routes its own G_l = G / (batch devices) groups exactly as one
device would (same capacity C per group), fills its buffer [E, G_l*C, D],
and one `all_to_all` over the expert axes gives it [E_l, X*G_l*C, D] for its
E_l = E / X local experts (X = expert-axis devices); one `all_to_all` brings
the outputs back, and the unchanged dispatcher combines them. With "model"
devices M > 1 each device holds [E_l, D, H/M] kernels and the expert outputs
are `psum`-med over "model" (Megatron-LM, Shoeybi et al. 2019).

The dispatchers are untouched: they call `ShardedExperts`, which satisfies
the `dispatch.base.Experts` contract across devices. The einsum dispatcher
exchanges its one-hot-dispatched buffer the same way.

Dropless (`dispatch="dropless"`) exchanges rows sorted by expert, in one of
three ways (`dropless_exchange`):
  * "ragged" (default on GPU/TPU): `jax.lax.ragged_all_to_all` with one slice
    per expert, written straight into the receiver's layout (sorted by local
    expert, then source), and back. Only routed rows move. XLA:CPU does not
    implement the collective.
  * "padded" (default on CPU; any backend): each device sends every other
    device a block of `rows_per_shard` rows, a static bound on the rows it can
    route there (G_l*S*min(K, E_l) assignments plus block padding), and the
    receiver compacts what it got by local expert. The padding costs up to X
    times the local rows in all_to_all bytes (not in expert FLOPs).
  * "ragged_reference": the ragged exchange through an all_gather emulation of
    the collective (`collectives.ragged_all_to_all_reference`), so its
    bookkeeping can be checked on CPU; it moves X times the data.
Both real exchanges are exact (nothing is dropped) and size the receive
buffer by the same static bound.

Router losses and metrics are means over groups or tokens, and every device
holds the same number of both, so their `pmean` over the batch axes equals the
one-device value; with a padding mask the means over real tokens are weighted
by each shard's real tokens instead. `load_max_over_mean` (a max, not a mean)
is recomputed from the averaged `expert_load`, and `router_logit_max` is the
`pmax` of the shards'.

Groups too few to split (`routing_group_axes`): one decoding step routes one
group (group_by="batch": the B tokens at the new position). In inference the
groups are then split over the batch axes whose devices divide them and
repeated on the others; where the experts' axis is one of the others, each
device runs its own experts on the rows for them and the outputs are summed
over that axis (`ShardedExperts(replicated_groups=True)`), so no expert's work
is repeated. Training refuses it (it would repeat the routing on every device).
"""

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from moejax.dispatch import permute
from moejax.dispatch.grouped_matmul import vary_like
from moejax.parallel import collectives
from moejax.parallel import rules
from moejax.parallel.mesh import current_mesh, platform
from moejax.routing import Routing

# Values of `dropless_exchange` (see the module docstring); "auto" picks one.
DROPLESS_EXCHANGES = ("auto", "ragged", "padded", "ragged_reference")
EXCHANGES = DROPLESS_EXCHANGES[1:]


def resolve_exchange(name: str) -> str:
  """"auto" -> "ragged" where XLA implements ragged_all_to_all (the ambient
  mesh's platform is GPU or TPU, `mesh.platform`), else "padded"."""
  if name not in DROPLESS_EXCHANGES:
    raise ValueError(f"unknown dropless_exchange {name!r}; valid: {list(DROPLESS_EXCHANGES)}")
  if name == "auto":
    return "ragged" if platform() in ("gpu", "tpu") else "padded"
  return name


def _free_axes(mesh, logical: str) -> tuple[str, ...]:
  """Mesh axes of `logical` that split `mesh` (size > 1) and are not manual yet."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return tuple(a for a in rules.mesh_axes(logical)
               if a in types and types[a] != AxisType.Manual and mesh.shape[a] > 1)


def _size(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def parallel_mesh():
  """The ambient mesh if it splits the MoE layer (any batch, expert or mlp
  axis of size > 1), else None (the layer then runs on one device)."""
  mesh = current_mesh()
  if mesh is None:
    return None
  axes = {a for logical in ("batch", "expert", "mlp") for a in _free_axes(mesh, logical)}
  return mesh if _size(mesh, tuple(axes)) > 1 else None


# Router metrics that are maxima over tokens, not means.
MAX_METRICS = ("router_logit_max",)
# Router losses and metrics that are means over a group's real tokens (or over
# their K assignments each): `routing.metrics.masked_mean`, the masked z-loss,
# and Soft MoE's `expert_load` (each real token's combine weights sum to 1).
# The balancing losses (`aux_loss`) are not: under a mask they sum over the
# batch axes themselves (`routing.balancing`), so every shard holds the global value.
TOKEN_MEAN_METRICS = ("z_loss", "router_entropy", "dropped_fraction", "unrouted_fraction",
                      "expert_load")


def mean_over_shards(aux: dict[str, jax.Array], axes,
                     real_tokens: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """One-device values of a layer's router losses and metrics from their
  per-shard values.

  Each shard holds the same number of groups, tokens and assignments, so a
  mean of per-shard means is the global mean. With a padding mask the shards
  hold different numbers of real tokens (`real_tokens`, this shard's count):
  the means over real tokens (`TOKEN_MEAN_METRICS`) are then weighted by it,
  sum_shards(mean * count) / sum_shards(count). The non-means:
  `load_max_over_mean` = E * max_e expert_load (`routing.metrics.load_metrics`)
  is recomputed from the mean load, and maxima over tokens (`MAX_METRICS`, the
  largest router logit) are `pmax`-ed.
  """
  if not axes:
    return aux
  total_real = None if real_tokens is None else jax.lax.psum(real_tokens, axes)

  def reduce(name, value):
    if name == "expert_counts":
      return jax.lax.psum(value, axes)
    if name in MAX_METRICS:
      return jax.lax.pmax(value, axes)
    if name in TOKEN_MEAN_METRICS and total_real is not None:
      weighted = jax.lax.psum(value * real_tokens.astype(value.dtype), axes)
      return weighted / jnp.maximum(total_real, 1).astype(value.dtype)
    return jax.lax.pmean(value, axes)

  aux = {name: reduce(name, value) for name, value in aux.items()}
  if "expert_counts" in aux:
    # Shards with padding hold fewer real assignments: the global load is
    # the load of the summed counts, not the mean of per-shard fractions.
    counts = aux["expert_counts"]
    aux["expert_load"] = counts / jnp.maximum(jnp.sum(counts), 1.0)
  if "expert_load" in aux and "load_max_over_mean" in aux:
    load = aux["expert_load"]
    aux["load_max_over_mean"] = jnp.max(load) * load.shape[-1]
  return aux


def _gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """y[r] = x[index[r]] (zero where index[r] == len(x)) for a partial
  permutation; `inverse[t]` is the row of y holding x[t] (len(y) if none).
  Forward and backward are both gathers (see `dispatch.permute`)."""
  num_rows = x.shape[0]
  return permute.to_buffer(x, jnp.arange(num_rows, dtype=jnp.int32), inverse, index,
                           num_rows, 1)


def _inverse(dest: jax.Array, num_rows: int) -> jax.Array:
  """<int32>[num_rows] source of each destination row (len(dest) if empty)."""
  return permute.buffer_sources(jnp.arange(dest.shape[0], dtype=jnp.int32), dest,
                                num_rows, dest.shape[0])


class ShardedExperts:
  """The `dispatch.base.Experts` contract for experts split across devices.

  Called inside `shard_map`: `local` holds this device's kernels
  [E_l, D, H_l]; the buffers it receives index all E experts.

  Args:
    local: the device's `nn.Experts` (E_l experts, hidden H / model devices).
    expert_axes: mesh axes the experts are split over (X devices).
    model_axes: mesh axes their hidden units are split over.
    num_shards: X.
    max_assignments: a bound on the assignments one device can route to one
      expert shard (sizes the dropless exchange); None = all its rows.
    replicated_groups: the routing groups are repeated on every device of the
      expert axes (not split over them): nothing is exchanged; each device
      runs its experts on their rows, and the outputs (zero for the other
      experts' rows) are summed over the expert axes.
  """

  def __init__(self, local: nnx.Module, *, expert_axes: tuple[str, ...],
               model_axes: tuple[str, ...], num_shards: int,
               max_assignments: Optional[int] = None, exchange: str = "padded",
               replicated_groups: bool = False):
    if exchange not in EXCHANGES:
      raise ValueError(f"unknown dropless exchange {exchange!r}; valid: {list(EXCHANGES)}")
    self.local = local
    self.expert_axes = expert_axes
    self.model_axes = model_axes
    self.num_shards = num_shards
    self.max_assignments = max_assignments
    self.exchange = exchange
    self.replicated_groups = replicated_groups and bool(expert_axes)

  def _all_to_all(self, x: jax.Array) -> jax.Array:
    """[X, ...] chunk i to expert shard i -> [X, ...] chunk i from shard i."""
    if not self.expert_axes:
      return x
    return jax.lax.all_to_all(x, self.expert_axes, 0, 0, tiled=True)

  def _sum_hidden_shards(self, y: jax.Array) -> jax.Array:
    return jax.lax.psum(y, self.model_axes) if self.model_axes else y

  def _sum_expert_and_hidden_shards(self, y: jax.Array) -> jax.Array:
    """Replicated groups: the outputs of every device's experts (zero
    elsewhere, so the sum is exact) and of its hidden units, summed."""
    return jax.lax.psum(y, self.expert_axes + self.model_axes)

  def __call__(self, buffer: jax.Array, hidden_fn=None) -> jax.Array:
    """<dtype>[E, N, D] rows for every expert -> [E, N, D] their outputs
    (`hidden_fn`, e.g. expert dropout, on the hidden activations)."""
    num_experts, num_rows, d_model = buffer.shape
    shards = self.num_shards
    local_experts = num_experts // shards
    if self.replicated_groups:
      first = jax.lax.axis_index(self.expert_axes) * local_experts
      mine = jax.lax.dynamic_slice_in_dim(buffer, first, local_experts, axis=0)
      y_local = self.local(mine, hidden_fn=hidden_fn)  # [E_l, N, D]
      y = vary_like(jnp.zeros((num_experts,) + y_local.shape[1:], y_local.dtype), y_local)
      return self._sum_expert_and_hidden_shards(
          jax.lax.dynamic_update_slice_in_dim(y, y_local, first, axis=0))
    x = self._all_to_all(buffer.reshape(shards, local_experts, num_rows, d_model))
    # [X (source), E_l, N, D] -> [E_l, X*N, D]: each local expert's rows from all sources.
    x = jnp.swapaxes(x, 0, 1).reshape(local_experts, shards * num_rows, d_model)
    y = self._sum_hidden_shards(self.local(x, hidden_fn=hidden_fn))
    y = jnp.swapaxes(y.reshape(local_experts, shards, num_rows, -1), 0, 1)
    return self._all_to_all(y).reshape(num_experts, num_rows, -1)

  def _rows_per_shard(self, num_rows: int, local_experts: int, block_size: int) -> int:
    if self.max_assignments is None:
      return num_rows
    bound = self.max_assignments + local_experts * (block_size - 1)
    return min(num_rows, -(-bound // block_size) * block_size)

  def grouped(self, rows: jax.Array, group_sizes: jax.Array, block_size: int,
              implementation: Optional[str] = None, hidden_fn=None) -> jax.Array:
    """[R, D] rows sorted by expert (`group_sizes` [E]) -> [R, D] outputs.

    The dropless exchange (see the module docstring): send each shard its
    experts' rows, lay the received rows out by local expert, run one grouped
    matmul (`implementation`, see `dispatch.grouped_matmul`), and send the
    outputs back.
    """
    local = functools.partial(self.local.grouped, block_size=block_size,
                              implementation=implementation, hidden_fn=hidden_fn)
    if self.replicated_groups:
      return self._grouped_replicated(rows, group_sizes, local)
    if self.exchange == "padded" or not self.expert_axes:
      return self._grouped_padded(rows, group_sizes, block_size, local)
    return self._grouped_ragged(rows, group_sizes, block_size, local)

  def _grouped_replicated(self, rows: jax.Array, group_sizes: jax.Array,
                          local: Callable) -> jax.Array:
    """Replicated groups: this device's experts' rows (a contiguous run of
    the sorted rows, block-aligned) rotated to the front, run, rotated back,
    and the other rows zeroed before the sum over the expert axes."""
    num_rows = rows.shape[0]
    sizes = group_sizes.astype(jnp.int32).reshape(self.num_shards, -1)  # [X, E_l]
    shard = jax.lax.axis_index(self.expert_axes)
    shard_rows = jnp.sum(sizes, axis=1)
    start = (jnp.cumsum(shard_rows) - shard_rows)[shard]
    out = jnp.roll(local(jnp.roll(rows, -start, axis=0), sizes[shard]), start, axis=0)
    row = jnp.arange(num_rows, dtype=jnp.int32)
    mine = (row >= start) & (row < start + shard_rows[shard])
    return self._sum_expert_and_hidden_shards(jnp.where(mine[:, None], out, 0))

  def _grouped_ragged(self, rows: jax.Array, group_sizes: jax.Array,
                      block_size: int, local: Callable) -> jax.Array:
    """The exchange as two `ragged_all_to_all`s of one slice per expert.

    Slice e of this device's rows (expert e's rows, sorted layout) goes to
    shard e // E_l, which writes it straight into its local expert's layout
    (sorted by local expert, then by source shard), so the received rows need
    no compaction; the outputs go back the same way with the roles swapped.
    Only the rows routed move (plus block padding on CPU); the receive buffer
    holds the static bound X * rows_per_shard.
    """
    num_rows, d_model = rows.shape
    shards = self.num_shards
    num_experts = group_sizes.shape[0]
    local_experts = num_experts // shards
    capacity = shards * self._rows_per_shard(num_rows, local_experts, block_size)
    group_sizes = group_sizes.astype(jnp.int32)
    send_offsets = jnp.cumsum(group_sizes) - group_sizes  # [E] in `rows`
    # [X (source), 2, E_l]: each source's sizes and row offsets of my experts.
    peer = self._all_to_all(jnp.stack([group_sizes.reshape(shards, local_experts),
                                       send_offsets.reshape(shards, local_experts)], 1))
    received_sizes, peer_offsets = peer[:, 0], peer[:, 1]
    expert_rows = received_sizes.sum(axis=0)  # [E_l]
    received_offsets = _chunk_starts(received_sizes)
    # Where my slice e lands on its shard: that shard's received_offsets.
    dest_offsets = self._all_to_all(received_offsets)  # [X, E_l]
    exchange = functools.partial(collectives.ragged_all_to_all, axis_name=self.expert_axes,
                                 reference=self.exchange == "ragged_reference")
    flat = lambda a: a.reshape(-1)  # noqa: E731
    received = exchange(rows, jnp.zeros((capacity, d_model), rows.dtype), send_offsets,
                        group_sizes, flat(dest_offsets), flat(received_sizes))
    out = self._sum_hidden_shards(local(received, expert_rows))
    return exchange(out, jnp.zeros((num_rows,) + out.shape[1:], out.dtype),
                    flat(received_offsets), flat(received_sizes), flat(peer_offsets),
                    group_sizes)

  def _grouped_padded(self, rows: jax.Array, group_sizes: jax.Array,
                      block_size: int, local: Callable) -> jax.Array:
    """The padded exchange: one fixed-size block of rows per peer, compacted
    by local expert on arrival. `local(rows, group_sizes)` runs this device's
    experts."""
    num_rows, d_model = rows.shape
    shards = self.num_shards
    num_experts = group_sizes.shape[0]
    local_experts = num_experts // shards
    per_shard = self._rows_per_shard(num_rows, local_experts, block_size)  # rows to each shard
    exchanged = shards * per_shard
    group_sizes = group_sizes.astype(jnp.int32)

    # Row r of expert e goes to row (e // E_l) * per_shard + (r - first row of that shard).
    row = jnp.arange(num_rows, dtype=jnp.int32)
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right")
    shard = jnp.minimum(expert // local_experts, shards - 1)
    shard_rows = group_sizes.reshape(shards, local_experts).sum(axis=1)
    shard_start = jnp.cumsum(shard_rows) - shard_rows
    send_dest = jnp.where(expert < num_experts,
                          shard * per_shard + row - shard_start[shard], exchanged)
    send_source = _inverse(send_dest, exchanged)
    send = _gather_rows(rows, send_source, send_dest)

    received = self._all_to_all(send.reshape(shards, per_shard, d_model))
    received_sizes = self._all_to_all(group_sizes.reshape(shards, local_experts))
    compact_dest = _compact_layout(received_sizes, per_shard)
    compact_source = _inverse(compact_dest, exchanged)
    compact = _gather_rows(received.reshape(exchanged, d_model), compact_source,
                           compact_dest)
    out = self._sum_hidden_shards(local(compact, received_sizes.sum(axis=0)))
    out = _gather_rows(out, compact_dest, compact_source)  # received layout

    returned = self._all_to_all(out.reshape(shards, per_shard, -1))
    return _gather_rows(returned.reshape(exchanged, -1), send_dest, send_source)


def _chunk_starts(received_sizes: jax.Array) -> jax.Array:
  """<int32>[X, E_l] first row of each (source shard, local expert) chunk in
  the layout sorted by (local expert, source shard)."""
  expert_rows = received_sizes.sum(axis=0)
  return ((jnp.cumsum(expert_rows) - expert_rows)[None, :]
          + jnp.cumsum(received_sizes, axis=0) - received_sizes)


def _compact_layout(received_sizes: jax.Array, per_shard: int) -> jax.Array:
  """Row of each received row once sorted by (local expert, source shard).

  Args:
    received_sizes: <int32>[X, E_l] rows per local expert sent by each shard;
      each shard's rows are sorted by expert, padding after them.
    per_shard: rows received from each shard.

  Returns:
    <int32>[X*per_shard] row in the compact layout; X*per_shard for padding rows.
  """
  shards, local_experts = received_sizes.shape
  position = jnp.arange(per_shard, dtype=jnp.int32)
  chunk_end = jnp.cumsum(received_sizes, axis=1)  # [X, E_l]
  expert = jax.vmap(lambda ends: jnp.searchsorted(ends, position, side="right"))(chunk_end)
  valid = expert < local_experts  # [X, per_shard]
  expert = jnp.minimum(expert, local_experts - 1)
  chunk_start = jnp.take_along_axis(chunk_end - received_sizes, expert, axis=1)
  compact_start = jnp.take_along_axis(_chunk_starts(received_sizes), expert, axis=1)
  dest = compact_start + position[None, :] - chunk_start
  return jnp.where(valid, dest, shards * per_shard).reshape(-1).astype(jnp.int32)


def _max_assignments(routing: Routing, local_experts: int) -> int:
  """Assignments one device can route to one shard of E_l experts."""
  if routing.choices_per_token is not None:  # a token picks an expert at most once
    return routing.num_groups * routing.num_tokens * min(routing.choices_per_token,
                                                         local_experts)
  return routing.num_groups * local_experts * routing.capacity


def _reshard_if_explicit(x: Any, spec: Any, mesh) -> Any:
  """Explicit meshes need inputs already in shard_map's in_specs; Auto meshes
  let shard_map reshard them."""
  if x is None or AxisType.Explicit not in mesh.axis_types:
    return x
  # `spec` is a prefix of `x` (one PartitionSpec per Variable of a State).
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda a: jax.sharding.reshard(a, s), sub),
                      spec, x, is_leaf=lambda s: isinstance(s, PartitionSpec))


def routing_group_axes(mesh, num_groups: int, *, replicate: bool = False
                       ) -> tuple[str, ...]:
  """The batch mesh axes that split G = `num_groups` routing groups.

  Every batch axis of `mesh` (size > 1) when their devices divide G: a group
  never spans devices. Otherwise, with `replicate` (inference: a decoding
  step's one group), the axes taken in order while their devices divide G, the
  groups repeated on the rest (and an expert axis is taken only with all
  expert axes); without it (training) a ValueError naming the config keys.
  """
  axes = _free_axes(mesh, "batch")
  if num_groups % _size(mesh, axes) == 0:
    return axes
  if not replicate:
    sizes = "*".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(
        f"MoELayer: {num_groups} routing groups do not split over the {_size(mesh, axes)} "
        f"devices of {sizes} (a routing group never spans devices): make "
        f"config.train.batch_size (x config.train.seq_len) / config.model.moe.group_size "
        f"a multiple of {_size(mesh, axes)}, or change config.mesh")
  expert_axes = set(_free_axes(mesh, "expert"))
  chosen: list[str] = []
  for axis in axes:
    if num_groups % (_size(mesh, tuple(chosen)) * mesh.shape[axis]) == 0:
      chosen.append(axis)
  if not expert_axes <= set(chosen):
    chosen = [a for a in chosen if a not in expert_axes]
  return tuple(chosen)


def _check_divisible(what: str, value: int, axes: tuple[str, ...], mesh, hint: str) -> None:
  devices = _size(mesh, axes)
  if value % devices:
    sizes = "*".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"MoELayer: {what} = {value} is not divisible by the {devices} "
                     f"devices of mesh axes {sizes}; {hint}")


def _expert_specs(state: nnx.State, mesh, expert_axes: tuple[str, ...],
                  model_axes: tuple[str, ...]) -> Any:
  """shard_map in_specs of the experts' state (kernels [E, D, H] split over
  the expert and mlp axes, LoRA adapters by their rules), after checking that
  E and the hidden widths divide over their devices."""
  _check_divisible("num_experts (x granularity)", jax.tree.leaves(state)[0].shape[0],
                   expert_axes, mesh, "change config.mesh.expert")
  state_axes = rules.param_logical_axes({"experts": state})["experts"]
  is_axes = lambda a: isinstance(a, tuple)  # noqa: E731
  for leaf, axes in zip(jax.tree.leaves(state), jax.tree.leaves(state_axes, is_leaf=is_axes)):
    if "mlp" not in axes:  # a LoRA adapter's A of wi, [E, D, r]
      continue
    _check_divisible("the expert hidden width (expert_hidden / granularity)",
                     leaf.shape[axes.index("mlp")], model_axes, mesh,
                     "change config.mesh.model")
  used = tuple(dict.fromkeys(expert_axes + model_axes))
  return jax.tree.map(lambda axes: rules.logical_to_spec(axes, mesh, keep=used),
                      state_axes, is_leaf=is_axes)


def _shard_map(fn: Callable, mesh, args: tuple, in_specs: tuple, out_specs: tuple):
  """`jax.shard_map(fn)(*args)` manual over every axis not manual yet (the
  whole mesh, normally: a partly manual region mixing in Explicit axes is not
  supported everywhere), the args first laid out as `in_specs` on an Explicit mesh."""
  args = tuple(_reshard_if_explicit(arg, arg_spec, mesh)
               for arg, arg_spec in zip(args, in_specs))
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
  axis_names = manual if len(manual) < len(mesh.axis_names) else frozenset()
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=axis_names)(*args)


def _per_device(core: Callable, core_kwargs: dict[str, Any], batch_axes: tuple[str, ...],
                router_graphdef, make_experts: Callable) -> Callable:
  """The body of `shard_routed`'s shard_map: (groups, extras, router state,
  expert state, rng) of one device -> (y, aux averaged over the shards,
  per-token arrays). `make_experts(expert_state, routing)` gives its experts."""
  def local(groups, extras, router_state, state, rng):
    if rng is not None and batch_axes:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(batch_axes))
    y, aux = core(groups, extras, nnx.merge(router_graphdef, router_state),
                  functools.partial(make_experts, state), rng,
                  axis_name=batch_axes or None, **core_kwargs)
    per_token = aux.pop("per_token")
    real_tokens = None if "mask" not in extras else jnp.sum(extras["mask"], dtype=jnp.int32)
    return y, mean_over_shards(aux, batch_axes, real_tokens), per_token
  return local


def shard_routed(core: Callable, groups: jax.Array, extras: dict[str, jax.Array],
                 router: nnx.Module, experts: nnx.Module, rng: Optional[jax.Array], *,
                 mesh=None, dropless_exchange: str = "auto",
                 group_axes: Optional[tuple[str, ...]] = None, **core_kwargs):
  """Runs an MoE layer's routed core on one device or expert parallel.

  The core (`nn.moe_layer.routed_forward`) is
      core(groups, extras, router, make_experts, rng, axis_name=..., **core_kwargs)
          -> (y [G, S, D], aux)
  and this function only places it: on one device it is called as is; under
  a mesh it runs per device in `jax.shard_map` on the device's groups, with
  the router's state replicated, the experts split over the expert and mlp
  axes and called through `ShardedExperts`, and `axis_name` = the axes that
  split the groups (for losses over the global batch).

  Args:
    core: see above.
    groups: <float>[G, S, D] tokens in routing groups (router precision).
    extras: per-token arrays [G, S, ...] for the router, split like the groups.
    router: the `routing.Router` module.
    experts: the `nn.Experts` module with kernels [E, D, H] / [E, H, D].
    rng: router-noise / dropout key or None; under a mesh each batch shard
      folds in its index (noise independent across shards).
    mesh: None for one device, else the (abstract) mesh (`parallel_mesh()`).
    dropless_exchange: a name in `DROPLESS_EXCHANGES`; how the dropless
      dispatcher's rows cross the expert axis.
    group_axes: the mesh axes the groups are split over
      (`routing_group_axes`); None = every batch axis (G must divide).
    **core_kwargs: passed to `core`.

  Returns:
    y: <dtype>[G, S, D] combined expert outputs.
    aux: the router's losses and metrics averaged over all groups, and
      "per_token": the core's per-token arrays {name: [G, S, ...]}.
  """
  if mesh is None:
    return core(groups, extras, router, lambda routing: experts, rng, axis_name=None,
                **core_kwargs)
  batch_axes = tuple(routing_group_axes(mesh, groups.shape[0]) if group_axes is None
                     else group_axes)
  expert_axes, model_axes = _free_axes(mesh, "expert"), _free_axes(mesh, "mlp")
  num_shards = _size(mesh, expert_axes)
  graphdef, state = nnx.split(experts)
  router_graphdef, router_state = nnx.split(router)

  def make_experts(state, routing):  # inside the shard_map: this device's experts
    return ShardedExperts(
        nnx.merge(graphdef, state), expert_axes=expert_axes, model_axes=model_axes,
        num_shards=num_shards, exchange=resolve_exchange(dropless_exchange),
        max_assignments=_max_assignments(routing, routing.num_experts // num_shards),
        replicated_groups=not set(expert_axes) <= set(batch_axes))

  local = _per_device(core, core_kwargs, batch_axes, router_graphdef, make_experts)
  batch_spec = rules.logical_to_spec(("batch",), mesh, keep=batch_axes)
  replicated = PartitionSpec()
  in_specs = (batch_spec, {name: batch_spec for name in extras}, replicated,
              _expert_specs(state, mesh, expert_axes, model_axes), replicated)
  y, aux, per_token = _shard_map(local, mesh, (groups, extras, router_state, state, rng),
                                 in_specs, (batch_spec, replicated, batch_spec))
  return y, dict(aux, per_token=per_token)
