"""`ModelConfig`: the one typed definition of the LM's options and defaults.

`config.model` (an ml_collections ConfigDict) is generated from this dataclass
(`moejax.train.config.default_config`), as `config.model.moe` is from
`routing.MoEConfig`. Every default and every check of a model key is written
here once; derived values (the head width, which layers are MoE, the scanned
layout) are computed here and nowhere else. Adding a model option is one field
below (plus its check in `validate`) and the code that uses it.

    cfg = ModelConfig.from_mapping(config.model)      # validated
    model = moejax.model.build(config, vocab_size, rngs)   # the TransformerLM

Letters: L layers, D model width, N heads, P head width.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional

from moejax import routing as routing_lib
from moejax.nn.attention import QK_NORMS, Rope
from moejax.routing import MoEConfig

# The compute dtypes a run config may name; `TransformerLM` also takes float16.
DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_matmuls")


def is_int(value: Any) -> bool:
  """An int that is not a bool (config values arrive as Python scalars)."""
  return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> None:
  """ValueError naming `name` unless `value` is an integer >= `minimum`."""
  if not is_int(value) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def resolve_head_dim(d_model: int, num_heads: int, head_dim: Optional[int]) -> int:
  """P: `head_dim`, or d_model // num_heads when it is None (ValueError when
  that does not divide, or P is not a positive integer)."""
  check_int("d_model", d_model, 1)
  check_int("num_heads", num_heads, 1)
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads} "
                       "(or set head_dim)")
    head_dim = d_model // num_heads
  check_int("head_dim", head_dim, 1)
  return head_dim


def moe_layer_flags(*, num_layers: int, moe_every: int = 1, first_dense_layers: int = 0,
                    router: str = MoEConfig.router) -> tuple[bool, ...]:
  """Which layers have an MoE FFN (True) rather than a dense FFN (False).

  The layout rule: layer i (0-based, from the embedding up) is MoE iff
      the router routes (not "dense") and i >= first_dense_layers
      and (i - first_dense_layers) % moe_every == moe_every - 1.
  moe_every=1: every layer above the first_dense_layers dense ones is MoE.
  moe_every=2: every other one, starting with the second (dense, MoE, dense,
  MoE, ...: GShard, Lepikhin et al. 2020, §2, replaces "every other FFN
  layer"), so each MoE layer follows a dense one. first_dense_layers keeps the
  bottom layers dense (DeepSeekMoE, Dai et al. 2024, keeps layer 0's FFN dense).
  """
  check_int("num_layers", num_layers, 1)
  check_int("moe_every", moe_every, 1)
  check_int("first_dense_layers", first_dense_layers, 0)
  if first_dense_layers > num_layers:
    raise ValueError(f"first_dense_layers={first_dense_layers} must be in "
                     f"[0, num_layers={num_layers}]")
  routed = routing_lib.get_router(router).routed
  return tuple(routed and i >= first_dense_layers
               and (i - first_dense_layers) % moe_every == moe_every - 1
               for i in range(num_layers))


def scan_layout(flags: tuple[bool, ...], moe_every: int,
                first_dense_layers: int, first_hash_layers: int = 0) -> tuple[int, int, int]:
  """(start, period, units) of the scanned layout: layers [start, start +
  period * units) are `units` repeats of a `period`-layer unit (what
  `scan_layers` stacks); the dense bottom layers and the units holding the
  hash layers (`first_hash_layers`) below `start`, and the layers past the
  last whole unit, stay unscanned. Without MoE layers every layer is one unit."""
  if not any(flags):
    return 0, 1, len(flags)
  period = moe_every
  start = min(first_dense_layers + first_hash_layers * period, len(flags))
  return start, period, (len(flags) - start) // period


def layer_moe_configs(moe: MoEConfig, flags: tuple[bool, ...], *,
                      dense_hidden: Optional[int] = None,
                      first_hash_layers: int = 0) -> list[MoEConfig]:
  """Each layer's FFN options: the dense FFN (`MoEConfig.dense`) where
  `flags` is False, the hash layer (`MoEConfig.hashed`) for the first
  `first_hash_layers` MoE layers (DeepSeek-V4 routes its first three MoE
  layers by token id), `moe` for the others. The one place the per-layer
  options are decided (model, accounting)."""
  out, seen = [], 0
  for is_moe in flags:
    if not is_moe:
      out.append(moe.dense(dense_hidden))
    else:
      out.append(moe.hashed(seen) if seen < first_hash_layers else moe)
      seen += 1
  return out


def check_finite_above(name: str, value: Any, bound: float) -> None:
  """ValueError naming `name` unless `value` is a finite number > `bound`."""
  if not (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > bound):
    raise ValueError(f"{name} must be a finite number > {bound:g}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Options of the decoder-only LM (the keys of `config.model`).

  Attributes:
    num_layers: L, decoder blocks.
    d_model: D, the residual width.
    num_heads: N, attention heads.
    head_dim: P; None = d_model // num_heads (`attention_head_dim`).
    num_kv_heads: K key/value heads (grouped-query attention, Ainslie et al.
      2023: each serves N / K query heads; the decode cache holds K heads);
      None = num_heads (multi-head).
    qk_norm: RMSNorm of queries and keys before RoPE, one of QK_NORMS:
      "head" (each head's P features, one [P] scale: Qwen3) or "projection"
      (the token's whole query and key projections: OLMoE).
    rms_norm_eps: epsilon of every RMSNorm (1e-6 as T5; Llama, Mixtral and
      OLMoE use 1e-5).
    kv_lora_rank: > 0 selects multi-head latent attention (MLA, DeepSeek-V2
      §2.1): keys and values are made from a compressed latent of this width,
      which with the shared rotary key is all the decode cache holds;
      0 = standard attention.
    q_lora_rank: MLA's query compression width (0 = a full query projection).
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA's per-head widths of
      the position-free query/key part, the rotary part, and the values.
    rope_interleave: rotate adjacent feature pairs (RoFormer's, DeepSeek's
      layout) instead of the two halves of a head (GPT-NeoX / Llama).
    rope_yarn_factor: > 0 applies YaRN context extension (Peng et al. 2023)
      with this factor to the RoPE frequencies; 0 = plain RoPE. The other
      rope_yarn_* keys are its parameters, as transformers names them:
      original_max_positions, beta_fast, beta_slow, mscale, mscale_all_dim
      (with MLA, mscale_all_dim also scales the softmax, as DeepSeek does).
    dense_hidden: the FFN width of the dense layers of an MoE model (DeepSeek-
      V3's first layers); None = top_k * expert_hidden plus the shared experts.
    moe_every, first_dense_layers: the layer layout (`layer_flags`).
    first_hash_layers: the first N MoE layers route by token-id hash with a
      learned gate weighing the hashed experts (DeepSeek-V4;
      `MoEConfig.hashed`), the others by `moe.router`.
    tie_embeddings: the output projection is the transposed embedding.
    rope_base: RoPE base (RoFormer, Su et al. 2021).
    dtype: compute dtype of the matmuls, one of DTYPES.
    param_dtype: storage dtype of the matmul weights, one of PARAM_DTYPES
      (routers and norms stay float32).
    scan_layers: stack the repeated layer unit and scan over it (flat compile
      time; same parameters and numbers as unscanned).
    remat: one of REMAT_POLICIES.
    moe: the MoE layers' options (`routing.MoEConfig`).
  """

  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  qk_norm: str = "none"
  rms_norm_eps: float = 1e-6
  kv_lora_rank: int = 0
  q_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  # The RoPE options: `attention.Rope`'s fields, with its defaults.
  rope_interleave: bool = Rope.interleave
  rope_yarn_factor: float = Rope.yarn_factor
  rope_yarn_original_max_positions: int = Rope.yarn_original_max_positions
  rope_yarn_beta_fast: float = Rope.yarn_beta_fast
  rope_yarn_beta_slow: float = Rope.yarn_beta_slow
  rope_yarn_mscale: float = Rope.yarn_mscale
  rope_yarn_mscale_all_dim: float = Rope.yarn_mscale_all_dim
  dense_hidden: Optional[int] = None
  moe_every: int = 1
  first_dense_layers: int = 0
  first_hash_layers: int = 0
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  moe: MoEConfig = MoEConfig()

  @classmethod
  def from_mapping(cls, options: Mapping[str, Any], *, check: bool = True) -> "ModelConfig":
    """A validated config from `config.model` (or any mapping of its keys);
    keys a mapping written by an older moejax lacks take their defaults."""
    if isinstance(options, ModelConfig):
      return options
    options = dict(options.items())
    unknown = sorted(set(options) - set(field_names()))
    if unknown:
      raise ValueError(f"unknown config.model key(s) {unknown}; valid keys: {field_names()}")
    moe = options.pop("moe", {})
    moe = MoEConfig.from_mapping(moe if isinstance(moe, MoEConfig) else dict(moe.items()))
    cfg = cls(**options, moe=moe)
    if check:
      cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises ValueError naming the first bad `config.model` key. (The MoE
    options are checked by the routers when the model is built.)"""
    for key in ("num_layers", "d_model", "num_heads", "moe_every"):
      check_int(f"config.model.{key}", getattr(self, key), 1)
    check_int("config.model.first_dense_layers", self.first_dense_layers, 0)
    if self.first_dense_layers > self.num_layers:
      raise ValueError(f"config.model.first_dense_layers={self.first_dense_layers} must "
                       f"be in [0, config.model.num_layers={self.num_layers}]")
    check_int("config.model.first_hash_layers", self.first_hash_layers, 0)
    if self.first_hash_layers > len(self.moe_layers):
      raise ValueError(f"config.model.first_hash_layers={self.first_hash_layers} exceeds "
                       f"the {len(self.moe_layers)} MoE layers")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"config.model.num_heads={self.num_heads} does not divide "
                         f"config.model.d_model={self.d_model}; change one, or set "
                         f"config.model.head_dim for another attention width")
    elif not is_int(self.head_dim) or self.head_dim < 1:
      raise ValueError(f"config.model.head_dim must be a positive integer or None, got "
                       f"{self.head_dim!r}")
    if self.num_kv_heads is not None:
      if not is_int(self.num_kv_heads) or self.num_kv_heads < 1:
        raise ValueError(f"config.model.num_kv_heads must be a positive integer or None, "
                         f"got {self.num_kv_heads!r}")
      if self.num_heads % self.num_kv_heads:
        raise ValueError(f"config.model.num_kv_heads={self.num_kv_heads} does not divide "
                         f"config.model.num_heads={self.num_heads}")
    check_finite_above("config.model.rms_norm_eps", self.rms_norm_eps, 0)
    for key in ("kv_lora_rank", "q_lora_rank"):
      check_int(f"config.model.{key}", getattr(self, key), 0)
    if self.kv_lora_rank:
      for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        check_int(f"config.model.{key} (multi-head latent attention)", getattr(self, key), 1)
      if self.qk_rope_head_dim % 2:
        raise ValueError(f"config.model.qk_rope_head_dim must be even, got "
                         f"{self.qk_rope_head_dim}")
      if self.num_kv_heads is not None or self.qk_norm != "none":
        raise ValueError("config.model.kv_lora_rank > 0 (multi-head latent attention) "
                         "takes no num_kv_heads or qk_norm")
    elif self.q_lora_rank:
      raise ValueError("config.model.q_lora_rank needs config.model.kv_lora_rank > 0 "
                       "(multi-head latent attention)")
    if self.rope_yarn_factor:
      check_finite_above("config.model.rope_yarn_factor", self.rope_yarn_factor, 0)
      check_int("config.model.rope_yarn_original_max_positions",
                self.rope_yarn_original_max_positions, 1)
    if self.dense_hidden is not None:
      check_int("config.model.dense_hidden", self.dense_hidden, 1)
    for key, allowed in (("dtype", DTYPES), ("param_dtype", PARAM_DTYPES),
                         ("remat", REMAT_POLICIES), ("qk_norm", QK_NORMS)):
      if getattr(self, key) not in allowed:
        raise ValueError(f"config.model.{key} must be one of {list(allowed)}, got "
                         f"{getattr(self, key)!r}")
    for key in ("scan_layers", "tie_embeddings", "rope_interleave"):
      if not isinstance(getattr(self, key), bool):
        raise ValueError(f"config.model.{key} must be true or false, got "
                         f"{getattr(self, key)!r}")
    check_finite_above("config.model.rope_base", self.rope_base, 1)

  @property
  def attention_head_dim(self) -> int:
    """P: head_dim, or d_model // num_heads when it is None."""
    return resolve_head_dim(self.d_model, self.num_heads, self.head_dim)

  @property
  def latent(self) -> Optional[dict[str, int]]:
    """MLA's widths (kv_rank, q_rank, nope, rope, v), or None without MLA."""
    if not self.kv_lora_rank:
      return None
    return dict(kv_rank=self.kv_lora_rank, q_rank=self.q_lora_rank,
                nope=self.qk_nope_head_dim, rope=self.qk_rope_head_dim, v=self.v_head_dim)

  @property
  def rope(self) -> dict[str, Any]:
    """The RoPE options (`attention.Rope`'s fields)."""
    return dict(base=self.rope_base, interleave=self.rope_interleave,
                yarn_factor=self.rope_yarn_factor,
                yarn_original_max_positions=self.rope_yarn_original_max_positions,
                yarn_beta_fast=self.rope_yarn_beta_fast, yarn_beta_slow=self.rope_yarn_beta_slow,
                yarn_mscale=self.rope_yarn_mscale,
                yarn_mscale_all_dim=self.rope_yarn_mscale_all_dim)

  @property
  def layer_flags(self) -> tuple[bool, ...]:
    """Which layers have an MoE FFN (`moe_layer_flags`)."""
    return moe_layer_flags(num_layers=self.num_layers, moe_every=self.moe_every,
                           first_dense_layers=self.first_dense_layers, router=self.moe.router)

  @property
  def moe_layers(self) -> list[int]:
    """Indices of the MoE layers."""
    return [i for i, is_moe in enumerate(self.layer_flags) if is_moe]

  @property
  def layout_args(self) -> dict[str, Any]:
    """The keywords of `convert_layout` (and `LayerLayout`) for this model."""
    return dict(num_layers=self.num_layers, moe_every=self.moe_every,
                first_dense_layers=self.first_dense_layers, router=self.moe.router,
                first_hash_layers=self.first_hash_layers)

  @property
  def scan_layout(self) -> tuple[int, int, int]:
    """(start, period, units) of the scanned layout (`scan_layout`)."""
    return scan_layout(self.layer_flags, self.moe_every, self.first_dense_layers,
                       self.first_hash_layers)

  def architecture(self, vocab_size: int,
                   tokens_per_group: Optional[int] = None) -> dict[str, Any]:
    """The keywords the accounting (`scaling.accounting`) takes."""
    return dict(vocab_size=vocab_size, num_layers=self.num_layers, d_model=self.d_model,
                num_heads=self.num_heads, head_dim=self.attention_head_dim,
                num_kv_heads=self.num_kv_heads, qk_norm=self.qk_norm,
                latent=self.latent, dense_hidden=self.dense_hidden,
                moe=dataclasses.asdict(self.moe), moe_every=self.moe_every,
                first_dense_layers=self.first_dense_layers,
                first_hash_layers=self.first_hash_layers,
                tie_embeddings=self.tie_embeddings, tokens_per_group=tokens_per_group)


def field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(ModelConfig)]
