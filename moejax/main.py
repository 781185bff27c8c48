r"""Trains a MoE language model.

    python -m moejax.main --config=configs/default.py --workdir=/tmp/moe \
        [--config.model.moe.router=expert_choice ...]

Running the same command again resumes from the latest checkpoint in
--workdir. Multi-host: on TPU pods and under SLURM `jax.distributed` starts by
itself (`--multihost`, on by default where detected); elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every
process. Exit status: 0 when training finished or was preempted (SIGTERM,
after writing a checkpoint); 1 for an invalid config or a non-finite loss,
with one message naming the problem.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from moejax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override keys with --config.<key>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, "
                               "summary.json, TensorBoard events.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for jax.distributed (multi-process "
    "runs outside TPU pods and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Start jax.distributed with auto-detection (TPU pods, SLURM). "
    "Default: on when SLURM_NTASKS > 1 or TPU_WORKER_HOSTNAMES names several hosts.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "gloo", "Cross-process collectives on the CPU backend (gloo or mpi).")
flags.mark_flags_as_required(["config", "workdir"])


def _detected_multihost() -> bool:
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm_tasks > 1 or "," in tpu_hosts


def initialize_distributed() -> None:
  """Starts jax.distributed when the flags or the environment ask for it."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    return
  multihost = _MULTIHOST.value if _MULTIHOST.value is not None else _detected_multihost()
  if multihost:
    jax.distributed.initialize()  # auto-detects TPU pods and SLURM


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with one-line errors for bad --config overrides
  (ml_collections raises AttributeError/KeyError for an unknown key)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    key = str(e).strip("\"'")
    culprits = [arg for arg in argv[1:] if arg.startswith("--config.") and key in arg]
    where = culprits[0].split("=")[0] if culprits else "a --config override"
    print(f"error: {where}: unknown config key or bad value ({e}); every key is listed "
          "in the README config table", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    initialize_distributed()
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
