"""Parameter and training-FLOP counts of a `nn.TransformerLM`, from formulas.

Pure Python on the hyperparameters (the same keywords as `TransformerLM`), so
sweeps and scaling-law fits can size models without building them; the tests
check `param_counts(...)["total"]` against the parameters of built models.

Letters: V vocabulary, D model width, N heads, P head dim, E routed experts,
K experts per token, H expert hidden width, g granularity, n_layer layers.
"""

from typing import Any, Mapping, Optional

from moejax.nn.transformer import moe_layer_flags

EXPERT_CHOICE = "expert_choice"


def _kernels_per_mlp(activation: str) -> int:
  # gelu: wi [D, H], wo [H, D]. swiglu adds the gate kernel (Shazeer 2020).
  if activation not in ("gelu", "swiglu"):
    raise ValueError(f"unknown activation {activation!r}; valid: ['gelu', 'swiglu']")
  return 3 if activation == "swiglu" else 2


def _ffn_counts(d_model: int, moe: Mapping[str, Any], is_moe: bool) -> dict[str, float]:
  """Parameters of one FFN: total, active per token (float), routed experts."""
  granularity = moe.get("granularity", 1)
  if moe["expert_hidden"] % granularity:
    raise ValueError(f"expert_hidden={moe['expert_hidden']} is not divisible by "
                     f"granularity={granularity}")
  per_hidden_unit = _kernels_per_mlp(moe.get("activation", "gelu")) * d_model
  expert_hidden = moe["expert_hidden"] // granularity  # H / g
  # Shared experts (DeepSeekMoE): one MLP of hidden num_shared * H / g, always on.
  shared = per_hidden_unit * moe.get("num_shared_experts", 0) * expert_hidden
  if not is_moe:
    # The dense FFN has the active hidden width of K experts: K * H.
    dense = per_hidden_unit * moe["top_k"] * moe["expert_hidden"] + shared
    return {"total": dense, "active": dense, "expert": 0}
  num_experts = moe["num_experts"] * granularity  # E * g fine-grained experts
  router = d_model * num_experts
  one_expert = per_hidden_unit * expert_hidden
  if moe.get("router", "topk") == EXPERT_CHOICE:
    # Each expert takes C = capacity_factor * S / (E g) of the S tokens, so a
    # token is processed by capacity_factor experts on average (Expert Choice,
    # Zhou et al. 2022, §3.1: c = k); the expectation, not a per-token count.
    experts_per_token = moe.get("capacity_factor", 1.25)
  else:
    experts_per_token = moe["top_k"] * granularity
  routed = num_experts * one_expert
  return {"total": router + routed + shared,
          "active": router + experts_per_token * one_expert + shared,
          "expert": routed}


def param_counts(*, vocab_size: int, num_layers: int, d_model: int, num_heads: int,
                 moe: Mapping[str, Any], head_dim: Optional[int] = None,
                 moe_every: int = 1, first_dense_layers: int = 0,
                 tie_embeddings: bool = True) -> dict[str, int]:
  """Parameter counts of `TransformerLM` with the same keywords.

  Per block: 2 RMSNorm scales (2 D), attention q, k, v, o (4 D N P), and the
  FFN: an MoE layer (router D E g, E g routed experts of hidden H / g with 2
  kernels, or 3 with swiglu, plus shared experts) or a dense FFN of hidden
  K H (+ shared experts). Plus the final RMSNorm (D), the embedding (V D) and,
  if untied, the output projection (D V).

  Returns:
    total: every parameter.
    active_per_token: parameters a token uses: total minus the routed experts
      it is not sent to (K g of E g experts run per token; for expert choice
      the average, capacity_factor experts, rounded to an integer).
    embedding: the vocabulary matrices: V D (tied), 2 V D (untied).
    non_embedding: total - embedding (norms, attention, routers, FFNs).
    expert: routed expert parameters (all E g experts of all MoE layers).
  """
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    head_dim = d_model // num_heads
  flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                          first_dense_layers=first_dense_layers,
                          router=moe.get("router", "topk"))
  attention = 4 * d_model * num_heads * head_dim
  non_embedding = active = float(d_model)  # final RMSNorm
  expert = 0
  for is_moe in flags:
    ffn = _ffn_counts(d_model, moe, is_moe)
    block = 2 * d_model + attention
    non_embedding += block + ffn["total"]
    active += block + ffn["active"]
    expert += ffn["expert"]
  embedding = vocab_size * d_model * (1 if tie_embeddings else 2)
  non_embedding = int(non_embedding)
  return {"total": embedding + non_embedding,
          "active_per_token": embedding + int(round(active)),
          "embedding": embedding,
          "non_embedding": non_embedding,
          "expert": int(expert)}


def train_flops_per_token(*, vocab_size: int, num_layers: int, d_model: int,
                          num_heads: int, moe: Mapping[str, Any], seq_len: int,
                          head_dim: Optional[int] = None, moe_every: int = 1,
                          first_dense_layers: int = 0, tie_embeddings: bool = True,
                          causal: bool = True) -> float:
  """Training FLOPs per token (forward + backward) of `TransformerLM`.

  Kaplan et al. 2020, Table 1: C_forward = 2 N + 2 n_layer n_ctx d_attn, and
  training costs 3x the forward pass (backward = 2x forward), so
      6 * (N_active + D V) + 6 * n_layer * seq_len * d_attn,    d_attn = N P.
  N_active is the active non-embedding parameter count (`param_counts`; norm
  scales are included though they do no matmul: < 0.1% for usual widths).
  D V is the output projection, a matmul even when tied; the embedding lookup
  costs no FLOPs.

  Attention convention: the QK^T logits and the weighted sum over values cost
  2 * 2 * n_ctx * d_attn forward per token and layer for the full n_ctx x n_ctx
  score matrix (Chinchilla, Hoffmann et al. 2022, Appendix F). With
  `causal=True` (default) this is halved, since a token attends to (n_ctx+1)/2
  positions on average, which gives Kaplan's 2 n_layer n_ctx d_attn: the
  useful FLOPs, the right numerator for MFU. `causal=False` counts the full
  matrix (12 n_layer n_ctx d_attn for training), which is what
  `nn.attention.causal_attention` actually computes (it masks, it does not
  skip). Softmax, norms and routing sorts are not counted.
  """
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    head_dim = d_model // num_heads
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  counts = param_counts(vocab_size=vocab_size, num_layers=num_layers, d_model=d_model,
                        num_heads=num_heads, head_dim=head_dim, moe=moe,
                        moe_every=moe_every, first_dense_layers=first_dense_layers,
                        tie_embeddings=tie_embeddings)
  active_non_embedding = counts["active_per_token"] - counts["embedding"]
  output_projection = d_model * vocab_size
  attention_forward = (2 if causal else 4) * num_layers * seq_len * num_heads * head_dim
  return float(6 * (active_non_embedding + output_projection) + 3 * attention_forward)
