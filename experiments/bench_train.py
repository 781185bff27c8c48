r"""Times the compiled training step of a config: throughput, MFU, memory, compile time.

    python -m experiments.bench_train --config=configs/default.py
    python -m experiments.bench_train --config=configs/default.py \
        --config.model.num_layers=32 --config.model.scan_layers=true --steps=5
    python -m experiments.bench_train --config=configs/default.py --profile=/tmp/trace

Builds exactly what `moejax.main` trains (data, mesh, sharded parameters,
optimizer, the jitted train step of `moejax.train.steps`), compiles the step
ahead of time, runs --warmup steps, then times --steps steps, and prints one
JSON object:

  tokens_per_sec     global tokens per second over the timed steps
  mfu                model FLOP utilization: tokens_per_sec * training FLOPs
                     per token (moejax.scaling.accounting, 6N + attention) /
                     peak_flops
  peak_flops         peak FLOP/s of all devices (config.train.peak_flops_per_device
                     or the table in moejax.train.metrics, times the devices)
  step_seconds       mean wall time of a timed step (each step waits for the last)
  compile_seconds    lowering + compiling the train step
  peak_memory_bytes  per device, from the compiled program's memory analysis:
                     arguments + outputs + temporaries - donated aliases (what
                     the step allocates; no allocator slack); its parts
                     argument_bytes (parameters, optimizer state, batch) and
                     temp_bytes (activations and other temporaries)
  xla_peak_memory_bytes  XLA's own peak per device where the backend gives
                     one (TPU, GPU; null on CPU)
--force_balance sets config.model.moe.force_balance (every expert the same
load: the step's time without routing skew).
plus the model and run description (layers, experts, dtypes, scan, remat,
backend, device kind). --profile=DIR writes a profiler trace of 3 steps there
(open it with TensorBoard's profile plugin or Perfetto).

Bad flags or config keys end with one line naming the problem (exit status 1).
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from moejax import data as data_lib
from moejax import parallel
from moejax.scaling import accounting
from moejax.train import config as config_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optim
from moejax.train import steps as steps_lib
from moejax import model as model_lib


def peak_memory_bytes(compiled) -> int:
  """Per-device bytes the compiled program allocates: arguments + outputs +
  temporaries - donated aliases.

  XLA assigns every temporary a place in one temp allocation (buffers whose
  lifetimes do not overlap share space), so this is what the step needs
  resident. `peak_memory_in_bytes` of the analysis is not used: XLA:CPU
  reports only the arguments there (no temporaries), so remat would look free.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return -1
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def xla_peak_memory_bytes(compiled):
  """XLA's own peak per device (`peak_memory_in_bytes`) where the backend
  computes one (TPU; GPU), else None: XLA:CPU reports only the arguments
  there. peak_memory_bytes overstates it, since it adds buffers that are
  never live together (1.7x on lm1b for TPU, as measured in issue 24)."""
  if jax.default_backend() == "cpu":
    return None
  analysis = compiled.memory_analysis()
  peak = getattr(analysis, "peak_memory_in_bytes", 0) if analysis is not None else 0
  return int(peak) if peak and peak > 0 else None


def memory_parts(compiled) -> dict:
  """The parts of peak_memory_bytes: resident state (parameters, optimizer
  state, batch) and the step's temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {"argument_bytes": int(analysis.argument_size_in_bytes),
          "temp_bytes": int(analysis.temp_size_in_bytes)}


def benchmark(config, *, steps: int, warmup: int, profile_dir: str = "") -> dict:
  """The measurements of the module docstring for `config`."""
  config_lib.validate_config(config)
  train = config.train
  with tempfile.TemporaryDirectory() as cache:
    dataset = data_lib.make_dataset(
        config.data, seq_len=train.seq_len, global_batch_size=train.batch_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), cache_dir=cache)
    model_lib.check(config, dataset.vocab_size)
    mesh = model_lib.make_mesh(config)
    tx = optim.make_optimizer(train)
    schedule = optim.learning_rate_schedule(train)
    sharding = parallel.batch_sharding(mesh)
    batches = [model_lib.global_batch(dataset.train_batch(s), sharding)
               for s in range(min(warmup + steps, 4))]
  kwargs = model_lib.architecture(config, dataset.vocab_size)
  flops_per_token = accounting.train_flops_per_token(**kwargs, seq_len=train.seq_len)
  counts = accounting.param_counts(**kwargs)

  with parallel.activate(mesh):
    graphdef, params = model_lib.init_params(config, dataset.vocab_size, mesh)
    opt_state = jax.jit(lambda p: tx.init(steps_lib.trainable(p)))(params)
    train_step = steps_lib.make_train_step(graphdef, tx, schedule, config.seed,
                                           qk_clip_tau=config.train.qk_clip_tau)
    step_index = jnp.asarray(0, jnp.int32)
    start = time.perf_counter()
    compiled = train_step.lower(params, opt_state, batches[0], step_index).compile()
    compile_seconds = time.perf_counter() - start

    def run(step):
      nonlocal params, opt_state
      params, opt_state, metrics, _ = compiled(params, opt_state,
                                               batches[step % len(batches)],
                                               jnp.asarray(step, jnp.int32))
      return metrics

    for step in range(warmup):
      jax.block_until_ready(run(step))
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
      metrics = run(step)
    jax.block_until_ready((params, metrics))
    step_seconds = (time.perf_counter() - start) / steps
    if profile_dir:
      with jax.profiler.trace(profile_dir):
        for step in range(warmup + steps, warmup + steps + 3):
          metrics = run(step)
        jax.block_until_ready((params, metrics))

  tokens_per_sec = train.batch_size * train.seq_len / step_seconds
  peak = metrics_lib.peak_flops_per_device(train.peak_flops_per_device) * jax.device_count()
  moe = config.model.moe
  return {
      "tokens_per_sec": tokens_per_sec,
      "mfu": tokens_per_sec * flops_per_token / peak,
      "peak_flops": peak,
      "step_seconds": step_seconds,
      "compile_seconds": compile_seconds,
      "peak_memory_bytes": peak_memory_bytes(compiled),
      "xla_peak_memory_bytes": xla_peak_memory_bytes(compiled),
      **memory_parts(compiled),
      "force_balance": moe.force_balance,
      "train_flops_per_token": flops_per_token,
      "params_total": counts["total"],
      "params_active_per_token": counts["active_per_token"],
      "loss": float(metrics["train/loss"]),
      "num_layers": config.model.num_layers, "d_model": config.model.d_model,
      "router": moe.router, "num_experts": moe.num_experts, "top_k": moe.top_k,
      "dispatch": moe.dispatch, "capacity_factor": moe.capacity_factor,
      "batch_size": train.batch_size, "seq_len": train.seq_len,
      "dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
      "moment_dtype": train.moment_dtype, "scan_layers": config.model.scan_layers,
      "remat": config.model.remat, "steps": steps,
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "jax": jax.__version__,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _STEPS.value < 1 or _WARMUP.value < 0:
    print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
    sys.exit(1)
  if _PROFILE.value:
    os.makedirs(_PROFILE.value, exist_ok=True)
  config = _CONFIG.value
  if _FORCE_BALANCE.value:
    config = config.copy_and_resolve_references()
    config.model.moe.force_balance = True
  try:
    result = benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value,
                       profile_dir=_PROFILE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*.py); override keys with --config.<key>=...",
      lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  _PROFILE = flags.DEFINE_string("profile", "", "Write a profiler trace of 3 steps here.")
  _FORCE_BALANCE = flags.DEFINE_bool(
      "force_balance", False, "Every expert gets the same load "
      "(config.model.moe.force_balance): times the step without routing skew.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
