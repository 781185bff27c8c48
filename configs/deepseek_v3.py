"""DeepSeek-V3's shape (DeepSeek-AI 2024), for compiling ahead of time: 61
layers (the first 3 dense FFNs of 18432), d_model 7168, multi-head latent
attention (128 heads; latents of 512 for keys and values, 1536 for queries;
query/key heads of 128 position-free + 64 rotary dims, values of 128; YaRN x40 over 4096
positions, interleaved RoPE), 256 fine-grained SwiGLU experts of 2048 plus
one shared, top-8 on sigmoid scores with 8 groups (top 4), routed scaling
2.5, vocabulary 129280.

    python -m moejax.aot --config=configs/deepseek_v3.py --topology=v5p-1024 \
        --config.mesh.fsdp=8 --config.mesh.expert=64

A shape, not a recipe: moejax has no multi-token-prediction module. moejax
counts 671.0B parameters, 37.6B active per token: the paper's 671B / 37B,
which leave the MTP module's 14B out too. The data is the synthetic corpus at
its vocabulary. `python -m moejax.hf import` reads the real checkpoint's
weights into the same architecture (in bfloat16: the Hub's fp8 weights need
dequantizing first). Parameters and Adam moments bfloat16, layers scanned
and rematerialized, dropless routing, sequences of 4096.
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
  config.model.kv_lora_rank = 512
  config.model.q_lora_rank = 1536
  config.model.qk_nope_head_dim = 128
  config.model.qk_rope_head_dim = 64
  config.model.v_head_dim = 128
  config.model.head_dim = 192
  config.model.rope_interleave = True
  config.model.rope_yarn_factor = 40.0
  config.model.rope_yarn_original_max_positions = 4096
  config.model.rope_yarn_mscale = 1.0
  config.model.rope_yarn_mscale_all_dim = 1.0
  config.model.dense_hidden = 18432
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
