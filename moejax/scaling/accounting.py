"""Parameter and training-FLOP counts of a `nn.TransformerLM`, from formulas.

Pure Python on the hyperparameters (the same keywords as `TransformerLM`), so
sweeps and scaling-law fits can size models without building them; the tests
check `param_counts(...)["total"]` against the parameters of built models.

Letters: V vocabulary, D model width, N heads, P head dim, E routed experts,
K experts per token, H expert hidden width, g granularity, n_layer layers.
"""

from typing import Any, Mapping, Optional

from moejax.data import tokenizers
from moejax.data.pipeline import SYNTHETIC
from moejax import routing as routing_lib
from moejax.nn.config import ModelConfig, layer_moe_configs, moe_layer_flags, resolve_head_dim
from moejax.routing import MoEConfig
from moejax.routing import capacity as capacity_lib


def _kernels_per_mlp(activation: str) -> int:
  # gelu: wi [D, H], wo [H, D]. swiglu adds the gate kernel (Shazeer 2020).
  if activation not in ("gelu", "swiglu"):
    raise ValueError(f"unknown activation {activation!r}; valid: ['gelu', 'swiglu']")
  return 3 if activation == "swiglu" else 2


def _shared_gate(d_model: int, moe: MoEConfig) -> int:
  """The gate of the shared experts (shared_expert_gate): D parameters."""
  return d_model if moe.shared_expert_gate and moe.num_shared_experts else 0


def _ffn_counts(d_model: int, moe: MoEConfig, is_moe: bool,
                tokens_per_group: Optional[int] = None) -> dict[str, float]:
  """Parameters of one FFN: total, active per token (float), routed experts,
  router. The router declares its parameters and experts per token."""
  if moe.expert_hidden % moe.granularity:
    raise ValueError(f"expert_hidden={moe.expert_hidden} is not divisible by "
                     f"granularity={moe.granularity}")
  per_hidden_unit = _kernels_per_mlp(moe.activation) * d_model
  # Shared experts (DeepSeekMoE): one MLP of hidden num_shared * H / g, always on.
  shared = per_hidden_unit * moe.num_shared_experts * moe.hidden + _shared_gate(d_model, moe)
  if not is_moe:
    # The dense FFN has the active hidden width of K experts: K * H.
    dense = per_hidden_unit * moe.top_k * moe.expert_hidden + shared
    return {"total": dense, "active": dense, "expert": 0, "router": 0}
  cls = routing_lib.get_router(moe.router)
  router = cls.router_params(moe, d_model, tokens_per_group)
  one_expert = per_hidden_unit * moe.hidden
  # Expert choice and Soft MoE: an expectation (capacity_factor experts per
  # token on average), not a per-token count.
  experts_per_token = cls.experts_per_token(moe)
  routed = moe.experts * one_expert
  return {"total": router + routed + shared,
          "active": router + experts_per_token * one_expert + shared,
          "expert": routed, "router": router}


def attention_params(d_model: int, num_heads: int, head_dim: int,
                     num_kv_heads: Optional[int] = None, qk_norm: str = "none",
                     latent: Optional[Mapping[str, int]] = None) -> int:
  """One attention layer's parameters: q and o (2 D N P), k and v (2 D K P),
  and qk_norm's scales (2 P per head, (N + K) P over the projection); with
  multi-head latent attention (`latent`: kv_rank, q_rank, nope, rope, v) its
  projections and latent norms (`nn.attention.LatentAttention`)."""
  if latent:
    qk = latent["nope"] + latent["rope"]
    query = (d_model * num_heads * qk if not latent["q_rank"] else
             latent["q_rank"] * (d_model + 1 + num_heads * qk))
    kv = (d_model * (latent["kv_rank"] + latent["rope"]) + latent["kv_rank"]
          + latent["kv_rank"] * num_heads * (latent["nope"] + latent["v"]))
    return query + kv + num_heads * latent["v"] * d_model
  kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  norms = {"none": 0, "head": 2 * head_dim, "projection": (num_heads + kv_heads) * head_dim}
  return 2 * d_model * head_dim * (num_heads + kv_heads) + norms[qk_norm]


def attention_width(num_heads: int, head_dim: int,
                    latent: Optional[Mapping[str, int]] = None) -> float:
  """d_attn of the score and value FLOPs: N P, or with multi-head latent
  attention N (Pn + Pr + Pv) / 2 (its scores are Pn + Pr wide, values Pv)."""
  if latent:
    return num_heads * (latent["nope"] + latent["rope"] + latent["v"]) / 2
  return num_heads * head_dim


def param_counts(*, vocab_size: int, num_layers: int, d_model: int, num_heads: int,
                 moe: Mapping[str, Any], head_dim: Optional[int] = None,
                 moe_every: int = 1, first_dense_layers: int = 0,
                 tie_embeddings: bool = True, num_kv_heads: Optional[int] = None,
                 qk_norm: str = "none", latent: Optional[Mapping[str, int]] = None,
                 dense_hidden: Optional[int] = None,
                 tokens_per_group: Optional[int] = None,
                 first_hash_layers: int = 0) -> dict[str, int]:
  """Parameter counts of `TransformerLM` with the same keywords.

  Per block: 2 RMSNorm scales (2 D), attention (`attention_params`: q, k, v,
  o, 4 D N P without grouped-query attention or qk_norm), and the
  FFN: an MoE layer (router D E g, E g routed experts of hidden H / g with 2
  kernels, or 3 with swiglu, plus shared experts) or a dense FFN of hidden
  K H (+ shared experts). Plus the final RMSNorm (D), the embedding (V D) and,
  if untied, the output projection (D V).

  `tokens_per_group` (S) is needed only by routers whose parameters depend on
  it (Soft MoE's slots).

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
  moe = MoEConfig.from_mapping(moe)
  flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                          first_dense_layers=first_dense_layers, router=moe.router)
  attention = attention_params(d_model, num_heads, head_dim, num_kv_heads, qk_norm, latent)
  non_embedding = active = float(d_model)  # final RMSNorm
  expert = 0
  layer_moes = layer_moe_configs(moe, flags, dense_hidden=dense_hidden,
                                 first_hash_layers=first_hash_layers)
  for is_moe, layer_moe in zip(flags, layer_moes):
    ffn = _ffn_counts(d_model, layer_moe, is_moe, tokens_per_group)
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


def _checked_head_dim(d_model: int, num_heads: int, head_dim: Optional[int],
                      seq_len: int) -> int:
  """`head_dim` (default d_model / num_heads) after checking it and `seq_len`."""
  head_dim = resolve_head_dim(d_model, num_heads, head_dim)
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  return head_dim


def train_flops_per_token(*, vocab_size: int, num_layers: int, d_model: int,
                          num_heads: int, moe: Mapping[str, Any], seq_len: int,
                          head_dim: Optional[int] = None, moe_every: int = 1,
                          first_dense_layers: int = 0, tie_embeddings: bool = True,
                          causal: bool = True, num_kv_heads: Optional[int] = None,
                          qk_norm: str = "none", latent: Optional[Mapping[str, int]] = None,
                          dense_hidden: Optional[int] = None,
                          tokens_per_group: Optional[int] = None,
                          first_hash_layers: int = 0) -> float:
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
  head_dim = _checked_head_dim(d_model, num_heads, head_dim, seq_len)
  counts = param_counts(vocab_size=vocab_size, num_layers=num_layers, d_model=d_model,
                        num_heads=num_heads, head_dim=head_dim, moe=moe,
                        moe_every=moe_every, first_dense_layers=first_dense_layers,
                        tie_embeddings=tie_embeddings, num_kv_heads=num_kv_heads,
                        qk_norm=qk_norm, latent=latent, dense_hidden=dense_hidden,
                        tokens_per_group=tokens_per_group,
                        first_hash_layers=first_hash_layers)
  active_non_embedding = counts["active_per_token"] - counts["embedding"]
  output_projection = d_model * vocab_size
  attention_forward = ((2 if causal else 4) * num_layers * seq_len
                       * attention_width(num_heads, head_dim, latent))
  return float(6 * (active_non_embedding + output_projection) + 3 * attention_forward)


# ----------------------------------------------------------------------------
# Breakdown by component, and the counts of a config.

# Parameter components; "embedding" + "output" is param_counts' "embedding".
COMPONENTS = ("embedding", "attention", "router", "experts", "shared_experts",
              "dense_ffn", "norms", "output")


def tokens_per_group(moe: Mapping[str, Any], *, seq_len: int,
                     batch_size: Optional[int] = None) -> int:
  """S, the tokens of one routing group (see `MoELayer`, group_size/group_by)."""
  moe = MoEConfig.from_mapping(moe)
  if moe.group_size is not None:
    return moe.group_size
  if moe.group_by == "batch":
    if batch_size is None:
      raise ValueError("group_by='batch' without group_size needs batch_size")
    return batch_size  # one group per position: the B tokens at it
  return seq_len


def _capacity_overhead(moe: MoEConfig, num_tokens: int) -> float:
  """Expert slots computed per slot used: the padding factor of a capacity.

  The gather and einsum dispatchers run every expert on all its C slots per
  group whether filled or not: overhead C E / (S k), k the router's experts
  per token (token choice: K, GShard / Switch capacity; expert choice and
  Soft MoE: capacity_factor, all E C slots filled). Dropless computes exactly
  the routed assignments: 1 (the CPU block padding of the grouped matmul is
  not counted).
  """
  cls = routing_lib.get_router(moe.router)
  if capacity_lib.is_dropless(moe.capacity_factor):
    return 1.0
  capacity = cls.capacity(moe, num_tokens, moe.capacity_factor)
  return capacity * moe.experts / (num_tokens * cls.experts_per_token(moe))


def _flops_by_part(active: dict[str, float], padding: float, *, num_layers: int,
                   seq_len: int, num_heads: int, head_dim: int, d_model: int,
                   vocab_size: int, causal: bool,
                   latent: Optional[Mapping[str, int]] = None) -> dict[str, float]:
  """Training FLOPs per token by part (see `breakdown`) from the active
  parameters per component."""
  flops = {name: 6 * active[name] for name in ("router", "experts", "shared_experts",
                                               "dense_ffn", "norms")}
  flops["attention_projections"] = 6 * active["attention"]
  # Kaplan's 2 n_layer n_ctx d_attn forward (causal), x3 for training; see
  # `train_flops_per_token` for the convention.
  flops["attention_scores"] = 3 * ((2 if causal else 4) * num_layers * seq_len
                                   * attention_width(num_heads, head_dim, latent))
  flops["attention"] = flops["attention_projections"] + flops["attention_scores"]
  flops["embedding_output"] = 6 * d_model * vocab_size
  flops["total"] = sum(flops[name] for name in (
      "router", "attention", "experts", "shared_experts", "dense_ffn", "norms",
      "embedding_output"))
  flops["capacity_padding"] = padding
  flops["total_with_padding"] = flops["total"] + padding
  return flops


def _component_counts(flags, moe: MoEConfig, num_tokens: int, *, vocab_size: int,
                      d_model: int, num_heads: int, head_dim: int, num_layers: int,
                      tie_embeddings: bool, num_kv_heads: Optional[int], qk_norm: str,
                      latent: Optional[Mapping[str, int]], dense_hidden: Optional[int],
                      first_hash_layers: int = 0):
  """(parameters, active parameters per token, capacity-padding FLOPs) by
  component (see `breakdown`)."""
  params = dict.fromkeys(COMPONENTS, 0.0)
  active = dict.fromkeys(COMPONENTS, 0.0)
  params["embedding"] = active["embedding"] = vocab_size * d_model
  params["output"] = active["output"] = 0 if tie_embeddings else d_model * vocab_size
  params["norms"] = active["norms"] = d_model * (2 * num_layers + 1)
  params["attention"] = active["attention"] = num_layers * attention_params(
      d_model, num_heads, head_dim, num_kv_heads, qk_norm, latent)
  padding = 0.0
  layer_moes = layer_moe_configs(moe, flags, dense_hidden=dense_hidden,
                                 first_hash_layers=first_hash_layers)
  for is_moe, layer_moe in zip(flags, layer_moes):
    ffn = _ffn_counts(d_model, layer_moe, is_moe, num_tokens)
    shared = (_kernels_per_mlp(moe.activation) * d_model * layer_moe.num_shared_experts
              * layer_moe.hidden + _shared_gate(d_model, layer_moe))
    params["shared_experts"] += shared
    active["shared_experts"] += shared
    if not is_moe:
      params["dense_ffn"] += ffn["total"] - shared
      active["dense_ffn"] += ffn["active"] - shared
      continue
    router = ffn["router"]
    params["router"] += router
    active["router"] += router
    params["experts"] += ffn["expert"]
    routed_active = ffn["active"] - router - shared
    active["experts"] += routed_active
    padding += 6 * routed_active * (_capacity_overhead(layer_moe, num_tokens) - 1)
  return params, active, padding


def breakdown(*, vocab_size: int, num_layers: int, d_model: int, num_heads: int,
              moe: Mapping[str, Any], seq_len: int, batch_size: Optional[int] = None,
              head_dim: Optional[int] = None, moe_every: int = 1,
              first_dense_layers: int = 0, tie_embeddings: bool = True,
              causal: bool = True, num_kv_heads: Optional[int] = None,
              qk_norm: str = "none", latent: Optional[Mapping[str, int]] = None,
              dense_hidden: Optional[int] = None,
              first_hash_layers: int = 0) -> dict[str, dict[str, float]]:
  """Parameters and training FLOPs per token of `TransformerLM`, by component.

  Args: those of `train_flops_per_token`, plus `batch_size` (global), needed
  for the routing group of group_by="batch".

  Returns:
    params: `COMPONENTS` (ints; the untied output kernel is "output", tied it
      is 0), total, total_nonembed (everything but embedding and output, as
      `param_counts`' non_embedding) and active_nonembed (float; the routed
      experts a token is not sent to left out).
    active_params: `COMPONENTS` as used by one token (float).
    flops: training FLOPs per token (forward + backward = 6 per active
      parameter of a matmul, Kaplan et al. 2020): router, attention
      (= attention_projections + attention_scores, the sequence-length term
      of `train_flops_per_token`), experts (routed, active), shared_experts,
      dense_ffn, norms (6 per scale, Kaplan's 6 N convention, so that
      `total` == `train_flops_per_token`), embedding_output (the output
      projection D V; the lookup is free), total, and capacity_padding: the
      expert FLOPs of empty capacity slots, experts * (C E / (S K) - 1) for
      token choice (negative when capacity_factor < 1: dropped slots are not
      computed), so that experts + capacity_padding is what the dispatcher
      computes; total_with_padding = total + capacity_padding.
  """
  head_dim = _checked_head_dim(d_model, num_heads, head_dim, seq_len)
  moe = MoEConfig.from_mapping(moe)
  flags = moe_layer_flags(num_layers=num_layers, moe_every=moe_every,
                          first_dense_layers=first_dense_layers, router=moe.router)
  num_tokens = tokens_per_group(moe, seq_len=seq_len, batch_size=batch_size)
  params, active, padding = _component_counts(
      flags, moe, num_tokens, vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
      head_dim=head_dim, num_layers=num_layers, tie_embeddings=tie_embeddings,
      num_kv_heads=num_kv_heads, qk_norm=qk_norm, latent=latent, dense_hidden=dense_hidden,
      first_hash_layers=first_hash_layers)
  params = {name: int(value) for name, value in params.items()}
  vocabulary = ("embedding", "output")
  params["total"] = sum(params[name] for name in COMPONENTS)
  params["total_nonembed"] = sum(params[n] for n in COMPONENTS if n not in vocabulary)
  params["active_nonembed"] = sum(active[n] for n in COMPONENTS if n not in vocabulary)

  flops = _flops_by_part(active, padding, num_layers=num_layers, seq_len=seq_len,
                         num_heads=num_heads, head_dim=head_dim, d_model=d_model,
                         vocab_size=vocab_size, causal=causal, latent=latent)
  return {"params": params, "active_params": active,
          "flops": {name: float(value) for name, value in flops.items()}}


def config_vocab_size(config) -> int:
  """The vocabulary a config's data section yields, without building it:
  257 for the byte tokenizer, else `config.data.vocab_size` (the synthetic
  corpus and SentencePiece use it as is)."""
  if config.data.name != SYNTHETIC and config.data.tokenizer == "byte":
    return tokenizers.ByteTokenizer.vocab_size
  return config.data.vocab_size


def counts_from_config(config, vocab_size: Optional[int] = None) -> dict[str, float]:
  """`breakdown` of an ml_collections run config, flattened for tables.

  Args:
    config: a run config (`moejax.train.config.default_config()` keys).
    vocab_size: V; default `config_vocab_size(config)`.

  Returns:
    params_<component> and params_total / params_total_nonembed /
    params_active_nonembed; flops_<part> (training FLOPs per token) with
    flops_per_token == `train_flops_per_token` of the same model;
    num_experts, top_k (fine-grained: times granularity), granularity.
  """
  model, moe = config.model, config.model.moe.to_dict()
  parts = breakdown(
      vocab_size=vocab_size or config_vocab_size(config), num_layers=model.num_layers,
      d_model=model.d_model, num_heads=model.num_heads, head_dim=model.head_dim,
      moe=moe, seq_len=config.train.seq_len, batch_size=config.train.batch_size,
      moe_every=model.moe_every, first_dense_layers=model.first_dense_layers,
      tie_embeddings=model.tie_embeddings, num_kv_heads=model.get("num_kv_heads"),
      qk_norm=model.get("qk_norm", "none"),
      latent=ModelConfig.from_mapping(model, check=False).latent,
      dense_hidden=model.get("dense_hidden"),
      first_hash_layers=model.get("first_hash_layers", 0))
  cfg = MoEConfig.from_mapping(moe)
  routed = routing_lib.get_router(cfg.router).routed
  counts = {"num_experts": cfg.experts if routed else 0,
            "top_k": cfg.k if routed else 0,
            "granularity": cfg.granularity}
  counts.update({f"params_{name}": value for name, value in parts["params"].items()})
  counts.update({f"flops_{name}": value for name, value in parts["flops"].items()
                 if name != "total"})
  counts["flops_per_token"] = parts["flops"]["total"]
  return counts
