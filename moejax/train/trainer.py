"""Training and evaluation of the MoE language model.

`train_and_evaluate(config, workdir)` is the whole job: validate the config
and the workdir, take the workdir's lock, check that the config matches the
one the checkpoints were trained with, build data and model, restore the
newest checkpoint that restores, then train with periodic logging, evaluation
and checkpoints (`moejax.train.loop`). Everything a step computes (batch, learning rate, router
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

import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from moejax import data as data_lib
from moejax import model as model_lib
from moejax import parallel
from moejax import run as run_lib
from moejax import trace as trace_lib
from moejax.scaling import accounting
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import console as console_lib
from moejax.train import lock as lock_lib
from moejax.train import loop as loop_lib
from moejax.train import lora as lora_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optim
from moejax.train import resume
from moejax.train import signals as signals_lib
from moejax.train import steps as steps_lib
from moejax.train import upcycle

# Re-exported: the errors and exit status of a run are part of the trainer's API.
NonFiniteLossError = loop_lib.NonFiniteLossError
Interrupted = loop_lib.Interrupted
SIGINT_EXIT_STATUS = loop_lib.SIGINT_EXIT_STATUS


class WorkdirError(ValueError):
  """--workdir is a file or cannot be written."""


def _summary(config, dataset, vocab_size: int) -> dict[str, Any]:
  kwargs = model_lib.architecture(config, vocab_size)
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



def _complete(run: run_lib.Run, config, console) -> bool:
  """True (and says so) when the newest checkpoint already reached train.steps."""
  step = run.newest_step
  if step is None or step < config.train.steps or run.damage(step) is not None:
    return False
  console.print(f"{run.workdir} is complete at step {step} (config.train.steps="
                f"{config.train.steps}); nothing to do. Raise config.train.steps to train on.")
  return True


def _check_sources(config, run: run_lib.Run) -> None:
  """A run that starts from another run (upcycling, a LoRA base) checks it
  before data and compilation: a missing, empty or mismatched source is one
  message."""
  if config.init.upcycle_from and not run.steps:
    upcycle.check_source(upcycle.source_config(config.init.upcycle_from)[1], config,
                         config.init.upcycle_from)
  if lora_lib.enabled(config):
    lora_lib.check_base(lora_lib.base_run(config, run.path)[2], config)


def _run(config, workdir: str, console: console_lib.Console,
         stop: signals_lib.StopSignals) -> dict[str, float]:
  run = run_lib.Run(workdir)
  recorded, recorded_step = run.recorded_config()
  changes = resume.check(recorded, config, step=recorded_step, workdir=workdir)
  if _complete(run, config, console):
    return metrics_lib.last_values(run.file(run_lib.METRICS_FILE))
  _check_sources(config, run)
  train = config.train
  dataset = data_lib.make_dataset(
      config.data, seq_len=train.seq_len, global_batch_size=train.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), cache_dir=run.file("data_cache"))
  vocab_size = dataset.vocab_size
  model_lib.check(config, vocab_size)
  if train.get("replay_trace"):
    dataset = trace_lib.ReplayDataset(trace_lib.load(train.replay_trace), dataset, config)
  mesh = model_lib.make_mesh(config)
  tx = optim.make_optimizer(train)
  fresh = not run.steps
  checkpointer = checkpoints.Checkpointer(workdir, keep=train.keep_checkpoints)
  try:
    with parallel.activate(mesh):
      graphdef, params, frozen, record = _initial_params(config, run, vocab_size, mesh,
                                                         fresh, console)
      if fresh and not lora_lib.enabled(config):
        params = _balanced_hash_tables(config, graphdef, params, dataset, console)
      opt_state = jax.jit(lambda p: tx.init(steps_lib.trainable(p)))(params)
    start, params, opt_state, iterator = _restore(
        checkpointer, config, dataset, params, opt_state, changes, console)
    loop = loop_lib.Loop(
        config=config, run=run, dataset=dataset, mesh=mesh, graphdef=graphdef, tx=tx,
        schedule=optim.learning_rate_schedule(train), checkpointer=checkpointer,
        console=console, stop=stop, writer=None, config_json=resume.to_json(config),
        flops_per_token=0.0, frozen=frozen, last_saved=start or None)
    return _train(loop, vocab_size, record, loop_lib.TrainState(params, opt_state, start),
                  iterator)
  finally:
    checkpointer.close()  # a pending save finishes before any exit


def _initial_params(config, run: run_lib.Run, vocab_size: int, mesh, fresh: bool, console):
  """(graphdef, params, frozen, finetune record) before the newest checkpoint
  is restored: fresh parameters, upcycled ones (a new run with
  init.upcycle_from), or a LoRA run's adapters on its frozen base. Records
  how the run began when it is new. Call under `parallel.activate(mesh)`."""
  if lora_lib.enabled(config):
    # params: the adapters (what is trained and checkpointed); frozen: the base.
    graphdef, params, frozen, record = run_lib.lora_model(run, config, vocab_size, mesh)
    if fresh:
      run.write_json(lora_lib.RECORD_FILE, record)
    counts = record["adapter_params"]
    console.print(f"LoRA on {record['base']} (step {record['step']}): rank "
                  f"{record['rank']}, {sum(counts.values()):,} adapter parameters "
                  f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}); base frozen"
                  + ("" if record["quantize_base"] == "none"
                     else f", quantized to {record['quantize_base']}"))
    return graphdef, params, frozen, record
  graphdef, params = model_lib.init_params(config, vocab_size, mesh)
  if config.init.upcycle_from and fresh:
    params, source_step = upcycle.upcycle(params, config, vocab_size, mesh)
    console.print(f"Upcycled from {config.init.upcycle_from} (dense, step {source_step}): "
                  f"experts copied from its FFNs, routers and optimizer fresh")
    run.write_json(upcycle.RECORD_FILE, {
        "upcycle_from": os.path.abspath(config.init.upcycle_from), "step": source_step,
        "upcycle_noise": config.init.upcycle_noise})
  return graphdef, params, None, None


# Training batches counted for the balanced hash tables (hash_table="balanced").
HASH_TABLE_BATCHES = 32


def _balanced_hash_tables(config, graphdef, params, dataset, console):
  """`params` with every balanced hash table built from the token counts of
  the first HASH_TABLE_BATCHES training batches (this process's rows, summed
  over processes), laid out as before; unchanged without such a table."""
  moe = config.model.moe
  if moe.get("hash_table", "random") != "balanced" or not (
      moe.router == "hash" or config.model.get("first_hash_layers", 0)):
    return params
  counts = np.zeros(dataset.vocab_size, np.int64)
  for step in range(HASH_TABLE_BATCHES):
    counts += np.bincount(np.asarray(dataset.train_batch(step)["inputs"]).ravel(),
                          minlength=dataset.vocab_size)
  counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(
      -1, dataset.vocab_size).sum(axis=0)
  model = nnx.merge(graphdef, params)
  layers = model.fill_hash_tables(counts)
  console.print(f"Balanced hash tables of {layers} layer(s) from the id counts of "
                f"{int(counts.sum()):,} training tokens")
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return jax.device_put(nnx.state(model), shardings)


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


def _train(loop: loop_lib.Loop, vocab_size: int, finetune_record, state, iterator
           ) -> dict[str, float]:
  """Writes the run's summary and config, then trains from `state`."""
  config, run = loop.config, loop.run
  summary = _summary(config, loop.dataset, vocab_size)
  if finetune_record is not None:
    summary["finetune"] = finetune_record
  loop.flops_per_token = summary["train_flops_per_token"]
  run.write_json(run_lib.SUMMARY_FILE, summary)
  run.write_json(run_lib.CONFIG_FILE, loop.config_json)
  counts = summary["params"]
  loop.console.print(f"{run.workdir}: parameters {counts['total']:,} total, "
                     f"{counts['active_per_token']:,} active per token; training FLOPs per "
                     f"token {summary['train_flops_per_token']:.3g}; steps {state.done} -> "
                     f"{config.train.steps}")
  loop.writer = metrics_lib.MetricWriter(run.path, enabled=jax.process_index() == 0,
                                         resume_step=state.done)
  try:
    state = loop.run_steps(state, iterator)
  finally:
    loop.writer.close()
  return loop.finish(state.done)


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
