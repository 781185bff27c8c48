"""DeepSeek-V3's MoE shape (DeepSeek-AI 2024), for compiling ahead of time:
61 layers (the first 3 dense FFNs of 18432), d_model 7168, 256 fine-grained
SwiGLU experts of 2048 plus one shared, top-8 on sigmoid scores with 8 groups
(top 4), routed scaling 2.5, vocabulary 129280.

    python -m moejax.aot --config=configs/deepseek_v3.py --topology=v5p-1024 \
        --config.mesh.fsdp=8 --config.mesh.expert=64

A shape, not a recipe: moejax's attention is multi-head (128 heads of 128)
where DeepSeek-V3 compresses keys and values (MLA), and it has no
multi-token-prediction module (moejax counts 672.1B parameters, 38.7B
active per token, against the paper's 671B / 37B); the data is the synthetic corpus at its vocabulary. Parameters
and Adam moments bfloat16, layers scanned and rematerialized, dropless
routing, sequences of 4096.
"""

from moejax.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.data.vocab_size = 129280
  config.train.batch_size = 256
  config.train.seq_len = 4096
  config.train.moment_dtype = "bfloat16"
  config.model.num_layers = 61
  config.model.first_dense_layers = 3
  config.model.d_model = 7168
  config.model.num_heads = 128
  config.model.tie_embeddings = False
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "full"
  moe = config.model.moe
  moe.num_experts = 256
  moe.top_k = 8
  moe.expert_hidden = 2048
  moe.num_shared_experts = 1
  moe.activation = "swiglu"
  moe.score_fn = "sigmoid"
  moe.num_groups = 8
  moe.top_groups = 4
  moe.routed_scaling_factor = 2.5
  moe.aux_loss_type = "sequence"
  moe.aux_loss_weight = 1e-4
  moe.bias_update_rate = 1e-3
  moe.capacity_factor = 0.0
  moe.dispatch = "dropless"
  moe.group_by = "batch"
  return config
