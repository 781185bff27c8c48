"""Default run: a small MoE LM on the built-in synthetic mixture corpus.

    python -m moejax.main --config=configs/default.py --workdir=/tmp/moe

4 layers, d_model 128, 8 experts, top-2; finishes in under 3 minutes on 2 CPU
cores. Every key and its default: `moejax/train/config.py` and the README's
config table. Routing ablations are one flag, e.g.
`--config.model.moe.router=expert_choice`.
"""

from moejax.train import config as config_lib


def get_config():
  return config_lib.default_config()
