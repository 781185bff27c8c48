"""Training: config, optimizer, checkpoints, metrics, the evaluator and the loop.

The training job is this package's API (the CLI is `python -m moejax.main`):

    from moejax import train
    train.train_and_evaluate(config, workdir)   # see moejax/train/trainer.py

and its outcomes `train.Interrupted`, `train.NonFiniteLossError`,
`train.WorkdirError` and `train.SIGINT_EXIT_STATUS`. Tools after training
read runs through `moejax.run` and build models through `moejax.model`, not
through the trainer.
"""

_API = ("train_and_evaluate", "Interrupted", "NonFiniteLossError", "WorkdirError",
        "SIGINT_EXIT_STATUS")


def __getattr__(name: str):
  # Loaded on first use: importing a submodule (config, checkpoints) must not
  # load the whole training job.
  if name in _API:
    from moejax.train import trainer  # pylint: disable=import-outside-toplevel
    return getattr(trainer, name)
  raise AttributeError(f"module 'moejax.train' has no attribute {name!r}")
