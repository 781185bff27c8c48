"""Device meshes from `config.mesh`, and the ambient mesh the layers read.

A mesh has the four axes of `AXES`: "data" (batch), "fsdp" (batch, and the
parameters and optimizer state split along their model width, gathered for
each layer's use: ZeRO-3 / FSDP), "expert" (routed experts, and a further batch
axis for everything else) and "model" (attention heads and expert hidden
units). `config.mesh` gives their sizes (fsdp 1 when absent); -1 fills the
devices left over by the others.

The one mechanism for layers to find the mesh is JAX's *ambient* mesh: the
trainer enters `activate(mesh)` (which is `jax.set_mesh(mesh)`), and
`current_mesh()` returns it as a `jax.sharding.AbstractMesh`, inside jit as
well as outside. Nothing is threaded through module constructors or calls.
"""

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType

AXES = ("data", "fsdp", "expert", "model")
# Axes a config may leave out (recorded by an older moejax), and their size.
OPTIONAL_AXES = {"fsdp": 1}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def _get(mesh_config: Any, key: str) -> Any:
  if key in OPTIONAL_AXES and key not in _keys(mesh_config):
    return OPTIONAL_AXES[key]
  if isinstance(mesh_config, Mapping):
    return mesh_config[key]
  return getattr(mesh_config, key)


def _keys(mesh_config: Any) -> list[str]:
  if isinstance(mesh_config, Mapping) or hasattr(mesh_config, "keys"):
    return list(mesh_config.keys())
  return list(AXES)


def validate_mesh_config(mesh_config: Any, *, num_devices: int,
                         num_experts: Optional[int] = None,
                         num_heads: Optional[int] = None,
                         num_kv_heads: Optional[int] = None,
                         expert_hidden: Optional[int] = None) -> dict[str, int]:
  """Resolves `config.mesh` against the devices and checks the model divides.

  Args:
    mesh_config: a mapping (dict or ConfigDict) with the integer keys of
      `AXES`; -1 (at most one) means "the devices left over".
      "fsdp" may be absent (1).
    num_devices: devices the mesh must cover exactly.
    num_experts: routed experts after granularity (E), or None (no check).
    num_heads: attention heads (N), or None.
    num_kv_heads: key/value heads of grouped-query attention (K), or None.
    expert_hidden: hidden width of one expert after granularity (H), or None.
      The dense FFN and the shared experts have widths that are multiples of
      it, so they divide too.

  Returns:
    {"data": ..., "fsdp": ..., "expert": ..., "model": ...} with -1 resolved.

  Raises:
    ValueError naming the config keys involved.
  """
  unknown = sorted(set(_keys(mesh_config)) - set(AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown key(s) {unknown}; valid keys: {list(AXES)}")
  sizes = {}
  for axis in AXES:
    value = _get(mesh_config, axis)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"config.mesh.{axis} must be -1 (fill) or a positive integer, "
                       f"got {value!r}")
    sizes[axis] = value
  fill = [axis for axis in AXES if sizes[axis] == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1 (fill), got "
                     f"{', '.join(f'config.mesh.{axis}' for axis in fill)}")
  shown = _named(AXES, sizes)
  formula = "*".join(shown)
  if fill:
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
      others = [axis for axis in shown if axis != fill[0]]
      raise ValueError(
          f"config.mesh: the {num_devices} devices are not divisible by "
          f"{'*'.join(others)} = {'*'.join(str(sizes[a]) for a in others)} = {fixed} "
          f"(config.mesh.{fill[0]} = -1 takes the rest)")
    sizes[fill[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f"config.mesh: {formula} = "
                     f"{'*'.join(str(sizes[a]) for a in shown)} = {total} does not match "
                     f"the {num_devices} devices")
  _check_model_divides(sizes, num_experts=num_experts, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, expert_hidden=expert_hidden)
  return sizes


def _check_model_divides(sizes: Mapping[str, int], **widths: Optional[int]) -> None:
  """The model's widths (`validate_mesh_config`'s arguments) divide over their axes."""
  checks = (
      ("num_experts", "config.model.moe.num_experts (x granularity)", "expert"),
      ("num_heads", "config.model.num_heads", "model"),
      ("num_kv_heads", "config.model.num_kv_heads", "model"),
      ("expert_hidden", "config.model.moe.expert_hidden (/ granularity)", "model"),
  )
  for key, name, axis in checks:
    value = widths.get(key)
    if value is not None and value % sizes[axis]:
      raise ValueError(f"{name} = {value} is not divisible by config.mesh.{axis} = "
                       f"{sizes[axis]}")


def batch_shards(sizes: Mapping[str, int]) -> int:
  """Devices a batch is split over (`rules.LOGICAL_RULES["batch"]`): data *
  fsdp * expert of resolved `sizes`."""
  return sizes["data"] * sizes.get("fsdp", 1) * sizes["expert"]


def _named(axes: Sequence[str], sizes: Mapping[str, int]) -> list[str]:
  """The axes a message names: an optional axis (fsdp) only where it is used
  (size != 1)."""
  return [axis for axis in axes
          if axis not in OPTIONAL_AXES or sizes.get(axis, OPTIONAL_AXES[axis]) != 1]


def batch_shards_name(sizes: Mapping[str, int]) -> str:
  """The config keys of `batch_shards`, for messages."""
  return " * ".join(f"config.mesh.{axis}"
                    for axis in _named(("data", "fsdp", "expert"), sizes))


def check_routing_groups(sizes: Mapping[str, int], moe: Any, train: Any) -> None:
  """ValueError, one line naming the keys, when the routing groups of a
  training batch do not split over the batch devices (`sizes`, as
  `validate_mesh_config` returns them): a group never spans devices. For
  models with routed MoE layers; checks nothing that compiles.

  `moe` is `config.model.moe` (group_by, group_size), `train` `config.train`
  (batch_size, seq_len). Groups of `group_size` consecutive tokens
  (group_by="sequence") split when every batch shard's tokens hold whole
  groups; groups at one position (group_by="batch") when the seq_len *
  batch_size / group_size groups divide over the shards.
  """
  shards = batch_shards(sizes)
  batch, length = train.batch_size, train.seq_len
  if moe.group_by == "batch":
    groups = length * (batch // (moe.group_size or batch))
  else:
    groups = batch * length // (moe.group_size or length)
  if groups % shards:
    raise ValueError(
        f"config.model.moe.group_size={moe.group_size} (group_by={moe.group_by!r}) makes "
        f"{groups} routing groups of config.train.batch_size={batch} x "
        f"config.train.seq_len={length} tokens, which do not split over "
        f"{batch_shards_name(sizes)} = {shards} devices (a group never spans devices)")


def _axis_type(axis_types: Any) -> AxisType:
  if isinstance(axis_types, AxisType):
    return axis_types
  if isinstance(axis_types, str) and axis_types.lower() in AXIS_TYPES:
    return AXIS_TYPES[axis_types.lower()]
  raise ValueError(f"axis_types must be one of {list(AXIS_TYPES)}, got {axis_types!r}")


def make_mesh(mesh_config: Any, *, devices: Optional[Sequence[jax.Device]] = None,
              axis_types: Any = "explicit") -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all devices).

  Args:
    mesh_config: see `validate_mesh_config`.
    devices: the devices to use, in mesh order; default `jax.devices()`.
    axis_types: "auto" (GSPMD propagates shardings from the parameters and
      the batch) or "explicit" (shardings are part of array types, the
      default of `jax.make_mesh` in jax >= 0.10 and ours), for all three
      axes. `nn.MoELayer` and `nn.TransformerLM` run under both and give the
      same numbers (tests/test_parallel.py).

  Returns:
    A `jax.sharding.Mesh` with axes `AXES`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = validate_mesh_config(mesh_config, num_devices=len(devices))
  kind = _axis_type(axis_types)
  try:
    return jax.make_mesh(tuple(sizes[axis] for axis in AXES), AXES,
                         axis_types=(kind,) * len(AXES), devices=devices)
  except NotImplementedError as e:  # a TPU torus the logical axes do not tile
    shape = " x ".join(f"{axis} {sizes[axis]}" for axis in AXES)
    reason = str(e).split(". ")[0]
    raise ValueError(f"config.mesh ({shape}) does not tile these devices' physical mesh: "
                     f"{reason}; choose sizes that are products of the physical axes "
                     f"(e.g. 4 x 4 x 4 chips take 4, 16 or 64 per axis)") from None


def with_auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """`mesh` (same devices and axes) with every axis Auto: an array placed on
  it carries no layout in its type, so a function traced as on one device (no
  ambient mesh, e.g. `moejax.train.lora.apply`) can take it next to arrays it
  creates itself, which an Explicit mesh's types forbid."""
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
  """Makes `mesh` the ambient mesh (`jax.set_mesh`) for the enclosed code.

  Functions traced inside (jit, grad) see it through `current_mesh()`; the
  MoE layer then runs expert parallel. Trace (call or lower) the train step
  inside this context: a function traced outside runs on one device.
  """
  with jax.set_mesh(mesh):
    yield mesh


def current_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The ambient mesh (see `activate`), or None when none is set."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def platform() -> str:
  """"cpu", "gpu" or "tpu": the platform of the ambient mesh's devices, inside
  jit too, else (no mesh) of the default backend.

  Every "auto" choice that depends on the hardware (the grouped matmul, the
  dropless exchange) asks this, so a step traced on a mesh of compile-only TPU
  or GPU devices (`moejax.aot`) gets the kernels and collectives of that
  hardware, not those of the host that compiles it.
  """
  mesh = current_mesh()
  device = getattr(mesh, "abstract_device", None)
  name = getattr(device, "platform", None) or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name
