"""Routers at matched active compute: every registered router and dense.

Every point runs an FFN hidden width of 2 H per token (H = expert_hidden):
  dense          one FFN of hidden top_k * H = 2 H (the yardstick);
  switch         top-1 over E experts of hidden 2 H (Fedus et al. 2021); its
                 experts are twice as wide, so it holds twice the parameters;
  topk           top-2 over E experts of hidden H (GShard, Lepikhin et al. 2020);
  expert_choice  each expert takes capacity_factor * S / E tokens with
                 capacity_factor = 2, i.e. 2 experts per token on average
                 (Zhou et al. 2022, §3.1, "EC-CF2" against top-2);
  sinkhorn       top-2 selected on Sinkhorn-balanced scores in training (S-BASE);
  hash           top-2 by a fixed hash of the token id (Roller et al. 2021);
  soft_moe       capacity_factor = 2: 2 S / E slots per expert, i.e. 2 S slots
                 of hidden H per group of S tokens (Puigcerver et al. 2023);
  topk_lossfree  top-2 with auxiliary-loss-free balancing (Wang et al. 2024):
                 bias_update_rate = 1e-3, aux_loss_type = none;
  deepseek_v3    DeepSeek-V3's gate at this scale: sigmoid scores, the
                 selection bias, a sequence-wise loss of weight 1e-4, and
                 group-limited routing over 4 groups of 2 experts, top-2 of
                 the 2 best groups. (DeepSeek-V3's own num_groups=8,
                 top_groups=4, top_k=8 needs num_experts >= 16, a multiple of
                 8; it uses 256.)

One corpus, one seed:

    python -m experiments.sweep --sweep=configs/sweeps/routers.py:tiny \
        --workdir=/tmp/routers

Every corpus of `CORPORA` with several seeds, and the table with mean ± std
(the README's "Compare routers"):

    python -m experiments.compare_routers --workdir=/tmp/compare_routers

All points group tokens by batch position (group_by="batch"), the causal
grouping that expert choice and top-2 with a capacity need in a decoder
(Wang et al. 2024, §5.2), so the routers differ in nothing else. Token choice
keeps the default capacity_factor of 1.25.
"""

from moejax.scaling.sweeps import scale_setup, schedule

BASE_CONFIG = "configs/default.py"

# The data overrides of each corpus the routers are compared on. tiny_shakespeare
# also needs config.data.manual_dir (the folder of its input.txt).
CORPORA = {
    "tiny_shakespeare": {"data.name": "tiny_shakespeare", "data.tokenizer": "byte",
                         "data.eval_split": "validation"},
    "python_stdlib": {"data.name": "python_stdlib", "data.tokenizer": "byte",
                      "data.eval_split": "validation"},
    "synthetic_mixture": {},
}

_SCALES = {
    "tiny": {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
             "model.moe.num_experts": 8, "train.seq_len": 64, "train.batch_size": 16,
             "train.steps": 300, "train.log_every": 25, "train.eval_batches": 16},
    "small": {"model.d_model": 256, "model.num_layers": 6, "model.num_heads": 8,
              "model.moe.num_experts": 16, "train.seq_len": 256, "train.batch_size": 64,
              "train.steps": 8000, "train.log_every": 100},
    "medium": {"model.d_model": 512, "model.num_layers": 12, "model.num_heads": 8,
               "model.moe.num_experts": 32, "train.seq_len": 512, "train.batch_size": 128,
               "train.steps": 20000, "train.log_every": 100},
}


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  """[(name, overrides)]: "dense", "switch", "topk", "expert_choice", "sinkhorn",
  "hash", "soft_moe", "topk_lossfree", "deepseek_v3"."""
  setup = scale_setup(_SCALES, scale)
  hidden = 2 * setup["model.d_model"]  # H
  shared = {**setup, **schedule(setup["train.steps"]), "model.moe.group_by": "batch"}
  return [
      ("dense", {**shared, "model.moe.router": "dense", "model.moe.top_k": 2,
                 "model.moe.expert_hidden": hidden}),
      ("switch", {**shared, "model.moe.router": "switch", "model.moe.top_k": 1,
                  "model.moe.expert_hidden": 2 * hidden}),
      ("topk", {**shared, "model.moe.router": "topk", "model.moe.top_k": 2,
                "model.moe.expert_hidden": hidden}),
      ("expert_choice", {**shared, "model.moe.router": "expert_choice",
                         "model.moe.top_k": 2, "model.moe.capacity_factor": 2.0,
                         "model.moe.expert_hidden": hidden}),
      ("sinkhorn", {**shared, "model.moe.router": "sinkhorn", "model.moe.top_k": 2,
                    "model.moe.expert_hidden": hidden}),
      ("hash", {**shared, "model.moe.router": "hash", "model.moe.top_k": 2,
                "model.moe.expert_hidden": hidden}),
      ("soft_moe", {**shared, "model.moe.router": "soft_moe", "model.moe.top_k": 2,
                    "model.moe.capacity_factor": 2.0, "model.moe.expert_hidden": hidden}),
      ("topk_lossfree", {**shared, "model.moe.router": "topk", "model.moe.top_k": 2,
                         "model.moe.expert_hidden": hidden,
                         "model.moe.bias_update_rate": 1e-3,
                         "model.moe.aux_loss_type": "none"}),
      ("deepseek_v3", {**shared, "model.moe.router": "topk", "model.moe.top_k": 2,
                       "model.moe.expert_hidden": hidden, "model.moe.score_fn": "sigmoid",
                       "model.moe.bias_update_rate": 1e-3,
                       "model.moe.aux_loss_type": "sequence",
                       "model.moe.aux_loss_weight": 1e-4, "model.moe.num_groups": 4,
                       "model.moe.top_groups": 2}),
  ]
