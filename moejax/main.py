r"""Trains a MoE language model.

    python -m moejax.main --config=configs/default.py --workdir=/tmp/moe \
        [--config.model.moe.router=expert_choice ...]

Running the same command again resumes from the latest checkpoint in
--workdir. Multi-host: on TPU pods and under SLURM `jax.distributed` starts by
itself (`--multihost`, on by default where detected); elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every
process. Exit status: 0 when training finished, was already complete, or was
preempted (SIGTERM: a checkpoint is written first); 130 after Ctrl-C (SIGINT:
a checkpoint is written first; further signals are ignored until the
process exits); 1 for an invalid config, flag or workdir, a
config that differs from the checkpoint's, a workdir held by another run, or a
non-finite loss, with one message naming the problem. orbax/absl INFO lines
are off unless --verbosity is given (--verbosity=0 shows them).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moejax.train import config as config_lib
from moejax.train import lock
from moejax.train import signals
from moejax import train as train_lib

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


parse_flags = config_lib.flags_parser(_CONFIG)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax and absl log at INFO on every save; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  # A second SIGTERM after the stop's checkpoint must not turn exit status 0
  # into death by the signal (-15): signals stay ignored until exit.
  signals.hold_until_exit()
  try:
    initialize_distributed()
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train_lib.Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(train_lib.SIGINT_EXIT_STATUS)
  except KeyboardInterrupt:
    print("stopped: interrupted before the first step; nothing was saved", file=sys.stderr)
    sys.exit(train_lib.SIGINT_EXIT_STATUS)
  except (ValueError, train_lib.NonFiniteLossError, lock.WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
