"""`python -m moejax.hf import|export`: Hugging Face checkpoints <-> moejax workdirs.

    python -m moejax.hf import --hf_dir=DIR --workdir=DIR [--config=FILE] [--config.KEY=V]
        [--dtype=float32|bfloat16]
    python -m moejax.hf export --workdir=DIR --out=DIR [--family=NAME] [--step=N]

See `moejax.hf.workdirs` for what each writes. Bad input is one "error: ..."
line and exit status 1 (2 for a missing verb or flag), before anything is
written.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax import hf
from moejax import run as run_lib
from moejax.hf import workdirs
from moejax.train import checkpoints
from moejax.train import config as config_lib

VERBS = ("import", "export")


def _define_flags() -> dict:
  """The CLI's flags, defined only when this module is the program."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "import: a run config whose data/train/mesh sections the workdir "
          "gets (default: the default config).", lock_config=False),
      "hf_dir": flags.DEFINE_string("hf_dir", None, "import: the Hugging Face checkpoint "
                                    "folder."),
      "workdir": flags.DEFINE_string("workdir", None, "import: the new run directory; "
                                     "export: the run to export."),
      "out": flags.DEFINE_string("out", None, "export: the new checkpoint folder."),
      "family": flags.DEFINE_string("family", None, "export: a model_type among "
                                    f"{', '.join(sorted(hf.FAMILIES))} (default: the "
                                    "imported one, else the one the model matches)."),
      "step": flags.DEFINE_integer("step", None, "export: the checkpoint step (default: "
                                   "newest)."),
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "import: parameter "
                                 "and compute dtype (default: the checkpoint's)."),
  }


def main(argv, cli: dict) -> None:
  if len(argv) != 2 or argv[1] not in VERBS:
    print(f"error: give one verb, {' or '.join(VERBS)} (got {argv[1:]})", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  verb = argv[1]
  required = {"import": ("hf_dir", "workdir"), "export": ("workdir", "out")}[verb]
  missing = [f"--{name}" for name in required if not cli[name].value]
  if missing:
    print(f"error: {verb} needs {' and '.join(missing)}", file=sys.stderr)
    sys.exit(2)
  try:
    if verb == "import":
      summary = workdirs.import_checkpoint(cli["hf_dir"].value, cli["workdir"].value,
                                           cli["config"].value, cli["dtype"].value)
      print(f"Imported {summary['model_type']} ({summary['parameters']:,} parameters, "
            f"vocabulary {summary['vocab_size']:,}) into {summary['workdir']} "
            f"(checkpoints/0)")
    else:
      files = workdirs.export_run(cli["workdir"].value, cli["out"].value,
                                  cli["family"].value, cli["step"].value)
      print(f"Exported {cli['workdir'].value} to {cli['out'].value}: {', '.join(files)}")
  except (ValueError, run_lib.RunError, checkpoints.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI), flags_parser=config_lib.flags_parser(_CLI["config"]))
