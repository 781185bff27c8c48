"""`MoEConfig`: the one typed definition of an MoE layer's options and defaults.

`config.model.moe` (an ml_collections ConfigDict) is generated from this
dataclass (`moejax.train.config.moe_config`), the MoE layer, the Transformer,
the accounting and `routing.route` all read their options from it, so each
default is written here once. Router-specific checks live with the router
(`routing.routers`); the checks here are those every router shares.

Letters: E experts, K choices per token, H expert hidden width, S tokens per
routing group.
"""

import dataclasses
import importlib.util
import math
from typing import Any, Mapping, Optional

GROUP_BY = ("sequence", "batch")
ROUTER_DTYPES = ("float32", "bfloat16")
SCORE_FNS = ("softmax", "softmax_topk", "sigmoid", "sqrtsoftplus")
AUX_LOSS_TYPES = ("switch", "sequence", "global_batch", "importance", "none")
# Grouped matmul of the dropless dispatcher (see `dispatch.grouped_matmul`).
GROUPED_MATMULS = ("auto", "xla", "tokamax", "blocked")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Options of one MoE layer (the keys of `config.model.moe`).

  Attributes:
    num_experts: routed experts before `granularity`.
    top_k: experts per token before `granularity` (token-choice routers).
    expert_hidden: H of one expert before `granularity`.
    router: a name in `routing.ROUTERS` ("dense" = the dense FFN baseline).
    capacity_factor: slots per expert relative to an even split (token
      choice: C = ceil(f K S / E); expert choice: tokens per expert f S / E;
      Soft MoE: slots per expert f S / E); 0 = dropless (token choice).
    eval_capacity_factor: the factor at evaluation; None = capacity_factor.
    min_capacity: lower bound on the slots per expert per group.
    capacity_rounding: capacity rounded up to a multiple of this (vmoe's
      `multiple_of`); 1 = no rounding.
    group_size: tokens per routing group; None = one group per sequence
      (group_by="sequence") or per position (group_by="batch").
    group_by: "sequence" (groups of consecutive tokens) or "batch" (groups of
      the tokens at one position: causal in time).
    dispatch: a name in `dispatch.DISPATCHERS` the router supports, or "auto"
      (the router's first: "gather" for sparse routers, "einsum" for Soft MoE).
    dropless_exchange: how dropless rows cross the expert mesh axis.
    grouped_matmul: the dropless experts' grouped matmul, one of
      GROUPED_MATMULS: "xla" (`jax.lax.ragged_dot`), "tokamax" (its
      `ragged_dot` kernels; pip install tokamax), "blocked" (the CPU loop over
      row blocks) or "auto" (blocked on CPU; on GPU/TPU tokamax when
      installed, else xla).
    activation: "gelu" or "swiglu".
    swiglu_limit: > 0 clamps SwiGLU's up projection to [-limit, limit] and
      its gate from above at limit, in the routed, shared and dense FFNs
      (DeepSeek-V4; GPT-OSS clamps at 7); 0 = off.
    num_shared_experts: always-active experts (DeepSeekMoE).
    granularity: fine-grained split of each expert (Krajewski et al. 2024).
    batch_prioritized: serve slots by descending top-1 score (V-MoE BPR).
    renormalize: renormalize the K weights of a token; None = on for K > 1.
    score_fn: "softmax" (select on float32 probabilities, as vmoe and
      flaxformer), "softmax_topk" (Mixtral: select on logits, softmax over the
      K selected), "sigmoid" (DeepSeek-V3), "sqrtsoftplus" (DeepSeek-V4:
      sqrt(softplus(logits)), used as sigmoid is).
    routed_scaling_factor: routed weights are multiplied by it (DeepSeek-V3).
    num_groups, top_groups: group-limited routing (DeepSeek-V3): experts in
      num_groups contiguous groups, only the top_groups best are eligible.
    jitter: multiplicative jitter on the router input (Switch).
    noise_std: Gaussian noise on the router logits (noisy top-k).
    aux_loss_type: one of AUX_LOSS_TYPES (see `routing.balancing`).
    aux_loss_weight, z_loss_weight: weights of the router losses.
    quantile_balancing: quantile balancing (Megatron-Core's
      `moe_router_load_balancing_type="quantile_balancing"`): each token takes
      the top-K of logits - beta, a per-expert bias [E] that after each step
      becomes the column quantile of (logits - each token's (K+1)-th value)
      that would give every expert S K / E tokens (a dual coordinate-descent
      step), averaged over devices, EMA-blended (`quantile_balancing_ema`, 0 =
      replaced each step) and re-centered. Weights are the `score_fn` scores at
      the picks. Learned token-choice routers; set aux_loss_weight=0 for the
      method as published.
    bias_update_rate: u of auxiliary-loss-free balancing (Wang et al. 2024);
      0 = off. The bias moves by u * sign(mean load - load) after each step.
    expert_dropout: dropout rate on the hidden units of the routed experts
      in training (Switch Transformer §2.4).
    sinkhorn_iterations: Sinkhorn rounds of router="sinkhorn".
    hash_seed: seed of router="hash"'s token-id -> expert map.
    hash_table: router="hash"'s map: "random" (the fixed pseudo-random
      hash of the id) or "balanced" (Hash Layers' balanced assignment: a
      table [V, K] built from the training data's id frequencies when a run
      starts, `hashing.balanced_table`, stored with the parameters).
    hash_gate: router="hash" weights its hashed experts by a learned router's
      scores there (`score_fn`, renormalized over the K when `renormalize`,
      times `routed_scaling_factor`), as DeepSeek-V4's hash layers do
      (inference/model.py `Gate.forward`: `tid2eid` picks, the gate's scores
      weigh); False = 1/K each, no parameters (Hash Layers, Roller et al.
      2021). `config.model.first_hash_layers` sets it.
    router_dtype: dtype of the router's logit matmul, "float32" (default) or
      "bfloat16" (transformers computes Mixtral's, Qwen3-MoE's, OLMoE's and
      GPT-OSS's router logits in the model's dtype); scores, selection and
      losses are float32 either way.
    router_logit_bias: a learned bias [E] added to the router logits
      (GPT-OSS), a parameter trained like the kernel; not the selection-only
      balancing bias of bias_update_rate.
    shared_expert_gate: the shared experts' output is scaled per token by
      sigmoid(x w), w [D, 1] (Qwen2-MoE's gated shared expert).
    force_balance: a benchmark mode, never for quality: token-choice routers
      still compute their scores, but token s of each group is sent to
      experts (s K + j) mod E, j < K, so every expert gets the same load
      (exactly, when E divides S K): step and layer timings then measure the
      kernels and collectives, not routing skew (MaxText's
      `use_random_routing`, Megatron-Core's
      `moe_router_force_load_balancing`). The weights are the router's
      scores at those experts, so gradients still flow.
  """

  num_experts: int = 8
  top_k: int = 2
  expert_hidden: int = 256
  router: str = "topk"
  capacity_factor: float = 1.25
  eval_capacity_factor: Optional[float] = None
  min_capacity: int = 1
  capacity_rounding: int = 1
  group_size: Optional[int] = None
  group_by: str = "sequence"
  dispatch: str = "auto"
  dropless_exchange: str = "auto"
  grouped_matmul: str = "auto"
  activation: str = "gelu"
  swiglu_limit: float = 0.0
  num_shared_experts: int = 0
  granularity: int = 1
  batch_prioritized: bool = False
  renormalize: Optional[bool] = None
  score_fn: str = "softmax"
  routed_scaling_factor: float = 1.0
  num_groups: int = 1
  top_groups: int = 1
  jitter: float = 0.0
  noise_std: float = 0.0
  aux_loss_type: str = "switch"
  aux_loss_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  bias_update_rate: float = 0.0
  quantile_balancing: bool = False
  quantile_balancing_ema: float = 0.0
  expert_dropout: float = 0.0
  sinkhorn_iterations: int = 8
  hash_seed: int = 0
  hash_gate: bool = False
  hash_table: str = "random"
  force_balance: bool = False
  router_dtype: str = "float32"
  router_logit_bias: bool = False
  shared_expert_gate: bool = False

  @classmethod
  def from_mapping(cls, options: Mapping[str, Any]) -> "MoEConfig":
    """A config from `config.model.moe` (or any mapping of its keys)."""
    if isinstance(options, MoEConfig):
      return options
    options = dict(options.items()) if hasattr(options, "items") else dict(options)
    unknown = sorted(set(options) - set(field_names()))
    if unknown:
      raise ValueError(f"unknown MoE option(s) {unknown}; valid options: {field_names()}")
    return cls(**options)

  @property
  def experts(self) -> int:
    """E: routed experts after the fine-grained split."""
    return self.num_experts * self.granularity

  @property
  def k(self) -> int:
    """K: experts per token after the fine-grained split."""
    return self.top_k * self.granularity

  @property
  def hidden(self) -> int:
    """H of one (fine-grained) expert."""
    return self.expert_hidden // self.granularity

  @property
  def renormalize_weights(self) -> bool:
    # Renormalizing one weight would always give 1.0; Switch keeps the raw
    # probability for K = 1, so the default is on only for K > 1. Mixtral's
    # softmax over the K selected logits is normalized by construction.
    if self.score_fn == "softmax_topk":
      return True
    return self.k > 1 if self.renormalize is None else self.renormalize

  def hashed(self, index: int = 0) -> "MoEConfig":
    """The same options for hash layer `index` (`config.model.first_hash_layers`):
    router="hash" with a gate (`hash_gate`) and its own map (hash_seed +
    index: each of DeepSeek-V4's hash layers has its own table), the score
    options kept, the options of a learned selection (balancing bias, expert
    groups, noise, priority, forced balance) off."""
    return dataclasses.replace(
        self, router="hash", hash_gate=True, hash_seed=self.hash_seed + index,
        bias_update_rate=0.0, num_groups=1,
        top_groups=1, noise_std=0.0, jitter=0.0, batch_prioritized=False,
        force_balance=False)

  def dense(self, hidden: Optional[int] = None) -> "MoEConfig":
    """The same options for a dense FFN layer (of hidden top_k * expert_hidden,
    plus the shared experts); with `hidden`, a plain FFN of that width and no
    shared experts (DeepSeek-V3's dense first layers)."""
    dense = dataclasses.replace(self, router="dense", router_logit_bias=False,
                                router_dtype="float32")
    if hidden is None:
      return dense
    return dataclasses.replace(dense, top_k=1, expert_hidden=hidden, num_shared_experts=0,
                               granularity=1, shared_expert_gate=False)


def field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(MoEConfig)]


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def tokamax_installed() -> bool:
  """Whether the optional `tokamax` package is installed (without importing it)."""
  return importlib.util.find_spec("tokamax") is not None


def check_grouped_matmul(name: str) -> None:
  """ValueError unless `name` is in GROUPED_MATMULS and what it needs is installed."""
  if name not in GROUPED_MATMULS:
    raise ValueError(f"unknown grouped_matmul {name!r}; valid values: {list(GROUPED_MATMULS)}")
  if name == "tokamax" and not tokamax_installed():
    raise ValueError("grouped_matmul='tokamax' needs the tokamax package, which is not "
                     "installed: pip install tokamax")


HASH_TABLES = ("random", "balanced")


def _validate_recipes(cfg: MoEConfig) -> None:
  """The checks of the 2026 options (hash table, SwiGLU clamp, quantile
  balancing); ValueError naming the option."""
  if cfg.hash_table not in HASH_TABLES:
    raise ValueError(f"hash_table must be one of {list(HASH_TABLES)}, got {cfg.hash_table!r}")
  if not _is_number(cfg.swiglu_limit) or cfg.swiglu_limit < 0:
    raise ValueError(f"swiglu_limit must be a finite number >= 0 (0 = off), got "
                     f"{cfg.swiglu_limit!r}")
  if cfg.swiglu_limit and cfg.activation != "swiglu":
    raise ValueError(f"swiglu_limit clamps SwiGLU; activation={cfg.activation!r}")
  if not _is_number(cfg.quantile_balancing_ema) or not 0 <= cfg.quantile_balancing_ema < 1:
    raise ValueError(f"quantile_balancing_ema must be in [0, 1), got "
                     f"{cfg.quantile_balancing_ema!r}")
  if cfg.quantile_balancing and (cfg.bias_update_rate or cfg.num_groups > 1
                                 or cfg.force_balance):
    raise ValueError("quantile_balancing is its own selection bias: it excludes "
                     "bias_update_rate, num_groups > 1 and force_balance")


def validate_common(cfg: MoEConfig) -> None:
  """The checks every router shares; ValueError naming the option."""
  for name in ("num_experts", "top_k", "expert_hidden", "granularity", "min_capacity",
               "capacity_rounding", "num_groups", "top_groups", "sinkhorn_iterations"):
    value = getattr(cfg, name)
    if not _is_int(value) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if cfg.group_size is not None and (not _is_int(cfg.group_size) or cfg.group_size < 1):
    raise ValueError(f"group_size must be a positive integer or None, got {cfg.group_size!r}")
  if not _is_int(cfg.num_shared_experts) or cfg.num_shared_experts < 0:
    raise ValueError(f"num_shared_experts must be an integer >= 0, got "
                     f"{cfg.num_shared_experts!r}")
  if not _is_int(cfg.hash_seed):
    raise ValueError(f"hash_seed must be an integer, got {cfg.hash_seed!r}")
  if cfg.expert_hidden % cfg.granularity:
    raise ValueError(f"expert_hidden={cfg.expert_hidden} is not divisible by "
                     f"granularity={cfg.granularity}")
  if cfg.group_by not in GROUP_BY:
    raise ValueError(f"unknown group_by {cfg.group_by!r}; valid values: {list(GROUP_BY)}")
  if cfg.router_dtype not in ROUTER_DTYPES:
    raise ValueError(f"router_dtype must be one of {list(ROUTER_DTYPES)}, got "
                     f"{cfg.router_dtype!r}")
  for name in ("router_logit_bias", "shared_expert_gate", "hash_gate", "quantile_balancing"):
    if not isinstance(getattr(cfg, name), bool):
      raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
  _validate_recipes(cfg)
  if cfg.shared_expert_gate and not cfg.num_shared_experts:
    raise ValueError("shared_expert_gate needs num_shared_experts > 0")
  if cfg.score_fn not in SCORE_FNS:
    raise ValueError(f"unknown score_fn {cfg.score_fn!r}; valid values: {list(SCORE_FNS)}")
  if cfg.aux_loss_type not in AUX_LOSS_TYPES:
    raise ValueError(f"unknown aux_loss_type {cfg.aux_loss_type!r}; valid values: "
                     f"{list(AUX_LOSS_TYPES)}")
  check_grouped_matmul(cfg.grouped_matmul)
  for name in ("capacity_factor", "eval_capacity_factor"):
    factor = getattr(cfg, name)
    if factor is None and name == "eval_capacity_factor":
      continue
    if not _is_number(factor) or factor < 0:
      raise ValueError(f"{name} must be a finite number >= 0 (0 = dropless), got {factor!r}")
  for name in ("jitter", "noise_std", "aux_loss_weight", "z_loss_weight",
               "bias_update_rate", "expert_dropout"):
    value = getattr(cfg, name)
    if not _is_number(value) or value < 0:
      raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  if cfg.jitter >= 1:
    raise ValueError(f"jitter must be < 1 (it scales by U(1-jitter, 1+jitter)), "
                     f"got {cfg.jitter}")
  if cfg.expert_dropout >= 1:
    raise ValueError(f"expert_dropout must be in [0, 1), got {cfg.expert_dropout}")
  if not _is_number(cfg.routed_scaling_factor) or cfg.routed_scaling_factor <= 0:
    raise ValueError(f"routed_scaling_factor must be a finite number > 0, got "
                     f"{cfg.routed_scaling_factor!r}")
  if cfg.renormalize is not None and not isinstance(cfg.renormalize, bool):
    raise ValueError(f"renormalize must be true, false or None, got {cfg.renormalize!r}")
  if cfg.score_fn == "softmax_topk" and cfg.renormalize is False:
    raise ValueError("score_fn='softmax_topk' (Mixtral) normalizes over the K selected "
                     "experts by construction; renormalize=False contradicts it")
