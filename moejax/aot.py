r"""Compiles a run's train and eval steps for a TPU or GPU topology this host does not have.

    pip install -e '.[aot]'      # libtpu and the CUDA compiler plugin, no GPU needed
    python -m moejax.aot --config=configs/lm1b.py --topology=v4-32 --config.mesh.expert=8
    python -m moejax.aot --config=configs/lm1b.py --topology=h100-16 --dump=/tmp/hlo

Before booking chips, a pod user learns whether a sweep point compiles, fits
in memory, and what its collectives cost (MaxText's train_compile.py does the
same). The command builds exactly what `moejax.main` trains (the mesh of
`config.mesh`, the parameters and optimizer state with their shardings, the
data's batch, `moejax.train.steps.make_train_step` and the evaluator's step),
all abstract (`jax.ShapeDtypeStruct`s, nothing allocated), on the
compile-only devices of the named topology, and runs the real XLA:TPU or
XLA:GPU compiler. Every "auto" choice follows the target's platform
(`parallel.platform`): a TPU build gets the ragged exchange and the ragged
grouped matmul, not this host's CPU paths.

It prints one JSON line:
  topology, platform, device_kind, devices, hosts, num_slices, mesh
  peak_memory_bytes        XLA's peak per device (TPU); where XLA gives none
                           (GPU), arguments + outputs + temporaries - aliases
  memory_capacity_bytes    the chip's HBM (`CHIPS`), fits = peak <= capacity
  argument_bytes_per_device  parameters, optimizer state and batch per device
  temp_bytes_per_device    the step's temporaries (activations, ...)
  flops_per_device, bytes_accessed_per_device  XLA's cost analysis (null
                           where XLA gives none: XLA:GPU); with scan_layers
                           (cost_counts_loop_bodies_once) one layer unit's
  model_flops_per_device   moejax's accounting (6N + attention) for the step
  collectives              HLO op name -> count in the optimized program
                           (all-to-all, ragged-all-to-all, all-reduce,
                           all-gather, reduce-scatter, collective-permute); an
                           op inside a loop (scan_layers) counts once
  collective_bytes_per_device  bytes those ops move per device (result sizes;
                           all-reduce twice)
  compile_seconds, eval_compile_seconds
  estimated_step_seconds   a roofline: max(compute, memory, communication),
                           with compute = FLOPs / peak FLOP/s, memory = bytes
                           accessed / HBM bandwidth, communication = collective
                           bytes / interconnect bandwidth (ICI within a TPU
                           slice or NVLink within a GPU host; across slices or
                           hosts the data-center network, `CHIPS`)
  estimated_mfu            model_flops_per_device / peak / estimated_step_seconds
These are compiler figures and a bound, not measured step times.

A step that does not fit exits 1 with one line: the bytes needed and
available per device and the largest arguments. `--dump=DIR` writes the
optimized HLO of both steps there.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional

# Compile-only devices come from their plugins; this host computes on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling needs no chip: several compiles (test workers, a sweep) may load
# libtpu at once instead of waiting on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


class _QuietStderr:
  """Holds what C++ libraries write to file descriptor 2 (libtpu's and the
  CUDA plugin's start-up warnings about the hardware this host lacks) in a
  temporary file until `release`, so the command's own output is its one
  line; `--verbosity` shows everything."""

  def __init__(self):
    import tempfile  # pylint: disable=import-outside-toplevel
    sys.stderr.flush()
    self._saved = os.dup(2)
    self._file = tempfile.TemporaryFile(mode="w+b")
    os.dup2(self._file.fileno(), 2)

  def release(self) -> str:
    """Restores fd 2; returns what was held."""
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._file.seek(0)
    held = self._file.read().decode(errors="replace")
    self._file.close()
    return held


_QUIET = (_QuietStderr() if __name__ == "__main__"
          and not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv) else None)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from moejax import data as data_lib  # pylint: disable=wrong-import-position
from moejax import model as model_lib  # pylint: disable=wrong-import-position
from moejax import parallel  # pylint: disable=wrong-import-position
from moejax.scaling import accounting  # pylint: disable=wrong-import-position
from moejax.train import config as config_lib  # pylint: disable=wrong-import-position
from moejax.train import evaluator as evaluator_lib  # pylint: disable=wrong-import-position
from moejax.train import optim  # pylint: disable=wrong-import-position
from moejax.train import steps as steps_lib  # pylint: disable=wrong-import-position

GiB = 2**30
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-reduce", "all-gather",
               "reduce-scatter", "collective-permute")
INSTALL = "pip install -e '.[aot]'"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One device's data-sheet numbers (README "Compiled for hardware we don't have")."""
  name: str
  platform: str            # "tpu" or "gpu"
  peak_flops: float        # dense bf16 FLOP/s
  hbm_bytes: float         # memory capacity
  hbm_bandwidth: float     # bytes/s
  interconnect: float      # bytes/s per device, one direction: TPU ICI, GPU NVLink
  network: float           # bytes/s per device across slices / hosts (data-center network)
  megacore: bool = False   # TPU v4 / v5p: two TensorCores act as one device


# Cloud TPU system architecture pages (v4, v5p, v5e, v6e) and NVIDIA's data
# sheets (H100 SXM, H200 SXM, HGX B200). ICI as the pages' "interchip
# interconnect" Gbps / 8; NVLink half the bidirectional figure; across hosts
# one 400 Gb/s NIC per GPU, across TPU slices 100 Gb/s per host's share.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 275e12, 32 * GiB, 1200e9, 300e9, 6.25e9, megacore=True),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 95e9, 2765e9, 600e9, 6.25e9, megacore=True),
    "v5e": Chip("TPU v5e", "tpu", 197e12, 16 * GiB, 819e9, 200e9, 3.125e9),
    "v6e": Chip("TPU v6e", "tpu", 918e12, 32 * GiB, 1640e9, 448e9, 3.125e9),
    "h100": Chip("NVIDIA H100 80GB HBM3", "gpu", 989e12, 80 * GiB, 3350e9, 450e9, 50e9),
    "h200": Chip("NVIDIA H200", "gpu", 989e12, 141e9, 4800e9, 450e9, 50e9),
    "b200": Chip("NVIDIA B200", "gpu", 2250e12, 180e9, 8000e9, 900e9, 50e9),
}

# TPU slice shapes by chip count (Cloud TPU's accelerator types; a v4/v5p name
# counts TensorCores, two per chip).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_TPU_LIBTPU_NAMES = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
GPUS_PER_HOST = 8

# The GpuTargetConfigProto fields XLA:GPU compiles against, per GPU: compute
# capability, SMs, clocks, memory and its bandwidth (NVIDIA data sheets), and
# the CUDA limits every Hopper/Blackwell part shares.
_GPU_TARGETS = {
    "h100": dict(major=9, minor=0, cores=132, clock=1.98, memory=80 * GiB, bandwidth=3350e9,
                 l2=50 * 2**20, name="NVIDIA H100 80GB HBM3", smem_core=228 * 1024),
    "h200": dict(major=9, minor=0, cores=132, clock=1.98, memory=141e9, bandwidth=4800e9,
                 l2=50 * 2**20, name="NVIDIA H200", smem_core=228 * 1024),
    "b200": dict(major=10, minor=0, cores=148, clock=1.965, memory=180e9, bandwidth=8000e9,
                 l2=126 * 2**20, name="NVIDIA B200", smem_core=228 * 1024),
}


class AotError(ValueError):
  """A topology, install or config problem, reported in one line."""


def _gpu_target_config(kind: str) -> str:
  t = _GPU_TARGETS[kind]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {t['smem_core']} shared_memory_per_block_optin: {t['smem_core'] - 1024}
  threads_per_core_limit: 2048 core_count: {t['cores']} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(t['bandwidth'])} l2_cache_size: {t['l2']}
  clock_rate_ghz: {t['clock']} device_memory_size: {int(t['memory'])}
  cuda_compute_capability {{ major: {t['major']} minor: {t['minor']} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{t['name']}"
"""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A named slice: its chip and how `jax.experimental.topologies` builds it."""
  name: str
  chip: Chip
  devices: int             # per slice
  hosts: int               # per slice
  kind: str                # CHIPS key

  @property
  def platform(self) -> str:
    return self.chip.platform


def parse_topology(name: str) -> Topology:
  """`v4-32`, `v5p-64`, `v5e-16`, `v6e-8`, `h100-8`, `h200-16`, `b200-8`, ...
  AotError names the valid forms."""
  found = re.fullmatch(r"(v4|v5p|v5e|v6e|h100|h200|b200)-(\d+)", name.strip().lower())
  valid = ("TPU: v4-N / v5p-N (N TensorCores, 2 per chip: v4-32 = 16 chips), v5e-N / "
           "v6e-N (N chips); GPU: h100-N, h200-N, b200-N (N GPUs, 8 per host)")
  if not found:
    raise AotError(f"--topology={name}: unknown topology; valid: {valid}")
  kind, count = found.group(1), int(found.group(2))
  chip = CHIPS[kind]
  if chip.platform == "gpu":
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
      raise AotError(f"--topology={name}: a GPU topology is up to {GPUS_PER_HOST} GPUs or "
                     f"whole hosts of {GPUS_PER_HOST}")
    return Topology(name, chip, count, max(1, count // GPUS_PER_HOST), kind)
  chips = count // 2 if chip.megacore else count
  shapes = _SHAPES_3D if chip.megacore else _SHAPES_2D
  if (chip.megacore and count % 2) or chips not in shapes:
    sizes = sorted(n * (2 if chip.megacore else 1) for n in shapes)
    raise AotError(f"--topology={name}: no {kind} slice of that size; valid sizes: "
                   f"{', '.join(f'{kind}-{n}' for n in sizes)}")
  return Topology(name, chip, chips, chips // math.prod(_host_bounds(kind, chips)), kind)


def _host_bounds(kind: str, chips: int) -> tuple[int, int, int]:
  """The chips of one host (Cloud TPU: 4 per host, 8 on single-host v5e/v6e)."""
  if CHIPS[kind].megacore or chips > 8:
    return (2, 2, 1) if chips >= 4 else (chips, 1, 1)
  return {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[chips]


def _missing_install(platform: str) -> AotError:
  version = jax.__version__
  if platform == "tpu":
    what, alone = "libtpu", f'pip install "jax[tpu]=={version}"'
  else:
    what = "the CUDA compiler plugin"
    alone = f"pip install jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version}"
  return AotError(f"compiling for {platform.upper()} needs {what} matching jax {version}: "
                  f"{INSTALL}, or {alone}")


def _check_plugin_version(platform: str) -> None:
  """The CUDA plugin must be jax's own version (its protos move between releases)."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  if platform != "gpu":
    return
  try:
    installed = importlib.metadata.version("jax-cuda12-plugin")
  except importlib.metadata.PackageNotFoundError:
    raise _missing_install(platform) from None
  if installed != jax.__version__:
    raise AotError(f"jax-cuda12-plugin {installed} does not match jax {jax.__version__}: "
                   f"pip install jax-cuda12-plugin=={jax.__version__} "
                   f"jax-cuda12-pjrt=={jax.__version__}")


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `topology`."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  _check_plugin_version(topology.platform)
  try:
    if topology.platform == "tpu":
      shape = (_SHAPES_3D if topology.chip.megacore else _SHAPES_2D)[topology.devices]
      wrap = (topology.devices >= (64 if topology.chip.megacore else 256),) * 2
      wrap = wrap + ((topology.chip.megacore and topology.devices >= 64),)
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=f"{_TPU_LIBTPU_NAMES[topology.kind]}:{shape}",
          chip_config_name="megacore" if topology.chip.megacore else "default",
          chips_per_host_bounds=_host_bounds(topology.kind, topology.devices),
          num_slices=num_slices, wrap=wrap)
    else:
      per_host = min(topology.devices, GPUS_PER_HOST)
      desc = topologies.get_topology_desc(
          platform="cuda", topology_name="",
          topology=f"{num_slices}x{topology.hosts}x{per_host}",
          target_config=_gpu_target_config(topology.kind))
  except (RuntimeError, ValueError, NotImplementedError) as e:
    text = str(e)
    if re.search(r"(?i)(support not installed|not implemented for cuda|no such plugin|"
                 r"unknown backend|cannot open shared object)", text):
      raise _missing_install(topology.platform) from None
    raise AotError(f"--topology={topology.name}: {text.splitlines()[0]}") from None
  return list(desc.devices)


# ---------------------------------------------------------------------------
# The compiled program.

_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(re.escape(c) for c in
                                               sorted(COLLECTIVES, key=len, reverse=True))
                 + r")(-start)?\(")
_SHAPE = re.compile(r"(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|"
                    r"f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
          "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> float:
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo_text: str) -> tuple[dict[str, int], float]:
  """({op: count}, bytes per device) of the collectives in an optimized HLO
  module's text. An async pair (`-start`/`-done`) counts once; bytes are the
  result sizes (a tuple's largest element: async results carry their
  operands too), all-reduce twice (reduce-scatter + all-gather)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  moved = 0.0
  for line in hlo_text.splitlines():
    found = _OP.search(line)
    if not found:
      continue
    op = found.group(2)
    counts[op] += 1
    shape = found.group(1)
    sizes = [_shape_bytes(part) for part in re.findall(r"[a-z0-9]+\[[\d,]*\]", shape)]
    moved += (2 if op == "all-reduce" else 1) * (max(sizes) if sizes else 0.0)
  return counts, moved


def _memory(compiled) -> dict[str, Optional[int]]:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {"peak": None, "arguments": None, "temp": None}
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  peak = getattr(analysis, "peak_memory_in_bytes", 0) or 0
  return {"peak": int(peak if peak > 0 else total),
          "arguments": int(analysis.argument_size_in_bytes),
          "temp": int(analysis.temp_size_in_bytes)}


def _cost(compiled) -> dict[str, Optional[float]]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (XLA:GPU compile-only: none)
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return {"flops": None, "bytes": None}
  flops, moved = cost.get("flops"), cost.get("bytes accessed")
  return {"flops": None if flops is None or flops < 0 else float(flops),
          "bytes": None if moved is None or moved < 0 else float(moved)}


def roofline(chip: Chip, *, flops: float, bytes_accessed: Optional[float],
             collective_bytes: float, cross_host: bool) -> dict[str, float]:
  """Seconds of a step's compute, memory traffic and communication on `chip`,
  and their max (the step can be no faster; perfect overlap)."""
  link = chip.network if cross_host else chip.interconnect
  parts = {"compute_seconds": flops / chip.peak_flops,
           "memory_seconds": (bytes_accessed or 0.0) / chip.hbm_bandwidth,
           "communication_seconds": collective_bytes / link}
  return {**parts, "estimated_step_seconds": max(parts.values())}


def _largest_arguments(abstract_tree, limit: int = 3) -> list[str]:
  """The largest per-device arrays among a step's arguments."""
  sized = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    sized.append((math.prod(shape) * jnp.dtype(leaf.dtype).itemsize, name, shape, leaf.dtype))
  sized.sort(key=lambda item: -item[0])
  return [f"{name} {jnp.dtype(dtype).name}{list(shape)} ({size / GiB:.2f} GiB)"
          for size, name, shape, dtype in sized[:limit]]


class DoesNotFit(AotError):
  """The step needs more memory per device than the chip has."""


def _parse_oom(text: str) -> tuple[Optional[float], Optional[float]]:
  """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message."""
  units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  found = re.search(r"([\d.]+)([KMGT])\)?\s*(?:>|exceeds)\s*available\s+\w+\s*\(?"
                    r"([\d.]+)([KMGT])", text)
  if not found:
    return None, None
  return (float(found.group(1)) * units[found.group(2)],
          float(found.group(3)) * units[found.group(4)])


def _does_not_fit(what: str, amount: str, topology: Topology, abstract_args) -> DoesNotFit:
  largest = "; ".join(_largest_arguments(abstract_args))
  return DoesNotFit(f"the {what} {amount} on {topology.name} ({topology.chip.name}); "
                    f"largest arguments: {largest}")


def _compile(lowered, what: str, topology: Topology, abstract_args) -> tuple[Any, float]:
  """(compiled, seconds); DoesNotFit when XLA runs out of device memory."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise AotError(f"compiling the {what} for {topology.name} failed: "
                     f"{text.strip().splitlines()[0][:400]}") from None
    needed, available = _parse_oom(text)
    kind = " of temporaries" if "temporaries" in text else ""
    amount = (f"needs {needed / GiB:.2f} GiB{kind} per device, {available / GiB:.2f} GiB "
              f"available" if needed else "does not fit in device memory")
    raise _does_not_fit(what, amount, topology, abstract_args) from None
  return compiled, time.perf_counter() - start


def lower_steps(config, devices: list) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(mesh, {"train step": lowered, "eval step": lowered}, abstract arguments)
  of `config` on `devices`, built as `moejax.main` builds them, abstractly."""
  train = config.train
  vocab_size = data_lib.vocab_size(config.data)
  model_lib.check(config, vocab_size)
  mesh = model_lib.make_mesh(config, devices)
  tx = optim.make_optimizer(train)
  graphdef, params, opt_state = model_lib.abstract_state(config, vocab_size, mesh, tx)
  batch = data_lib.batch_spec(config.data, seq_len=train.seq_len,
                              global_batch_size=train.batch_size,
                              sharding=parallel.batch_sharding(mesh))
  with parallel.activate(mesh):
    train_step = steps_lib.make_train_step(graphdef, tx, optim.learning_rate_schedule(train),
                                           config.seed, qk_clip_tau=train.qk_clip_tau)
    lowered = {
        "train step": train_step.lower(params, opt_state, batch,
                                       jax.ShapeDtypeStruct((), jnp.int32)),
        "eval step": evaluator_lib.make_eval_step(graphdef).lower(params, batch)}
  return mesh, lowered, {"params": params, "opt_state": opt_state}


def _dump(dump_dir: str, topology: Topology, programs: dict[str, str]) -> None:
  os.makedirs(dump_dir, exist_ok=True)
  for what, program in programs.items():
    name = what.replace(" ", "_")
    with open(os.path.join(dump_dir, f"{name}.{topology.name}.hlo.txt"), "w") as f:
      f.write(program)


def compile_for(config, topology_name: str, *, num_slices: int = 1,
                dump_dir: Optional[str] = None) -> dict[str, Any]:
  """The JSON record of the module docstring for `config` on the topology."""
  config_lib.validate_config(config)
  if num_slices < 1:
    raise AotError(f"--num_slices={num_slices} must be >= 1")
  topology = parse_topology(topology_name)
  devices = topology_devices(topology, num_slices)
  mesh, lowered, arguments = lower_steps(config, devices)
  compiled, compile_seconds = _compile(lowered["train step"], "train step", topology,
                                       arguments)
  eval_compiled, eval_seconds = _compile(lowered["eval step"], "eval step", topology,
                                         {"params": arguments["params"]})
  hlo = compiled.as_text()
  if dump_dir:
    _dump(dump_dir, topology, {"train step": hlo, "eval step": eval_compiled.as_text()})
  memory, cost = _memory(compiled), _cost(compiled)
  counts, moved = collectives(hlo)
  train = config.train
  architecture = model_lib.architecture(config, data_lib.vocab_size(config.data))
  model_flops = (accounting.train_flops_per_token(**architecture, seq_len=train.seq_len)
                 * train.batch_size * train.seq_len / len(devices))
  cross_host = num_slices > 1 or (topology.platform == "gpu" and topology.hosts > 1)
  # XLA costs a loop body once: with scan_layers its FLOPs and bytes cover one
  # layer unit, so the roofline takes moejax's FLOPs and no memory term.
  loops = bool(config.model.scan_layers)
  estimate = roofline(topology.chip,
                      flops=model_flops if loops else (cost["flops"] or model_flops),
                      bytes_accessed=None if loops else cost["bytes"],
                      collective_bytes=moved, cross_host=cross_host)
  capacity = int(topology.chip.hbm_bytes)
  if memory["peak"] is not None and memory["peak"] > capacity:
    raise _does_not_fit("train step", f"needs {memory['peak'] / GiB:.2f} GiB per device, "
                        f"{capacity / GiB:.2f} GiB available", topology, arguments)
  mfu = model_flops / topology.chip.peak_flops / estimate["estimated_step_seconds"]
  return {
      "topology": topology.name, "platform": topology.platform,
      "device_kind": devices[0].device_kind, "devices": len(devices),
      "hosts": topology.hosts * num_slices, "num_slices": num_slices,
      "mesh": dict(mesh.shape),
      "peak_memory_bytes": memory["peak"], "memory_capacity_bytes": capacity,
      "fits": memory["peak"] is not None,
      "argument_bytes_per_device": memory["arguments"],
      "temp_bytes_per_device": memory["temp"],
      "eval_peak_memory_bytes": _memory(eval_compiled)["peak"],
      "flops_per_device": cost["flops"], "bytes_accessed_per_device": cost["bytes"],
      "cost_counts_loop_bodies_once": loops,
      "model_flops_per_device": model_flops,
      "collectives": counts, "collective_bytes_per_device": moved,
      "compile_seconds": round(compile_seconds, 2),
      "eval_compile_seconds": round(eval_seconds, 2),
      **{k: float(f"{v:.4g}") for k, v in estimate.items()},
      "estimated_mfu": float(f"{mfu:.4g}"),
      "peak_flops_per_device": topology.chip.peak_flops,
      "dispatch": config.model.moe.dispatch,
      "grouped_matmul": config.model.moe.grouped_matmul,
      "batch_size": train.batch_size, "seq_len": train.seq_len,
      "jax": jax.__version__,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  try:
    record = compile_for(_CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value,
                         dump_dir=_DUMP.value or None)
  except ValueError as e:
    _release()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except BaseException:
    sys.stderr.write(_release())  # an unexpected failure shows the libraries' log too
    raise
  _release()
  print(json.dumps(record))


def _release() -> str:
  global _QUIET
  held, _QUIET = (_QUIET.release() if _QUIET is not None else ""), None
  return held


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*.py); override keys with --config.<key>=...",
      lock_config=True)
  _TOPOLOGY = flags.DEFINE_string(
      "topology", None, "Target: v4-32, v5p-64, v5e-16, v5e-256, v6e-8, h100-8, h100-16, "
      "h200-8, b200-8, ...")
  _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (TPU) or groups of hosts "
                                     "(GPU) joined by the data-center network.")
  _DUMP = flags.DEFINE_string("dump", "", "Write the optimized HLO of both steps here.")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main, flags_parser=config_lib.flags_parser(_CONFIG))
