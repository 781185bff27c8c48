"""lm1b at accelerator scale: a 12-layer, d_model 768 MoE LM with 64 experts,
top-2, every other layer MoE (GShard / Switch layout), SentencePiece 32k.

    python -m moejax.main --config=configs/lm1b.py --workdir=/mnt/bucket/lm1b \
        --config.data.data_dir=gs://bucket/tfds --config.mesh.expert=8

Sized for one TPU v4-32 / 8 H100s; bfloat16 compute, float32 parameters.

Routing groups are GShard's and Switch's: 1024 tokens, here two sequences of
512 (group_by="sequence"), so top-2 with a capacity is non-causal in a decoder
(a token's later choices can be dropped for the first choices of later
tokens) and training warns NonCausalRoutingWarning: kept to match those
papers' setup. For causal routing set --config.model.moe.group_by=batch
(README "Routing causality in a decoder").
"""

from moejax.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.data.name = "lm1b"
  config.data.eval_split = "test"
  config.data.tokenizer = "sentencepiece"
  config.data.vocab_size = 32000
  config.train.steps = 100_000
  config.train.batch_size = 512
  config.train.seq_len = 512
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 2_000
  config.train.log_every = 100
  config.train.eval_every = 2_000
  config.train.eval_batches = 32
  config.train.checkpoint_every = 2_000
  config.model.num_layers = 12
  config.model.d_model = 768
  config.model.num_heads = 12
  config.model.moe_every = 2
  config.model.tie_embeddings = False
  config.model.dtype = "bfloat16"
  config.model.moe.num_experts = 64
  config.model.moe.top_k = 2
  config.model.moe.expert_hidden = 3072
  config.model.moe.group_size = 1024
  return config
