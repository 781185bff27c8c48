"""Mixtral-8x7B's shape (Jiang et al. 2024), for compiling ahead of time:
32 layers, d_model 4096, 32 query heads of 128 sharing 8 key/value heads,
8 SwiGLU experts of 14336, top-2 (softmax over the two selected logits),
RMSNorm epsilon 1e-5, vocabulary 32000, sequences of 4096.

    python -m moejax.aot --config=configs/mixtral_8x7b.py --topology=v5p-64 \
        --config.mesh.fsdp=4 --config.mesh.expert=8

A shape, not a recipe: 46.7B parameters as Mixtral's (`python -m moejax.hf
import` reads its weights into the same architecture); the data is the
synthetic corpus at Mixtral's vocabulary, since only shapes matter to the
compiler. Parameters and Adam
moments are bfloat16, layers scanned (compile time of one layer) and
rematerialized per block. Dropless routing (capacity_factor 0), as Mixtral.
"""

from moejax.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.data.vocab_size = 32000
  config.train.batch_size = 64
  config.train.seq_len = 4096
  config.train.moment_dtype = "bfloat16"
  config.model.num_layers = 32
  config.model.d_model = 4096
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.rms_norm_eps = 1e-5
  config.model.tie_embeddings = False
  config.model.rope_base = 1e6
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "full"
  moe = config.model.moe
  moe.num_experts = 8
  moe.top_k = 2
  moe.expert_hidden = 14336
  moe.activation = "swiglu"
  moe.score_fn = "softmax_topk"
  moe.capacity_factor = 0.0
  moe.dispatch = "dropless"
  moe.group_by = "batch"
  return config
