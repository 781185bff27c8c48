"""Checkpoints with orbax: parameters, optimizer state, data-iterator state and
the config they were written under.

Layout: `workdir/checkpoints/<step>/{state,data,config}`; `state` is the pytree
{params, opt_state} (StandardSave), `data` the iterator state and `config` the
resolved run config (JSON). Orbax writes to a temporary folder and renames it
on completion, so a run killed while saving leaves the previous checkpoint
intact; the temporary folders such a kill leaves behind are removed when the
next run opens the checkpoints (`cleanup_tmp_directories`).

A checkpoint that does not restore (a truncated or deleted file, garbage in a
metadata file, an emptied folder) is moved to `workdir/damaged_checkpoints/`
and the next older one is tried (`restore_newest`); nothing is deleted.
"""

import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from moejax.parallel.rules import key_name

_ITEMS = ("state", "data")           # what a restore needs; `config` is optional
# JSON files a restore reads (with state/array_metadatas/*); orbax fails on a
# damaged one with a bare UnicodeDecodeError, so they are checked first.
_JSON_FILES = (("state", "_METADATA"), ("data", "metadata"))


@dataclasses.dataclass(frozen=True)
class Damaged:
  """A checkpoint that did not restore: its step, why, and where it was moved."""
  step: int
  reason: str
  moved_to: Optional[str]


class IncompatibleCheckpointError(ValueError):
  """A checkpoint holds parameters of other shapes than the model being built."""

  def __init__(self, step: int, mismatched: list[str]):
    shown = "; ".join(mismatched[:3]) + (f"; and {len(mismatched) - 3} more"
                                         if len(mismatched) > 3 else "")
    super().__init__(f"checkpoint step {step} holds other parameter shapes than this "
                     f"config's model ({shown})")
    self.step = step
    self.mismatched = mismatched


class Checkpointer:
  """Saves and restores training state; keeps the `keep` newest checkpoints."""

  def __init__(self, workdir: str, *, keep: int, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def steps(self) -> list[int]:
    """Steps of the checkpoint folders on disk (damaged ones too), oldest first."""
    return list_steps(self.workdir)

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: dict, config_json: dict) -> None:
    """Starts an asynchronous save of `step` (`wait` blocks until it is on disk)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into the structure (and shardings) of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the parameters of step `step` (no optimizer state is read)
    into the structure and shardings of `abstract_params`."""
    mismatched = [line for line in self.mismatched_shapes(step, {"params": abstract_params})
                  if line.startswith("params")]
    if mismatched:
      raise IncompatibleCheckpointError(step, mismatched)
    item = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                       dtype=x.dtype), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(
          os.path.join(self._step_dir(step), "state"),
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True))
    return restored["params"]

  def mismatched_shapes(self, step: int, abstract_state: Any) -> list[str]:
    """Leaves whose shape in checkpoint `step` differs from `abstract_state`,
    as 'path: [saved] vs [now]' (or a missing/extra path); [] when they agree."""
    saved = self._manager.item_metadata(step)["state"]
    saved_leaves = _shapes_by_path(saved)
    now_leaves = _shapes_by_path(abstract_state)
    problems = []
    for path in sorted(set(saved_leaves) | set(now_leaves),
                       key=lambda path: (not path.startswith("params"), path)):
      if path not in now_leaves:
        problems.append(f"{path}: in the checkpoint, not in this model")
      elif path not in saved_leaves:
        problems.append(f"{path}: in this model, not in the checkpoint")
      elif saved_leaves[path] != now_leaves[path]:
        problems.append(f"{path}: {list(saved_leaves[path])} saved, "
                        f"{list(now_leaves[path])} now")
    return problems

  def restore_newest(self, abstract_state: Any, *, is_main: bool = True
                     ) -> tuple[Optional[int], Any, Optional[dict], list[Damaged]]:
    """Restores the newest checkpoint that restores.

    Each newer one that is damaged is moved aside (by process 0) to
    `workdir/damaged_checkpoints/<step>` and reported. A checkpoint that reads
    but holds other shapes than `abstract_state` is not damaged: it raises
    `IncompatibleCheckpointError` and nothing is moved.

    Returns:
      (step, state, data_state, damaged): step, state and data_state are None
      when no checkpoint restores.
    """
    damaged = []
    for step in reversed(self.steps()):
      step_dir = self._step_dir(step)
      reason = check_files(step_dir)
      if reason is None:
        try:
          mismatched = self.mismatched_shapes(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          reason = describe_restore_error(e, step_dir)
        else:
          if mismatched:
            raise IncompatibleCheckpointError(step, mismatched)
      if reason is None:
        try:
          state, data_state = self.restore(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          reason = describe_restore_error(e, step_dir)
        else:
          return step, state, data_state, damaged
      damaged.append(Damaged(step, reason, self._move_aside(step) if is_main else None))
    return None, None, None, damaged

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _move_aside(self, step: int) -> str:
    target_dir = os.path.join(self.workdir, "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    target, suffix = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, suffix = os.path.join(target_dir, f"{step}.{suffix}"), suffix + 1
    os.rename(self._step_dir(step), target)
    self._manager.reload()
    return target

  def reload(self) -> None:
    """Re-reads the steps on disk (after another process moved one aside)."""
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/embed/embedding': shape, ...}; dict keys, sequence indices and
  attribute names alike (orbax's metadata stores named tuples as lists)."""
  return {"/".join(key_name(entry) for entry in path if key_name(entry) != "value"):
          tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def list_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir` (read-only), oldest first."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def read_config(workdir: str, step: int) -> Optional[dict]:
  """The config checkpoint `step` was written under (read-only); None when it
  has none (older moejax) or it cannot be read."""
  path = os.path.join(workdir, "checkpoints", str(step), "config", "metadata")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def check_files(step_dir: str) -> Optional[str]:
  """Why the checkpoint folder `step_dir` cannot restore, found without orbax
  (a missing item folder, or garbage in a metadata file that orbax would fail
  on naming no file), or None."""
  for item in _ITEMS:
    if not os.path.isdir(os.path.join(step_dir, item)):
      return f"{item}/ is missing"
  array_metadatas = os.path.join(step_dir, "state", "array_metadatas")
  paths = [os.path.join(step_dir, *relative) for relative in _JSON_FILES]
  if os.path.isdir(array_metadatas):
    paths += [os.path.join(array_metadatas, name) for name in sorted(os.listdir(array_metadatas))]
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except FileNotFoundError:
      continue  # orbax decides (other versions may name their files otherwise)
    except (UnicodeDecodeError, ValueError) as e:
      return f"{os.path.relpath(path, step_dir)} is not valid JSON ({e})"
    except OSError as e:
      return f"{os.path.relpath(path, step_dir)} cannot be read ({e.strerror})"
  return None


def describe_restore_error(error: BaseException, step_dir: str) -> str:
  """One line naming what orbax/TensorStore could not read."""
  messages = []
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    messages.append(str(error))
    error = error.__cause__ or error.__context__
  for message in messages:
    array = re.search(r'Error reading "([^"]+)"', message)
    if array:
      array_name = array.group(1).split("/")[0]
      local = re.findall(r'local file "([^"]+)"', message)
      files = [os.path.relpath(path, step_dir) for path in local if path.startswith(step_dir)]
      where = f" ({files[-1]})" if files else ""
      return f"array {array_name} cannot be read{where}"
  first = messages[-1].strip().splitlines()[0] if messages else "unknown error"
  return first[:300]
