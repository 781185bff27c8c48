"""The training loop: a train state and the periodic actions around its step.

    for step in range(start, steps):
      state = loop.step(state, next(iterator))
      loop.after(state)            # log, eval, checkpoint (health-checked), signals
      if stop.received: break

The loop body is the train step; everything periodic is an action of
`Loop.after` (vmoe's periodic actions, nanodo's `Trainer.do_step`):
  * log (every `log_every` steps and the last): the step's scalars, dead
    experts over the window, throughput and MFU, after checking that every
    step since the last check was finite;
  * eval (every `eval_every` and the last): the one `Evaluator` on the run's
    eval batches, the per-layer report and the load heatmap; one
    metrics.jsonl record per step holds the log and eval scalars together;
  * trace (every `trace_every`, if > 0): the same evaluation recording every
    token's routing into traces/step_<N>/ (`moejax.trace`);
  * checkpoint (every `checkpoint_every`, the last, and on a stop signal):
    only a state that is finite and alive (`steps.make_health_check`) is
    saved, so the newest checkpoint always resumes;
  * a stop signal (deferred while a step runs) ends the loop after its save.
"""

import dataclasses
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moejax import model as model_lib
from moejax import parallel
from moejax import trace as trace_lib
from moejax.train import evaluator as evaluator_lib
from moejax.train import metrics as metrics_lib
from moejax.train import routing_report
from moejax.train import signals as signals_lib
from moejax.train import steps as steps_lib

# Exit status of the CLI after SIGINT (the shell's 128 + SIGINT).
SIGINT_EXIT_STATUS = 130


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient, or a dead state."""


class Interrupted(KeyboardInterrupt):
  """SIGINT (or a signal before the first step) stopped the run; `saved_step`
  is the checkpoint written on the way out (None: nothing was saved)."""

  def __init__(self, message: str, saved_step: Optional[int] = None):
    super().__init__(message)
    self.saved_step = saved_step


@dataclasses.dataclass
class TrainState:
  """What the loop carries from step to step."""
  params: Any
  opt_state: Any
  done: int                        # steps completed
  metrics: dict = dataclasses.field(default_factory=dict)
  finite: Any = True               # every step since the last check was finite
  window_loads: Any = None         # per-layer expert load summed since the last log


class _Throughput:
  """Tokens per second between logs (compilation excluded) and the average
  seconds per step since the first step."""

  def __init__(self, start: int):
    self.window_start = self.run_start = None
    self.window_step = self.run_step = start
    self.seconds_per_step = None

  def started(self, done: int, params) -> None:
    if self.window_start is None:
      jax.block_until_ready(params)
      self.window_start = self.run_start = time.perf_counter()
      self.window_step = self.run_step = done

  def measure(self, done: int) -> Optional[float]:
    """Steps per second over the window ending now (None: no step in it)."""
    now = time.perf_counter()
    elapsed = now - self.window_start
    rate = (done - self.window_step) / elapsed if done > self.window_step and elapsed > 0 \
        else None
    if done > self.run_step:
      self.seconds_per_step = (now - self.run_start) / (done - self.run_step)
    self.window_start, self.window_step = time.perf_counter(), done
    return rate


def non_finite(what: str, last_saved: Optional[int]) -> NonFiniteLossError:
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was written")
  return NonFiniteLossError(
      f"{what}; stopping; {kept}. Lower config.train.learning_rate, raise "
      f"config.train.warmup_steps or use config.model.dtype='float32' (to resume from the "
      f"kept checkpoint with another learning rate, add "
      f"--config.train.resume_with_changes=true).")


@dataclasses.dataclass
class Loop:
  """The periodic actions of a run around its compiled steps (see the module
  docstring). `frozen`: a LoRA run's frozen base."""
  config: Any
  run: Any                         # moejax.run.Run
  dataset: Any
  mesh: Any
  graphdef: Any
  tx: Any
  schedule: Any
  checkpointer: Any
  console: Any
  stop: Any
  writer: Any
  config_json: dict
  flops_per_token: float
  frozen: Any = None
  last_saved: Optional[int] = None

  def __post_init__(self):
    config, frozen = self.config, self.frozen
    self.train_step = steps_lib.make_train_step(self.graphdef, self.tx, self.schedule,
                                                config.seed, frozen,
                                                config.train.get("qk_clip_tau", 0.0))
    self.health_check = steps_lib.make_health_check(self.graphdef, config.seed, frozen)
    self.num_domains = self.dataset.info.get("num_domains", 0)  # synthetic_mixture only
    self.evaluator = evaluator_lib.Evaluator(self.graphdef, num_domains=self.num_domains,
                                             frozen=frozen)
    self.tracer = None  # the evaluator that also records (config.train.trace_every)
    if config.train.get("trace_every"):
      self.tracer = evaluator_lib.Evaluator(self.graphdef, num_domains=self.num_domains,
                                            frozen=frozen, trace=True)
    self.moe_layers = model_lib.model_config(config).moe_layers
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.eval_batches = [model_lib.global_batch(b, self.batch_sharding)
                         for b in self.dataset.eval_batches(config.train.eval_batches)]
    self.is_main = jax.process_index() == 0
    self.record: dict[str, float] = {}

  def due(self, done: int, every: int) -> bool:
    return done % every == 0 or done == self.config.train.steps

  def step(self, state: TrainState, local_batch) -> TrainState:
    """One train step on this process's rows of the batch."""
    batch = model_lib.global_batch(local_batch, self.batch_sharding)
    params, opt_state, metrics, finite = self.train_step(
        state.params, state.opt_state, batch, jnp.asarray(state.done, jnp.int32))
    loads = metrics.pop(steps_lib.LOADS_KEY)
    window = loads if state.window_loads is None else state.window_loads + loads
    return TrainState(params, opt_state, state.done + 1, metrics, state.finite & finite,
                      window)

  def after(self, state: TrainState, iterator, throughput: _Throughput) -> TrainState:
    """The periodic actions after a step; returns the state they leave."""
    train, done = self.config.train, state.done
    scalars = {}
    if self.due(done, train.log_every):
      self._check_finite(state)
      scalars.update(self._log_scalars(state, throughput))
      state.window_loads = None
    tracing = self.tracer is not None and done % train.trace_every == 0
    if self.due(done, train.eval_every) or tracing:
      scalars.update(self._eval_scalars(done, state.params, tracing))
    if scalars:
      self.record = self.writer.write(done, scalars)
      if self.due(done, train.log_every):
        self.console.log(done, self.record, throughput.seconds_per_step)
      if "eval/loss" in self.record:
        self.console.eval(done, self.record["eval/loss"])
    if self.due(done, train.checkpoint_every) or self.stop.received:
      self._check_finite(state)
      self._save(state, iterator)
    return state

  def _check_finite(self, state: TrainState) -> None:
    if not bool(state.finite):
      raise non_finite(f"non-finite loss or gradient at or before step {state.done} "
                       f"(train/loss={float(state.metrics['train/loss'])})", self.last_saved)

  def _log_scalars(self, state: TrainState, throughput: _Throughput) -> dict[str, Any]:
    scalars = dict(state.metrics)
    if state.window_loads is not None and self.moe_layers:
      loads = np.asarray(state.window_loads)
      scalars.update({f"train/layer{i}/dead_experts": float(routing_report.dead_experts(load))
                      for i, load in zip(self.moe_layers, loads)})
    jax.block_until_ready(scalars)
    steps_per_sec = throughput.measure(state.done)
    if steps_per_sec is not None:
      tokens_per_sec = steps_per_sec * self.config.train.batch_size * self.config.train.seq_len
      peak = (metrics_lib.peak_flops_per_device(self.config.train.peak_flops_per_device)
              * jax.device_count())
      scalars["perf/tokens_per_sec"] = tokens_per_sec
      scalars["perf/mfu"] = tokens_per_sec * self.flops_per_token / peak
    if self.dataset.entropy_floor is not None:
      scalars["data/entropy_floor"] = self.dataset.entropy_floor
    return scalars

  def _eval_scalars(self, done: int, params, tracing: bool = False) -> dict[str, float]:
    """The evaluator's report, and the per-layer load heatmap (plots/ and
    TensorBoard); with `tracing` also the routing trace (traces/step_<N>/),
    and the report only if an eval is due."""
    result = (self.tracer if tracing else self.evaluator).run(params, self.eval_batches)
    if tracing:
      self._write_trace(done, result)
      if not self.due(done, self.config.train.eval_every):
        return {}
    loads = result["expert_load"]
    if self.moe_layers and np.size(loads) and self.is_main:
      path = self.run.file(f"plots/expert_load_step{done}.png")
      routing_report.save_load_heatmap(path, loads, self.moe_layers, done)
      routing_report.write_heatmap_image(self.run.file("tensorboard/routing"),
                                         "eval/expert_load", path, done)
    return evaluator_lib.layer_report(result, self.moe_layers)

  def _write_trace(self, done: int, result: dict[str, Any]) -> None:
    """traces/step_<done>/ from a tracing evaluation (kept if it exists: a
    resumed run redoing the step records the same routing)."""
    out = self.run.file(f"traces/step_{done}")
    if not self.is_main or os.path.exists(out):
      return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    train = self.config.train
    meta = trace_lib.trace_meta(self.config, step=done, vocab_size=self.dataset.vocab_size,
                                loss=result["loss"], workdir=self.run.path, split="eval",
                                num_batches=train.eval_batches)
    trace_lib.save(trace_lib.from_traces(result["traces"], meta), out)

  def _save(self, state: TrainState, iterator) -> None:
    """Saves the state after a health check on the next step's batch: a state
    whose next step is non-finite, or that is dead (no gradient and a loss no
    better than the unigram entropy), would make every resume fail or learn
    nothing, so it is never saved."""
    done, loss = state.done, float(state.metrics["train/loss"])
    next_batch = model_lib.global_batch(self.dataset.train_batch(done), self.batch_sharding)
    finite, alive = self.health_check(state.params, state.opt_state, next_batch,
                                      jnp.asarray(done, jnp.int32),
                                      _entropy(self.dataset))
    if not bool(finite):
      raise non_finite(f"the state after step {done} (train/loss={loss}) gives a non-finite "
                       f"loss, gradient or parameter at step {done + 1}, so it was not "
                       f"saved", self.last_saved)
    if not bool(alive):
      raise non_finite(f"the state after step {done} (train/loss={loss}) is dead: at step "
                       f"{done + 1} every gradient is exactly zero and the loss is no lower "
                       f"than the data's unigram entropy "
                       f"({float(_entropy(self.dataset)):.4g} nats), so it was not saved",
                       self.last_saved)
    self.checkpointer.save(done, {"params": state.params, "opt_state": state.opt_state},
                           iterator.get_state(), self.config_json)
    self.last_saved = done

  def run_steps(self, state: TrainState, iterator) -> TrainState:
    """Trains from `state.done` to config.train.steps or a stop signal."""
    throughput = _Throughput(state.done)
    self.console.start(start_step=state.done, total_steps=self.config.train.steps)
    self.stop.deferred = True
    with parallel.activate(self.mesh):
      for _ in range(state.done, self.config.train.steps):
        state = self.step(state, next(iterator))
        throughput.started(state.done, state.params)
        self.console.advance()
        state = self.after(state, iterator, throughput)
        if self.stop.received:
          break
    self.checkpointer.wait()
    return state

  def finish(self, done: int) -> dict[str, float]:
    """The run's last record; a SIGINT raises `Interrupted` after its save."""
    train = self.config.train
    tokens = done * train.batch_size * train.seq_len
    if self.stop.received is None:
      self.console.summary(step=done, record=self.record, tokens=tokens,
                           workdir=self.run.workdir, outcome="finished")
      return self.record
    name = signals_lib.NAMES[self.stop.received]
    self.console.summary(step=done, record=self.record, tokens=tokens,
                         workdir=self.run.workdir,
                         outcome=f"stopped by {name} with a checkpoint")
    if self.stop.received == signal.SIGINT:
      raise Interrupted(f"SIGINT: saved a checkpoint at step {done}; run the same command "
                        f"to resume", saved_step=done)
    return self.record


def _entropy(dataset) -> jax.Array:
  """The unigram entropy the health check compares with (-inf: unknown)."""
  value = getattr(dataset, "unigram_entropy", None)
  return jnp.asarray(-np.inf if value is None else value, jnp.float32)
