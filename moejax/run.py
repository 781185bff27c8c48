"""A run directory and its one owner, `Run`.

    run = Run(workdir)
    run.steps                      # checkpoint steps on disk, oldest first
    step, config = run.newest()    # the newest step and the config it was trained with
    run.read_json("summary.json"); run.write_json("summary.json", {...})  # atomic
    run.metrics()                  # the records of metrics.jsonl
    step, graphdef, params = run.restore_params(config, vocab_size, mesh)

Layout of a workdir (written by `moejax.train`): `checkpoints/<step>/` (orbax:
state, data-iterator state, the config of the step), `metrics.jsonl`,
`config.json`, `summary.json`, `plots/`, `tensorboard/`, `run.lock`, and the
records of how the run began (`upcycled_from.json`, `finetuned_from.json`,
`config_changes.jsonl`).

Readers never write into a run: a damaged checkpoint, or one that a live run
rotates away while it is read, is skipped (named in a warning) and the next
older one is read, as the training resume does (which also moves damaged ones
aside, `checkpoints.Checkpointer.restore_newest`). Every JSON record is
written whole or not at all (`write_json`).
"""

import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import jax
import ml_collections
from flax import nnx

from moejax import data as data_lib
from moejax import model as model_lib
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import lora
from moejax.train import metrics as metrics_lib

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


class RunError(ValueError):
  """A run directory cannot be read as asked; the message names the file."""


def write_json(path: str, value: Any, *, indent: Optional[int] = 2,
               default: Optional[Callable[[Any], Any]] = None) -> None:
  """Writes `value` as JSON to `path` whole or not at all (a temporary file in
  the same folder, then an atomic rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=indent, default=default)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str, *, what: str = "") -> Any:
  """The JSON in `path`; RunError naming the file when it is missing or garbage."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise RunError(f"{path} does not exist{what}") from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise RunError(f"{path} is not readable JSON ({e}){what}") from None


def check_output_path(path: Optional[str]) -> None:
  """ValueError unless `path` can be written (checked before any work, so a
  bad --out never throws a result away)."""
  if not path:
    return
  if os.path.isdir(path):
    raise ValueError(f"--out={path} is a directory; give a file path")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"--out={path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"--out={path}: the folder {folder} is not writable")


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr)


class Run:
  """The run directory `workdir`: its checkpoints, configs and records."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.abspath(workdir)

  def __repr__(self) -> str:
    return f"Run({self.workdir!r})"

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def exists(self) -> bool:
    return os.path.isdir(self.path)

  @property
  def steps(self) -> list[int]:
    """Steps of the checkpoint folders on disk (damaged ones too), oldest first."""
    return checkpoints.list_steps(self.path)

  @property
  def newest_step(self) -> Optional[int]:
    steps = self.steps
    return steps[-1] if steps else None

  def checkpoint_dir(self, step: int) -> str:
    return os.path.join(self.path, "checkpoints", str(step))

  def damage(self, step: int) -> Optional[str]:
    """Why checkpoint `step` cannot be read (found without orbax), or None."""
    return checkpoints.check_files(self.checkpoint_dir(step))

  def recorded_config(self, step: Optional[int] = None
                      ) -> tuple[Optional[dict], Optional[int]]:
    """(config dict, step) of checkpoint `step`, or of the newest checkpoint
    that records one; runs of older moejax versions: the workdir's
    config.json. (None, None) when there is none."""
    steps = self.steps if step is None else [step]
    for s in reversed(steps):
      recorded = checkpoints.read_config(self.path, s)
      if recorded is not None:
        return recorded, s
    if steps and os.path.exists(self.file(CONFIG_FILE)):
      return read_json(self.file(CONFIG_FILE)), steps[-1]
    return None, None

  def config(self, step: Optional[int] = None) -> ml_collections.ConfigDict:
    """The config checkpoint `step` (default: the newest) was trained with."""
    recorded, _ = self.recorded_config(step)
    if recorded is None:
      where = f"checkpoint {step}" if step is not None else "its checkpoints"
      raise RunError(f"{self.workdir}: {where} record no config and there is no "
                     f"{CONFIG_FILE}")
    if not isinstance(recorded, dict):
      raise RunError(f"{self.file(CONFIG_FILE)} does not hold a config (a JSON object)")
    # Laid over the defaults: keys the run's moejax predates take them.
    return config_lib.from_json(recorded)

  def newest(self) -> tuple[int, ml_collections.ConfigDict]:
    """(newest step, its config) of a finished or running run; RunError when
    the folder is missing or holds no checkpoint."""
    if not self.exists():
      raise RunError(f"--workdir={self.workdir} is not a directory")
    if not self.steps:
      raise RunError(f"{self.workdir} holds no checkpoint (checkpoints/<step>/)")
    return self.newest_step, self.config()  # the newest config recorded

  def read_json(self, name: str, default: Any = None) -> Any:
    """The record `name` of the run, or `default` when it does not exist;
    RunError naming the file when it is garbage."""
    if not os.path.exists(self.file(name)):
      return default
    return read_json(self.file(name))

  def write_json(self, name: str, value: Any) -> None:
    """Writes the record `name` atomically (process 0 only)."""
    if jax.process_index() == 0:
      write_json(self.file(name), value)

  def metrics(self) -> list[dict]:
    """The records of metrics.jsonl, in order (unreadable lines skipped)."""
    return metrics_lib.read_records(self.file(METRICS_FILE))

  def series(self, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the metric `name` over the run."""
    pairs = [(r["step"], r[name]) for r in self.metrics() if name in r and "step" in r]
    return [s for s, _ in pairs], [v for _, v in pairs]

  def summary(self) -> dict[str, Any]:
    return self.read_json(SUMMARY_FILE, {})

  def dataset(self, config: ml_collections.ConfigDict):
    """The run's data (its eval batches and tokenizer) for a tool that reads
    the run. Tokenized caches go to $MOEJAX_DATA_CACHE (default: a folder in
    the system's temp dir), never into the run: a read-only copy of a run
    evaluates, and a tool killed while tokenizing leaves nothing in it."""
    cache = os.environ.get("MOEJAX_DATA_CACHE") or os.path.join(
        tempfile.gettempdir(), "moejax_data_cache")
    return data_lib.make_dataset(
        config.data, seq_len=config.train.seq_len,
        global_batch_size=config.train.batch_size, seed=config.seed, cache_dir=cache)

  def readable_steps(self, step: Optional[int] = None) -> list[int]:
    """Checkpoint steps to try, newest first: `step` alone when given."""
    if step is not None:
      if step not in self.steps:
        raise RunError(f"{self.workdir} has no checkpoint {step} (it has {self.steps})")
      return [step]
    return list(reversed(self.steps))

  def read_newest(self, read: Callable[[int], Any], step: Optional[int] = None
                  ) -> tuple[int, Any]:
    """(step, read(step)) for the newest checkpoint that reads. A damaged one,
    or one deleted while it is read (a live run rotating its checkpoints), is
    named in a warning and the next older one is tried; nothing is moved.
    Incompatible shapes (`checkpoints.IncompatibleCheckpointError`) are not
    damage and propagate."""
    reasons = []
    for s in self.readable_steps(step):
      reason = self.damage(s)
      if reason is None:
        try:
          return s, read(s)
        except checkpoints.IncompatibleCheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          if not os.path.isdir(self.checkpoint_dir(s)):
            reason = "it was deleted while being read (a live run rotating its checkpoints)"
          else:
            reason = checkpoints.describe_restore_error(e, self.checkpoint_dir(s))
      reasons.append(f"checkpoint {s}: {reason}")
      _warn(f"{self.checkpoint_dir(s)} cannot be read ({reason}); trying an older one")
    raise RunError(f"{self.workdir}: no checkpoint can be read ("
                   + "; ".join(reasons) + ")")

  def restore_params(self, config: ml_collections.ConfigDict, vocab_size: int,
                     mesh: jax.sharding.Mesh, *, step: Optional[int] = None):
    """(step, graphdef, parameters) of the newest readable checkpoint (or
    `step`), placed in the shardings of `mesh` (any mesh and process count:
    orbax reshards). No optimizer state is read. Call under
    `parallel.activate(mesh)`. A LoRA run gives its base (restored from the
    base run it records) with the checkpoint's adapters. Shapes that do not
    fit `config` raise `checkpoints.IncompatibleCheckpointError`."""
    if lora.enabled(config):
      graphdef, adapters, frozen, _ = lora_model(self, config, vocab_size, mesh)
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), adapters)
      step, adapters = self.read_newest(lambda s: self._read_params(s, target), step)
      return step, graphdef, nnx.merge_state(adapters, frozen)
    graphdef, target = model_lib.restore_target(config, vocab_size, mesh)
    step, params = self.read_newest(lambda s: self._read_params(s, target), step)
    return step, graphdef, params

  def _read_params(self, step: int, target):
    reader = checkpoints.Checkpointer(self.path, keep=1, read_only=True)
    try:
      return reader.restore_params(step, target)
    finally:
      reader.close()


def lora_model(run: Run, config: ml_collections.ConfigDict, vocab_size: int, mesh):
  """(graphdef, fresh adapters, frozen base, record) of the LoRA run `run`
  (or a new one): the base `Run` it records, restored at the recorded step
  (in the base's layout, mapped to this run's), quantized where QLoRA asks,
  with adapters added. Call under `parallel.activate(mesh)`."""
  base_dir, step, base_config = lora.base_run(config, run.path)
  lora.check_base(base_config, config)
  restore_config = config.copy_and_resolve_references()
  restore_config.model.scan_layers = bool(base_config.model.scan_layers)
  restore_config.finetune.lora.rank = 0  # the base itself
  try:
    _, graphdef, params = Run(base_dir).restore_params(restore_config, vocab_size, mesh,
                                                       step=step)
  except checkpoints.IncompatibleCheckpointError as e:
    raise ValueError(f"config.finetune.base={base_dir!r}: {e} (was it trained on another "
                     f"vocabulary? config.data must give the base's)") from None
  graphdef, adapters, frozen = lora.attach(config, vocab_size, mesh, graphdef, params,
                                           scanned=restore_config.model.scan_layers)
  return graphdef, adapters, frozen, lora.describe(config, base_dir, step, adapters)
