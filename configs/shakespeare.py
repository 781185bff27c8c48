"""Byte-level tiny_shakespeare, a small MoE LM.

    python -m moejax.main --config=configs/shakespeare.py --workdir=/tmp/shakespeare \
        --config.data.manual_dir=../shared/data/tiny_shakespeare

The manual dir holds the `input.txt` TFDS would download; it is read without
TFDS (moejax/data/corpora.py: TFDS's splits). The unigram entropy of the text
is 3.31 nats per byte. Routing groups are the tokens at one position across
the batch (group_by="batch"), so top-2 with a capacity is causal in time (no
NonCausalRoutingWarning; README "Routing causality in a decoder").
"""

from moejax.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.data.name = "tiny_shakespeare"
  config.data.tokenizer = "byte"
  config.data.eval_split = "validation"
  config.train.steps = 600
  config.train.batch_size = 32
  config.train.seq_len = 128
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.eval_every = 200
  config.train.eval_batches = 8
  config.train.checkpoint_every = 200
  config.model.moe.group_by = "batch"
  return config
