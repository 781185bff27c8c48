"""Default run: a small MoE LM on the built-in synthetic mixture corpus.

    python -m moejax.main --config=configs/default.py --workdir=/tmp/moe

4 layers, d_model 128, 8 experts, top-2; finishes in under 3 minutes on 2 CPU
cores. Routing groups are the tokens at one position across the batch
(group_by="batch"), so top-2 with a capacity, expert choice and Soft MoE are
causal in time (no NonCausalRoutingWarning). Every key and its default:
`moejax/routing/config.py` (MoE), `moejax/train/config.py` and the README's
config table. Routing ablations are one flag, e.g.
`--config.model.moe.router=expert_choice`.
"""

from moejax.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.model.moe.group_by = "batch"
  return config
