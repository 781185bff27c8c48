"""Checkpoints with orbax: parameters, optimizer state and data-iterator state.

Layout: `workdir/checkpoints/<step>/{state,data}`; `state` is the pytree
{params, opt_state} (StandardSave), `data` the iterator state (JSON). Orbax
writes to a temporary directory and renames on completion, so a run killed
while saving leaves the previous checkpoint intact.
"""

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores training state; keeps the `keep` newest checkpoints."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into the structure (and shardings) of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
