"""Training and evaluation of the MoE language model on one host.

`train_and_evaluate(config, workdir)` is the whole job: validate the config,
build data and model, restore the latest checkpoint if there is one, train
with periodic logging, evaluation and checkpoints, and stop cleanly on SIGTERM
(checkpoint, exit 0) or on a non-finite loss (error, last good checkpoint
kept). Everything a step computes (batch, learning rate, router noise) is a
function of the step number only, so a resumed run continues exactly as an
uninterrupted one.
"""

import functools
import json
import os
import signal
import sys
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from moejax import data as data_lib
from moejax import parallel
from moejax.nn import TransformerLM
from moejax.scaling import accounting
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import metrics as metrics_lib
from moejax.train import optim

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient."""


def model_kwargs(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """The architecture keywords shared by `TransformerLM` and the accounting."""
  model = config.model
  head_dim = model.head_dim or model.d_model // model.num_heads
  return dict(vocab_size=vocab_size, num_layers=model.num_layers, d_model=model.d_model,
              num_heads=model.num_heads, head_dim=head_dim, moe=model.moe.to_dict(),
              moe_every=model.moe_every, first_dense_layers=model.first_dense_layers,
              tie_embeddings=model.tie_embeddings)


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                rngs: nnx.Rngs) -> TransformerLM:
  """The LM a config describes. Invalid model keys raise ValueError naming them."""
  try:
    return TransformerLM(rope_base=config.model.rope_base,
                         dtype=_DTYPES[config.model.dtype], rngs=rngs,
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
  routed = moe.router != "dense"
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
  opt_state = jax.jit(tx.init)(params)
  return graphdef, params, opt_state


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch mesh axes."""
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies (nats) and the sum of weights."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _scalar_aux(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  zero = jnp.zeros((), jnp.float32)
  return {"train/aux_loss": aux.get("aux_loss", zero),
          "train/z_loss": aux.get("z_loss", zero),
          "train/dropped_fraction": aux.get("dropped_fraction", zero),
          "train/expert_load_max_over_mean": aux.get("load_max_over_mean", zero),
          "train/router_entropy": aux.get("router_entropy", zero)}


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int):
  """A jitted (params, opt_state, batch, step) -> (params, opt_state, metrics, finite)."""
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, step):
    # Router noise depends on the step only (exact resume).
    rng = jax.random.fold_in(base_key, step)

    def loss_fn(params):
      logits, aux = nnx.merge(graphdef, params)(batch["inputs"], deterministic=False,
                                                rng=rng)
      total_ce, count = cross_entropy(logits, batch["targets"], batch["weights"])
      ce = total_ce / jnp.maximum(count, 1.0)
      return ce + aux["weighted_loss"], (ce, aux)

    (total, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"train/loss": ce, "train/total_loss": total, "train/grad_norm": grad_norm,
               "train/learning_rate": schedule(step), **_scalar_aux(aux)}
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    return params, opt_state, metrics, finite

  return train_step


def make_eval_step(graphdef):
  @jax.jit
  def eval_step(params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["inputs"])
    return cross_entropy(logits, batch["targets"], batch["weights"])
  return eval_step


def evaluate(eval_step, params, batches) -> float:
  """Mean cross-entropy (nats per target token) over the held-out batches."""
  total, count = 0.0, 0.0
  for batch in batches:
    batch_total, batch_count = eval_step(params, batch)
    total += float(batch_total)
    count += float(batch_count)
  return total / max(count, 1.0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _summary(config, dataset, vocab_size: int) -> dict[str, Any]:
  kwargs = model_kwargs(config, vocab_size)
  counts = accounting.param_counts(**kwargs)
  flops = accounting.train_flops_per_token(**kwargs, seq_len=config.train.seq_len)
  return {"params": counts, "train_flops_per_token": flops,
          "data": dataset.info, "data/entropy_floor": dataset.entropy_floor,
          "data/unigram_entropy": dataset.unigram_entropy,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__}


def _check_finite(ok: jax.Array, step: int, last_saved: Optional[int],
                  metrics: Optional[dict]) -> None:
  if bool(ok):
    return
  loss = None if metrics is None else float(metrics["train/loss"])
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was written")
  raise NonFiniteLossError(
      f"non-finite loss or gradient at or before step {step} (train/loss={loss}); "
      f"stopping; {kept}. Lower config.train.learning_rate, raise "
      f"config.train.warmup_steps or use config.model.dtype='float32'.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  Raises:
    ValueError: invalid config (before anything is written or compiled).
    NonFiniteLossError: the loss became non-finite (no checkpoint is written
      after the last finite one).
  """
  config_lib.validate_config(config)
  train = config.train
  process_index, process_count = jax.process_index(), jax.process_count()
  if train.batch_size % process_count:
    raise ValueError(f"config.train.batch_size={train.batch_size} is not divisible by the "
                     f"{process_count} processes")
  dataset = data_lib.make_dataset(
      config.data, seq_len=train.seq_len, global_batch_size=train.batch_size,
      seed=config.seed, process_index=process_index, process_count=process_count,
      cache_dir=os.path.join(workdir, "data_cache"))
  vocab_size = dataset.vocab_size
  check_model_config(config, vocab_size)
  mesh = make_mesh(config)

  is_main = process_index == 0
  os.makedirs(workdir, exist_ok=True)
  tx = optim.make_optimizer(train)
  schedule = optim.learning_rate_schedule(train)
  with parallel.activate(mesh):
    graphdef, params, opt_state = init_state(config, vocab_size, mesh, tx)

  checkpointer = checkpoints.Checkpointer(workdir, keep=train.keep_checkpoints)
  iterator = dataset.train_iterator()
  start = checkpointer.latest_step() or 0
  if start:
    # The abstract target carries this run's shardings: a checkpoint written
    # under another mesh (or process count) is resharded on restore.
    abstract = jax.tree.map(_abstract, {"params": params, "opt_state": opt_state})
    state, data_state = checkpointer.restore(start, abstract)
    params, opt_state = state["params"], state["opt_state"]
    iterator.set_state(data_state)
    logging.info("Resumed from step %d in %s", start, checkpointer.directory)

  summary = _summary(config, dataset, vocab_size)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    counts = summary["params"]
    logging.info("Parameters: total %s, active per token %s, embedding %s, "
                 "non-embedding %s; training FLOPs per token %.3g",
                 f"{counts['total']:,}", f"{counts['active_per_token']:,}",
                 f"{counts['embedding']:,}", f"{counts['non_embedding']:,}",
                 summary["train_flops_per_token"])

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start)
  train_step = make_train_step(graphdef, tx, schedule, config.seed)
  eval_step = make_eval_step(graphdef)
  batch_sharding = parallel.batch_sharding(mesh)
  eval_batches = [global_batch(b, batch_sharding)
                  for b in dataset.eval_batches(train.eval_batches)]
  tokens_per_step = train.batch_size * train.seq_len
  peak = metrics_lib.peak_flops_per_device(train.peak_flops_per_device) * jax.device_count()
  flops_per_token = summary["train_flops_per_token"]

  progress = tqdm.tqdm(total=train.steps, initial=start, unit="step", dynamic_ncols=True,
                       disable=not (is_main and sys.stderr.isatty()))
  ok = jnp.array(True)
  last_saved = start or None
  record: dict[str, float] = {}
  timer_start, timer_step = None, start
  with _Preemption() as preemption, parallel.activate(mesh):
    for step in range(start, train.steps):
      batch = global_batch(next(iterator), batch_sharding)
      params, opt_state, metrics, finite = train_step(params, opt_state, batch,
                                                      jnp.asarray(step, jnp.int32))
      ok = ok & finite
      done = step + 1
      if timer_start is None:  # exclude compilation from throughput
        jax.block_until_ready(params)
        timer_start, timer_step = time.perf_counter(), done
      last = done == train.steps
      progress.update(1)

      if done % train.log_every == 0 or last:
        _check_finite(ok, done, last_saved, metrics)
        scalars = dict(metrics)
        jax.block_until_ready(scalars)
        elapsed = time.perf_counter() - timer_start
        if done > timer_step and elapsed > 0:
          tokens_per_sec = (done - timer_step) * tokens_per_step / elapsed
          scalars["perf/tokens_per_sec"] = tokens_per_sec
          scalars["perf/mfu"] = tokens_per_sec * flops_per_token / peak
        timer_start, timer_step = time.perf_counter(), done
        if dataset.entropy_floor is not None:
          scalars["data/entropy_floor"] = dataset.entropy_floor
        if done % train.eval_every == 0 or last:
          scalars["eval/loss"] = evaluate(eval_step, params, eval_batches)
        record = writer.write(done, scalars)
        progress.set_postfix(loss=f"{record['train/loss']:.3f}",
                             tok_s=f"{record.get('perf/tokens_per_sec', 0):.0f}")
      elif done % train.eval_every == 0:
        record = writer.write(done, {"eval/loss": evaluate(eval_step, params, eval_batches)})

      if done % train.checkpoint_every == 0 or last or preemption.requested:
        _check_finite(ok, done, last_saved, metrics)
        checkpointer.save(done, {"params": params, "opt_state": opt_state},
                          iterator.get_state(), force=True)
        last_saved = done
      if preemption.requested:
        checkpointer.wait()
        logging.warning("SIGTERM: saved a checkpoint at step %d; exiting", done)
        break
  progress.close()
  checkpointer.close()
  writer.close()
  return record


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
