r"""Trains a MoE language model.

    python -m moejax.main --config=configs/default.py --workdir=/tmp/moe \
        [--config.model.moe.router=expert_choice ...]

Running the same command again resumes from the latest checkpoint in
--workdir. Exit status: 0 when training finished or was preempted (SIGTERM,
after writing a checkpoint); 1 for an invalid config or a non-finite loss,
with one message naming the problem.
"""

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
flags.mark_flags_as_required(["config", "workdir"])


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
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
