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
from moejax.routing import MoEConfig

# The compute dtypes a run config may name (the module also takes float16).
DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_matmuls")


def is_int(value: Any) -> bool:
  """An int that is not a bool (config values arrive as Python scalars)."""
  return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> None:
  """ValueError naming `name` unless `value` is an integer >= `minimum`."""
  if not is_int(value) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
    moe_every, first_dense_layers: the layer layout (`layer_flags`).
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
  moe_every: int = 1
  first_dense_layers: int = 0
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
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"config.model.num_heads={self.num_heads} does not divide "
                         f"config.model.d_model={self.d_model}; change one, or set "
                         f"config.model.head_dim for another attention width")
    elif not is_int(self.head_dim) or self.head_dim < 1:
      raise ValueError(f"config.model.head_dim must be a positive integer or None, got "
                       f"{self.head_dim!r}")
    for key, allowed in (("dtype", DTYPES), ("param_dtype", PARAM_DTYPES),
                         ("remat", REMAT_POLICIES)):
      if getattr(self, key) not in allowed:
        raise ValueError(f"config.model.{key} must be one of {list(allowed)}, got "
                         f"{getattr(self, key)!r}")
    for key in ("scan_layers", "tie_embeddings"):
      if not isinstance(getattr(self, key), bool):
        raise ValueError(f"config.model.{key} must be true or false, got "
                         f"{getattr(self, key)!r}")
    check_finite_above("config.model.rope_base", self.rope_base, 1)

  @property
  def attention_head_dim(self) -> int:
    """P: head_dim, or d_model // num_heads when it is None."""
    return self.head_dim or self.d_model // self.num_heads

  @property
  def layer_flags(self) -> tuple[bool, ...]:
    """Which layers have an MoE FFN (True) rather than a dense one.

    Layer i (0-based, from the embedding up) is MoE iff the router routes
    (not "dense") and i >= first_dense_layers and
    (i - first_dense_layers) % moe_every == moe_every - 1. moe_every=2 is
    GShard's "every other FFN layer" (Lepikhin et al. 2020, §2: dense, MoE,
    dense, ...); first_dense_layers keeps the bottom layers dense
    (DeepSeekMoE, Dai et al. 2024).
    """
    routed = routing_lib.get_router(self.moe.router).routed
    first, every = self.first_dense_layers, self.moe_every
    return tuple(routed and i >= first and (i - first) % every == every - 1
                 for i in range(self.num_layers))

  @property
  def moe_layers(self) -> list[int]:
    """Indices of the MoE layers."""
    return [i for i, is_moe in enumerate(self.layer_flags) if is_moe]

  @property
  def scan_layout(self) -> tuple[int, int, int]:
    """(start, period, units): layers [start, start + period * units) are
    `units` repeats of a `period`-layer unit (what `scan_layers` stacks); the
    dense bottom layers below `start` and the layers past the last whole unit
    stay unscanned. Without MoE layers every layer is one unit."""
    if not any(self.layer_flags):
      return 0, 1, self.num_layers
    period = self.moe_every
    return self.first_dense_layers, period, (
        self.num_layers - self.first_dense_layers) // period

  def architecture(self, vocab_size: int,
                   tokens_per_group: Optional[int] = None) -> dict[str, Any]:
    """The keywords the accounting (`scaling.accounting`) takes."""
    return dict(vocab_size=vocab_size, num_layers=self.num_layers, d_model=self.d_model,
                num_heads=self.num_heads, head_dim=self.attention_head_dim,
                moe=dataclasses.asdict(self.moe), moe_every=self.moe_every,
                first_dense_layers=self.first_dense_layers,
                tie_embeddings=self.tie_embeddings, tokens_per_group=tokens_per_group)


def field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(ModelConfig)]
