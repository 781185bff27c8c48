"""Training and evaluation of the MoE language model.

`train_and_evaluate(config, workdir)` is the whole job: validate the config
and the workdir, take the workdir's lock, check that the config matches the
one the checkpoints were trained with, build data and model, restore the
newest checkpoint that restores, then train with periodic logging, evaluation
and checkpoints. Everything a step computes (batch, learning rate, router
noise) is a function of the step number only, so a resumed run continues
exactly as an uninterrupted one.

How a run ends:
  * finished (or already complete: nothing is written): returns the last metrics;
  * SIGTERM (preemption): saves a checkpoint after the current step, returns;
  * SIGINT (Ctrl-C): saves a checkpoint, then raises `Interrupted`;
    further signals while it saves are ignored; before the first step either
    signal stops at once (`Interrupted`) with nothing saved;
  * non-finite loss: raises `NonFiniteLossError` once the last healthy
    checkpoint is complete on disk;
  * bad config, workdir or checkpoints: `ValueError` (or a subclass) before
    anything is written; a locked workdir: `lock.WorkdirLockedError`.
"""

import json
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moejax import data as data_lib
from moejax import parallel
from moejax import routing
from moejax.nn import TransformerLM, moe_layer_flags
from moejax.scaling import accounting
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import console as console_lib
from moejax.train import lock as lock_lib
from moejax.train import lora as lora_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optim
from moejax.train import resume
from moejax.train import routing_report
from moejax.train import signals as signals_lib
from moejax.train import steps as steps_lib
from moejax.train import upcycle

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Exit status of the CLI after SIGINT (the shell's 128 + SIGINT).
SIGINT_EXIT_STATUS = 130


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient."""


class WorkdirError(ValueError):
  """--workdir is a file or cannot be written."""


class Interrupted(KeyboardInterrupt):
  """SIGINT (or a signal before the first step) stopped the run; `saved_step`
  is the checkpoint written on the way out (None: nothing was saved)."""

  def __init__(self, message: str, saved_step: Optional[int] = None):
    super().__init__(message)
    self.saved_step = saved_step


def model_kwargs(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """The architecture keywords shared by `TransformerLM` and the accounting."""
  model = config.model
  head_dim = model.head_dim or model.d_model // model.num_heads
  moe = model.moe.to_dict()
  return dict(vocab_size=vocab_size, num_layers=model.num_layers, d_model=model.d_model,
              num_heads=model.num_heads, head_dim=head_dim, moe=moe,
              moe_every=model.moe_every, first_dense_layers=model.first_dense_layers,
              tie_embeddings=model.tie_embeddings,
              tokens_per_group=accounting.tokens_per_group(
                  moe, seq_len=config.train.seq_len, batch_size=config.train.batch_size))


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                rngs: nnx.Rngs) -> TransformerLM:
  """The LM a config describes. Invalid model keys raise ValueError naming them."""
  try:
    return TransformerLM(rope_base=config.model.rope_base,
                         dtype=_DTYPES[config.model.dtype], rngs=rngs,
                         scan_layers=config.model.scan_layers, remat=config.model.remat,
                         param_dtype=_DTYPES[config.model.param_dtype],
                         **model_kwargs(config, vocab_size))
  except (ValueError, TypeError) as e:
    section = ("config.model.moe" if any(key in str(e) for key in config.model.moe)
               else "config.model")
    raise ValueError(f"invalid {section}: {e}") from e


def check_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Builds the model abstractly (no parameters allocated, nothing compiled)."""
  nnx.eval_shape(lambda: build_model(config, vocab_size, nnx.Rngs(0)))


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of `config.mesh`, validated against the devices and the
  model (experts, heads and hidden widths must divide over their axes)."""
  moe, model = config.model.moe, config.model
  routed = routing.get_router(moe.router).routed
  sizes = parallel.validate_mesh_config(
      config.mesh, num_devices=jax.device_count(),
      num_experts=moe.num_experts * moe.granularity if routed else None,
      num_heads=model.num_heads, expert_hidden=moe.expert_hidden // moe.granularity)
  batch_shards = sizes["data"] * sizes["expert"]
  if config.train.batch_size % batch_shards:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                     f"by config.mesh.data * config.mesh.expert = {batch_shards}")
  return parallel.make_mesh(config.mesh)


def init_state(config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh,
               tx: optax.GradientTransformation):
  """Parameters and optimizer state, created directly in their shardings.

  Initialization is a function of `config.seed` only (threefry random bits do
  not depend on the sharding), so every mesh starts from the same parameters.
  """
  def init_params():
    return nnx.split(build_model(config, vocab_size, nnx.Rngs(config.seed)))[1]

  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: build_model(config, vocab_size, nnx.Rngs(config.seed))))
  shardings = parallel.param_shardings(abstract_params, mesh)
  params = jax.jit(init_params, out_shardings=shardings)()
  # Router state (a balancing bias) is updated outside the optimizer.
  opt_state = jax.jit(lambda p: tx.init(steps_lib.trainable(p)))(params)
  return graphdef, params, opt_state


def restore_params(workdir: str, step: int, config: ml_collections.ConfigDict,
                   vocab_size: int, mesh: jax.sharding.Mesh):
  """(graphdef, parameters) of checkpoint `step` of `workdir`, placed in the
  shardings of `mesh` (any mesh; orbax reshards). No optimizer state is read.
  Call under `parallel.activate(mesh)`. A checkpoint whose shapes do not fit
  `config` raises `checkpoints.IncompatibleCheckpointError` naming them.
  A LoRA run (`config.finetune.lora.rank` > 0) gives its base with the
  checkpoint's adapters (`lora.restore`)."""
  if lora_lib.enabled(config):
    return lora_lib.restore(workdir, step, config, vocab_size, mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: build_model(config, vocab_size, nnx.Rngs(config.seed))))
  shardings = parallel.param_shardings(abstract, mesh)
  target = jax.tree.map(
      lambda s, variable: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variable),
      shardings, abstract)
  checkpointer = checkpoints.Checkpointer(workdir, keep=1, read_only=True)
  try:
    return graphdef, checkpointer.restore_params(step, target)
  finally:
    checkpointer.close()


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch mesh axes."""
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}


def _summary(config, dataset, vocab_size: int) -> dict[str, Any]:
  kwargs = model_kwargs(config, vocab_size)
  counts = accounting.param_counts(**kwargs)
  flops = accounting.train_flops_per_token(**kwargs, seq_len=config.train.seq_len)
  return {"params": counts, "train_flops_per_token": flops,
          "data": dataset.info, "data/entropy_floor": dataset.entropy_floor,
          "data/unigram_entropy": dataset.unigram_entropy,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__}


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError if `workdir` is a file or cannot be created or written."""
  if "://" in workdir:
    # metrics.jsonl, the lock and config.json are written with Python file I/O.
    raise WorkdirError(f"--workdir={workdir}: a URL is not supported; use a local or "
                       f"mounted path (for a bucket, mount it, e.g. with gcsfuse)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a folder")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"--workdir={workdir} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} cannot be written: {existing} is read-only "
                       f"or not writable by this user")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _acquire(workdir_lock: lock_lib.WorkdirLock) -> None:
  """Process 0 takes the lock; every process of the job learns the outcome."""
  error = None
  try:
    workdir_lock.acquire()
  except lock_lib.WorkdirLockedError as e:
    error = e
  except OSError as e:
    raise WorkdirError(f"--workdir={os.path.dirname(workdir_lock.path)} cannot be "
                       f"written: {e.strerror}") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = lock_lib.WorkdirLockedError("process 0 could not lock the workdir (see its "
                                          "message)")
  if error is not None:
    raise error


def _startup_interruption(signum: int) -> Interrupted:
  return Interrupted(f"{signal.Signals(signum).name} before the first step: stopped, "
                     f"nothing was trained or saved")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  Raises:
    ValueError: invalid config, workdir, or a config that differs from the
      checkpoint's (`resume.ConfigChangedError`), before anything is written.
    lock_lib.WorkdirLockedError: another live run holds the workdir.
    NonFiniteLossError: the loss became non-finite; the last healthy
      checkpoint is complete on disk.
    Interrupted: SIGINT (after saving a checkpoint), or a signal before the
      first step.
  """
  config_lib.validate_config(config)
  train = config.train
  process_index, process_count = jax.process_index(), jax.process_count()
  if train.batch_size % process_count:
    raise ValueError(f"config.train.batch_size={train.batch_size} is not divisible by the "
                     f"{process_count} processes")
  check_workdir(workdir)
  is_main = process_index == 0
  console = console_lib.Console(enabled=is_main)
  workdir_lock = lock_lib.WorkdirLock(workdir, enabled=is_main)
  with signals_lib.StopSignals(_startup_interruption) as stop:
    _acquire(workdir_lock)
    try:
      return _run(config, workdir, console, stop)
    finally:
      console.close()
      workdir_lock.release()


def _recorded_config(workdir: str, steps: list[int]) -> tuple[Optional[dict], Optional[int]]:
  """The config of the newest checkpoint that records one (older moejax
  versions: the workdir's config.json) and that checkpoint's step."""
  for step in reversed(steps):
    recorded = checkpoints.read_config(workdir, step)
    if recorded is not None:
      return recorded, step
  path = os.path.join(workdir, "config.json")
  if steps and os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f), steps[-1]
    except (OSError, ValueError):
      pass
  return None, None


def _run(config, workdir: str, console: console_lib.Console,
         stop: signals_lib.StopSignals) -> dict[str, float]:
  train = config.train
  saved_steps = checkpoints.list_steps(workdir)
  recorded, recorded_step = _recorded_config(workdir, saved_steps)
  changes = resume.check(recorded, config, step=recorded_step, workdir=workdir)
  if saved_steps and saved_steps[-1] >= train.steps and checkpoints.check_files(
      os.path.join(workdir, "checkpoints", str(saved_steps[-1]))) is None:
    console.print(f"{workdir} is complete at step {saved_steps[-1]} (config.train.steps="
                  f"{train.steps}); nothing to do. Raise config.train.steps to train on.")
    return metrics_lib.last_values(os.path.join(workdir, "metrics.jsonl"))
  if config.init.upcycle_from and not saved_steps:
    # A missing, empty or non-dense source fails before data and compilation.
    upcycle.check_source(upcycle.source_config(config.init.upcycle_from)[1], config,
                         config.init.upcycle_from)
  finetune = lora_lib.enabled(config)
  if finetune:  # a missing or mismatched base fails before data and compilation
    lora_lib.check_base(lora_lib.base_run(config, workdir)[2], config)

  dataset = data_lib.make_dataset(
      config.data, seq_len=train.seq_len, global_batch_size=train.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), cache_dir=os.path.join(workdir, "data_cache"))
  vocab_size = dataset.vocab_size
  check_model_config(config, vocab_size)
  mesh = make_mesh(config)
  tx = optim.make_optimizer(train)
  schedule = optim.learning_rate_schedule(train)
  frozen = record = None
  with parallel.activate(mesh):
    if finetune:
      # params: the adapters (what is trained and checkpointed); frozen: the base.
      graphdef, params, frozen, record = lora_lib.build(config, vocab_size, mesh, workdir)
      opt_state = jax.jit(lambda p: tx.init(steps_lib.trainable(p)))(params)
    else:
      graphdef, params, opt_state = init_state(config, vocab_size, mesh, tx)

  checkpointer = checkpoints.Checkpointer(workdir, keep=train.keep_checkpoints)
  try:
    if config.init.upcycle_from and not checkpointer.steps():
      with parallel.activate(mesh):
        params, source_step = upcycle.upcycle(params, config, vocab_size, mesh)
      console.print(f"Upcycled from {config.init.upcycle_from} (dense, step {source_step}): "
                    f"experts copied from its FFNs, routers and optimizer fresh")
      if jax.process_index() == 0:
        with open(os.path.join(workdir, upcycle.RECORD_FILE), "w") as f:
          json.dump({"upcycle_from": os.path.abspath(config.init.upcycle_from),
                     "step": source_step, "upcycle_noise": config.init.upcycle_noise}, f)
    if finetune:
      if not checkpointer.steps() and jax.process_index() == 0:
        path = os.path.join(workdir, lora_lib.RECORD_FILE)
        with open(path + ".tmp", "w") as f:  # whole or absent, never half written
          json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)
      counts = record["adapter_params"]
      console.print(f"LoRA on {record['base']} (step {record['step']}): rank "
                    f"{record['rank']}, {sum(counts.values()):,} adapter parameters "
                    f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}); base frozen"
                    + ("" if record["quantize_base"] == "none"
                       else f", quantized to {record['quantize_base']}"))
    start, params, opt_state, iterator = _restore(
        checkpointer, config, dataset, params, opt_state, changes, console)
    return _train_loop(config, workdir, dataset, vocab_size, mesh, graphdef, tx, schedule,
                       params, opt_state, iterator, start, checkpointer, console, stop,
                       frozen, record)
  finally:
    checkpointer.close()  # a pending save finishes before any exit


def _restore(checkpointer, config, dataset, params, opt_state, changes, console):
  """(start step, params, opt_state, iterator) from the newest checkpoint
  that restores; moves damaged ones aside; records accepted config changes."""
  is_main = jax.process_index() == 0
  iterator = dataset.train_iterator()
  if not checkpointer.steps():
    return 0, params, opt_state, iterator
  # The abstract target carries this run's shardings: a checkpoint written
  # under another mesh (or process count) is resharded on restore.
  abstract = jax.tree.map(_abstract, {"params": params, "opt_state": opt_state})
  try:
    step, state, data_state, damaged = checkpointer.restore_newest(abstract, is_main=is_main)
  except checkpoints.IncompatibleCheckpointError as e:
    changed = resume.summary_line(changes) or "no config key changed"
    raise ValueError(f"{e}. Changed: {changed}. A resume can change what is trained, not "
                     f"the model's shapes: use a new --workdir") from None
  _sync("moejax_restore")
  checkpointer.reload()
  for d in damaged:
    console.print(f"warning: checkpoint step {d.step} does not restore: {d.reason}; "
                  f"moved to {d.moved_to}")
  if step is None:
    raise ValueError(f"no checkpoint in {checkpointer.directory} restores (each was moved "
                     f"aside, see above); run again to start from step 0")
  iterator.set_state(data_state)
  console.print(f"Resumed from step {step} ({checkpointer.directory}/{step})")
  if changes:
    if is_main:
      resume.record(checkpointer.workdir, changes, step=step)
    console.print(f"config changes since that checkpoint (recorded in "
                  f"{resume.CHANGES_FILE}): {resume.summary_line(changes)}")
  return step, state["params"], state["opt_state"], iterator


def _non_finite(what: str, last_saved: Optional[int]) -> NonFiniteLossError:
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was written")
  return NonFiniteLossError(
      f"{what}; stopping; {kept}. Lower config.train.learning_rate, raise "
      f"config.train.warmup_steps or use config.model.dtype='float32' (to resume from the "
      f"kept checkpoint with another learning rate, add "
      f"--config.train.resume_with_changes=true).")


def _train_loop(config, workdir, dataset, vocab_size, mesh, graphdef, tx, schedule, params,
                opt_state, iterator, start, checkpointer, console, stop, frozen=None,
                finetune_record=None) -> dict[str, float]:
  train = config.train
  is_main = jax.process_index() == 0
  summary = _summary(config, dataset, vocab_size)
  if finetune_record is not None:
    summary["finetune"] = finetune_record
  config_json = resume.to_json(config)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=2)
    counts = summary["params"]
    console.print(f"{workdir}: parameters {counts['total']:,} total, "
                  f"{counts['active_per_token']:,} active per token; training FLOPs per "
                  f"token {summary['train_flops_per_token']:.3g}; steps {start} -> "
                  f"{train.steps}")

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start)
  train_step = steps_lib.make_train_step(graphdef, tx, schedule, config.seed, frozen)
  health_check = steps_lib.make_health_check(graphdef, config.seed, frozen)
  num_domains = dataset.info.get("num_domains", 0)  # synthetic_mixture only
  eval_step = steps_lib.make_eval_step(graphdef, num_domains, frozen)
  moe_layers = [i for i, is_moe in enumerate(
      nn_layer_flags(config)) if is_moe]
  window_loads = None  # per-layer expert load summed over the logging window
  batch_sharding = parallel.batch_sharding(mesh)
  eval_batches = [global_batch(b, batch_sharding)
                  for b in dataset.eval_batches(train.eval_batches)]
  tokens_per_step = train.batch_size * train.seq_len
  peak = metrics_lib.peak_flops_per_device(train.peak_flops_per_device) * jax.device_count()
  flops_per_token = summary["train_flops_per_token"]

  ok = jnp.array(True)
  last_saved = start or None
  record: dict[str, float] = {}
  timer_start, timer_step, seconds_per_step = None, start, None
  run_start, run_step = None, start
  done = start
  console.start(start_step=start, total_steps=train.steps)
  stop.deferred = True
  try:
    with parallel.activate(mesh):
      for step in range(start, train.steps):
        batch = global_batch(next(iterator), batch_sharding)
        params, opt_state, metrics, finite = train_step(params, opt_state, batch,
                                                        jnp.asarray(step, jnp.int32))
        loads = metrics.pop(steps_lib.LOADS_KEY)
        window_loads = loads if window_loads is None else window_loads + loads
        ok = ok & finite
        done = step + 1
        if timer_start is None:  # exclude compilation from throughput
          jax.block_until_ready(params)
          timer_start, timer_step = time.perf_counter(), done
          run_start, run_step = timer_start, done
        last = done == train.steps
        console.advance()

        if done % train.log_every == 0 or last:
          if not bool(ok):
            raise _non_finite(f"non-finite loss or gradient at or before step {done} "
                              f"(train/loss={float(metrics['train/loss'])})", last_saved)
          scalars = dict(metrics)
          scalars.update(_dead_experts(window_loads, moe_layers))
          window_loads = None
          jax.block_until_ready(scalars)
          elapsed = time.perf_counter() - timer_start
          if done > timer_step and elapsed > 0:
            tokens_per_sec = (done - timer_step) * tokens_per_step / elapsed
            scalars["perf/tokens_per_sec"] = tokens_per_sec
            scalars["perf/mfu"] = tokens_per_sec * flops_per_token / peak
          if done > run_step:  # time left from the average since the first step
            seconds_per_step = (time.perf_counter() - run_start) / (done - run_step)
          timer_start, timer_step = time.perf_counter(), done
          if dataset.entropy_floor is not None:
            scalars["data/entropy_floor"] = dataset.entropy_floor
          if done % train.eval_every == 0 or last:
            scalars.update(_eval_record(eval_step, params, eval_batches, moe_layers,
                                        workdir, done, is_main, num_domains))
          record = writer.write(done, scalars)
          console.log(done, record, seconds_per_step)
          if "eval/loss" in record:
            console.eval(done, record["eval/loss"])
        elif done % train.eval_every == 0:
          record = writer.write(done, _eval_record(eval_step, params, eval_batches,
                                                   moe_layers, workdir, done, is_main,
                                                   num_domains))
          console.eval(done, record["eval/loss"])

        if done % train.checkpoint_every == 0 or last or stop.received:
          if not bool(ok):
            raise _non_finite(f"non-finite loss or gradient at or before step {done} "
                              f"(train/loss={float(metrics['train/loss'])})", last_saved)
          # The state after this step must give a finite next step, or every
          # resume from it diverges at once.
          next_batch = global_batch(dataset.train_batch(done), batch_sharding)
          if not bool(health_check(params, opt_state, next_batch,
                                   jnp.asarray(done, jnp.int32))):
            raise _non_finite(f"the state after step {done} (train/loss="
                              f"{float(metrics['train/loss'])}) gives a non-finite loss, "
                              f"gradient or parameter at step {done + 1}, so it was not "
                              f"saved", last_saved)
          checkpointer.save(done, {"params": params, "opt_state": opt_state},
                            iterator.get_state(), config_json)
          last_saved = done
        if stop.received:
          break
    checkpointer.wait()
  finally:
    writer.close()
  return _finish(stop, done, record, workdir, train, console)


def nn_layer_flags(config) -> tuple[bool, ...]:
  """Which Transformer layers of the config are MoE layers."""
  return moe_layer_flags(num_layers=config.model.num_layers,
                         moe_every=config.model.moe_every,
                         first_dense_layers=config.model.first_dense_layers,
                         router=config.model.moe.router)


def _dead_experts(window_loads, moe_layers: list[int]) -> dict[str, float]:
  """train/layer{i}/dead_experts: experts with zero load over the window."""
  if window_loads is None or not moe_layers:
    return {}
  loads = np.asarray(window_loads)
  return {f"train/layer{i}/dead_experts": float(routing_report.dead_experts(load))
          for i, load in zip(moe_layers, loads)}


def _eval_record(eval_step, params, eval_batches, moe_layers, workdir, step,
                 is_main, num_domains) -> dict[str, float]:
  """eval/loss, the per-layer load heatmap (plots/ and TensorBoard) and, with
  domain labels, eval/expert_domain_mi (bits; mean and per layer)."""
  result = steps_lib.evaluate(eval_step, params, eval_batches)
  record = {"eval/loss": result["loss"]}
  loads = result["expert_load"]
  if moe_layers and np.size(loads):
    for i, load in zip(moe_layers, loads):
      record[f"eval/layer{i}/max_violation"] = float(routing_report.max_violation(load))
    if is_main:
      path = os.path.join(workdir, "plots", f"expert_load_step{step}.png")
      routing_report.save_load_heatmap(path, loads, moe_layers, step)
      routing_report.write_heatmap_image(os.path.join(workdir, "tensorboard", "routing"),
                                         "eval/expert_load", path, step)
  joint = result["joint"]
  if moe_layers and np.ndim(joint) == 3 and joint.shape[1] > 0:
    values = [routing_report.mutual_information_bits(j) for j in joint]
    for i, value in zip(moe_layers, values):
      record[f"eval/layer{i}/expert_domain_mi"] = value
    record["eval/expert_domain_mi"] = float(np.mean(values))
  return record


def _finish(stop, done, record, workdir, train, console) -> dict[str, float]:
  tokens = done * train.batch_size * train.seq_len
  if stop.received is None:
    console.summary(step=done, record=record, tokens=tokens, workdir=workdir,
                    outcome="finished")
    return record
  name = signals_lib.NAMES[stop.received]
  console.summary(step=done, record=record, tokens=tokens, workdir=workdir,
                  outcome=f"stopped by {name} with a checkpoint")
  if stop.received == signal.SIGINT:
    raise Interrupted(f"SIGINT: saved a checkpoint at step {done}; run the same command "
                      f"to resume", saved_step=done)
  return record


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
