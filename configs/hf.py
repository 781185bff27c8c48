"""The run config recorded in a workdir, e.g. one `python -m moejax.hf import`
wrote: fine-tune, upcycle or keep training an imported checkpoint with its
own model (and data) settings.

    python -m moejax.main --config=configs/hf.py:/tmp/olmoe --workdir=/tmp/olmoe_lora \
        --config.finetune.base=/tmp/olmoe --config.finetune.lora.rank=8 \
        --config.finetune.lora.targets=attention,router

The part after ":" is the workdir; its newest checkpoint's config is the
starting point, and --config.KEY=VALUE overrides apply on top.
"""

from moejax import run as run_lib


def get_config(workdir: str):
  if not workdir:
    raise ValueError("configs/hf.py needs a workdir: --config=configs/hf.py:/path/to/run")
  return run_lib.Run(workdir).config()
