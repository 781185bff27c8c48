"""The resume guard: a restart trains what its checkpoints were trained on.

Every checkpoint carries the resolved config it was written under. A restart
compares the config it was given with that one, key by key. Keys that only say
how long to run, how often to log, evaluate or save, how many checkpoints to
keep, how to lay the run over devices, or which peak FLOP/s to report may
change (`RESUMABLE_KEYS`); any other difference changes what is trained, and
the run stops before writing anything (`ConfigChangedError`) unless
`config.train.resume_with_changes` is set. Every difference accepted on a
resume is appended to `workdir/config_changes.jsonl`.
"""

import dataclasses
import datetime
import fnmatch
import json
import os
from typing import Any, Optional

import ml_collections

from moejax.train import config as config_lib

RESUMABLE_KEYS = (
    "config.train.steps", "config.train.log_every", "config.train.eval_every",
    "config.train.checkpoint_every", "config.train.keep_checkpoints",
    "config.train.peak_flops_per_device", "config.train.resume_with_changes", "config.mesh.*",
    "config.train.trace_every",
    # Recomputing activations changes no number; the grouped-matmul kernels
    # compute the same products (to float rounding) on another backend.
    "config.model.remat", "config.model.moe.grouped_matmul",
    # Read only when a run starts without checkpoints (sparse upcycling).
    "config.init.*",
)
# Keys that change the layout of the checkpointed arrays: refused even with
# resume_with_changes (the restore could not read the checkpoint).
LAYOUT_KEYS = ("config.model.scan_layers", "config.train.optimizer")
CHANGES_FILE = "config_changes.jsonl"
_ABSENT = "<absent>"


class ConfigChangedError(ValueError):
  """The config differs from the checkpoint's in keys that change training."""


@dataclasses.dataclass(frozen=True)
class Change:
  key: str
  saved: Any
  given: Any

  @property
  def resumable(self) -> bool:
    return any(fnmatch.fnmatchcase(self.key, pattern) for pattern in RESUMABLE_KEYS)


def to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (what a checkpoint records)."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = "config") -> dict[str, Any]:
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}.{name}"))
    else:
      flat[f"{prefix}.{name}"] = value
  return flat


def differences(saved: dict, config: ml_collections.ConfigDict) -> list[Change]:
  """Keys whose value differs between the recorded config `saved` (JSON) and
  `config`. A key missing from `saved` (recorded by an older moejax) counts as
  its default, so a new key at its default is no change."""
  given = _flatten(to_json(config))
  recorded = _flatten(saved)
  defaults = _flatten(to_json(config_lib.default_config()))
  # The schedule's length is schedule_steps, None = steps: the first 8 steps
  # of a 12-step schedule extended to the whole 12-step run is no change.
  # (With None on both sides, a longer `steps` stretches the cosine from the
  # resume on; `steps` is a resumable key.)
  key = "config.train.schedule_steps"
  if (recorded.get(key) is None) != (given.get(key) is None):
    for flat in (recorded, given):
      if flat.get(key) is None:
        flat[key] = flat.get("config.train.steps")
  changes = []
  for key in sorted(set(given) | set(recorded)):
    old = recorded.get(key, defaults.get(key, _ABSENT))
    new = given.get(key, _ABSENT)
    if old != new:
      changes.append(Change(key, old, new))
  return changes


def check(saved: Optional[dict], config: ml_collections.ConfigDict, *, step: int,
          workdir: str) -> list[Change]:
  """The accepted differences; raises ConfigChangedError for the others."""
  if saved is None:
    return []
  changes = differences(saved, config)
  for c in changes:
    if c.key == "config.train.optimizer":
      raise ConfigChangedError(
          f"checkpoint step {step} in {workdir} holds the optimizer state of "
          f"train.optimizer={c.saved!r} and this config asks for {c.given!r}; resume with "
          f"--config.train.optimizer={c.saved!r}, or start a new --workdir")
    if c.key in LAYOUT_KEYS:
      layout = {True: "scanned layers", False: "unscanned layers"}
      raise ConfigChangedError(
          f"checkpoint step {step} in {workdir} holds {layout.get(c.saved, c.saved)} "
          f"({c.key.removeprefix('config.')}={c.saved!r}) and this config asks for "
          f"{layout.get(c.given, c.given)} ({c.given!r}); resume with "
          f"--{c.key}={c.saved!r} (the checkpoint's layout), or start a new --workdir. "
          f"moejax.nn.transformer.convert_layout maps parameters between the layouts.")
  blocking = [c for c in changes if not c.resumable]
  if blocking and not config.train.resume_with_changes:
    lines = "\n".join(f"  {c.key}: {c.saved!r} in the checkpoint, {c.given!r} now"
                      for c in blocking)
    raise ConfigChangedError(
        f"the config differs from the one checkpoint step {step} in {workdir} was trained "
        f"with:\n{lines}\nTo start fresh, use a new --workdir (or move its checkpoints/ "
        f"away); to resume from step {step} with these changes anyway, add "
        f"--config.train.resume_with_changes=true (recorded in {CHANGES_FILE}).")
  return changes


def record(workdir: str, changes: list[Change], *, step: int) -> None:
  """Appends the accepted changes of a resume to `workdir/config_changes.jsonl`."""
  if not changes:
    return
  entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "resumed_from_step": step,
           "changes": {c.key: {"checkpoint": c.saved, "now": c.given} for c in changes},
           "outside_resumable_keys": [c.key for c in changes if not c.resumable]}
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps(entry) + "\n")


def summary_line(changes: list[Change]) -> str:
  return ", ".join(f"{c.key.removeprefix('config.')} {c.saved!r} -> {c.given!r}"
                   for c in changes)
