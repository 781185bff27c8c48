"""Model families: a Hugging Face config.json and tensor names <-> moejax.

One `Family` per transformers `model_type`. It says how the HF config maps
onto `config.model` (`model_options`) and back (`hf_config`), and which HF
tensors make each moejax parameter (`tensors`): a `Tensor` holds the HF names
and the two maps between their layouts. HF stores a linear layer's weight as
[out, in]; moejax stores kernels [in, out...] (attention split into heads, the
experts stacked on a leading axis). Everything a family does not map is
refused by name (`check_importable`, `check_exportable`) before anything is
read or written.

Letters: D model width, N query heads, K key/value heads, P head width, E
experts, H expert hidden width, V vocabulary.
"""

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from moejax import routing as routing_lib
from moejax.nn.config import moe_layer_flags


class Unsupported(ValueError):
  """What a checkpoint or a model has that the mapping cannot carry (one line)."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers `model_type` is laid out.

  Attributes:
    model_type: transformers' name (config.json "model_type").
    architecture: the class config.json's "architectures" names.
    routed: MoE layers (else every FFN is dense).
    qk_norm: moejax's qk_norm for this family (q_norm / k_norm tensors).
    moe_block: the name of a layer's MoE block ("mlp" or Mixtral's
      "block_sparse_moe").
    expert_names: a routed expert's (gate, up, down) linear layers.
    experts_keys: config keys that may hold E (the first present is read).
    hidden_key: the config key of H (dense: the FFN width).
    renormalize: True/False for a fixed rule; None: config "norm_topk_prob".
    latent: multi-head latent attention, sigmoid routing with a balancing
      bias, group-limited routing, shared experts and dense first layers
      (DeepSeek-V3).
  """
  model_type: str
  architecture: str
  routed: bool
  qk_norm: str = "none"
  moe_block: str = "mlp"
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
  hidden_key: str = "intermediate_size"
  renormalize: Optional[bool] = None
  latent: bool = False


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", routed=False),
    Family("qwen3", "Qwen3ForCausalLM", routed=False, qk_norm="head"),
    Family("mixtral", "MixtralForCausalLM", routed=True, moe_block="block_sparse_moe",
           expert_names=("w1", "w3", "w2"), experts_keys=("num_local_experts",),
           renormalize=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", routed=True, qk_norm="head",
           hidden_key="moe_intermediate_size"),
    Family("olmoe", "OlmoeForCausalLM", routed=True, qk_norm="projection"),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", routed=True,
           experts_keys=("n_routed_experts",), hidden_key="moe_intermediate_size",
           latent=True),
)}
# What the other MoE families need (moejax refuses them by name until then).
NOT_YET = {
    "gpt_oss": "attention sinks, attention and expert biases, a clamped SwiGLU and "
               "per-layer sliding windows",
    "qwen2_moe": "a sigmoid gate on the shared expert",
}


def family_of(hf: dict[str, Any]) -> Family:
  model_type = hf.get("model_type")
  if model_type in FAMILIES:
    return FAMILIES[model_type]
  if model_type in NOT_YET:
    raise Unsupported(f"model_type {model_type!r} is not supported yet: moejax lacks "
                      f"{NOT_YET[model_type]}")
  raise Unsupported(f"model_type {model_type!r} is not supported; supported: "
                    f"{', '.join(sorted(FAMILIES))}")


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
  value = hf.get(key, default)
  return default if value is None else value


def rope_options(hf: dict[str, Any]) -> dict[str, Any]:
  """The RoPE keys of config.model (`rope_base`, `rope_interleave`,
  `rope_yarn_*`) from transformers 5's `rope_parameters` or the older
  top-level `rope_theta` / `rope_scaling`; Unsupported for other scalings."""
  params = dict(hf.get("rope_parameters") or {})
  params = {**(hf.get("rope_scaling") or {}), **params}
  kind = params.get("rope_type") or params.get("type") or "default"
  theta = params.get("rope_theta", hf.get("rope_theta"))
  options = {"rope_base": 10000.0 if theta is None else float(theta),
             "rope_interleave": bool(hf.get("rope_interleave", False))}
  if kind == "default":
    return options
  if kind != "yarn":
    raise Unsupported(f"rope_type {kind!r} (RoPE scaling) is not supported yet; "
                      f"supported: default, yarn")
  if params.get("attention_factor") is not None or params.get("truncate") is False:
    raise Unsupported("YaRN with attention_factor or truncate=false is not supported")
  original = params.get("original_max_position_embeddings")
  factor = params.get("factor")
  if original is None:
    raise Unsupported("YaRN without original_max_position_embeddings")
  if factor is None:
    factor = _get(hf, "max_position_embeddings", 0) / original
  options.update(rope_yarn_factor=float(factor),
                 rope_yarn_original_max_positions=int(original),
                 rope_yarn_beta_fast=float(params.get("beta_fast") or 32),
                 rope_yarn_beta_slow=float(params.get("beta_slow") or 1),
                 rope_yarn_mscale=float(params.get("mscale") or 0.0),
                 rope_yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))
  return options


def check_importable(hf: dict[str, Any]) -> Family:
  """The checkpoint's family; Unsupported naming the first feature moejax
  cannot compute exactly."""
  family = family_of(hf)
  refusals = (
      (_get(hf, "hidden_act", "silu") != "silu",
       f"hidden_act={hf.get('hidden_act')!r} (moejax's SwiGLU uses silu)"),
      (bool(hf.get("attention_bias")), "attention_bias=true (biases on q, k, v, o)"),
      (bool(hf.get("mlp_bias")), "mlp_bias=true"),
      (_get(hf, "partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1"),
      (bool(hf.get("use_sliding_window")), "use_sliding_window=true"),
      (hf.get("sliding_window") is not None and family.model_type == "mixtral"
       and hf["sliding_window"] < _get(hf, "max_position_embeddings", 0),
       f"sliding_window={hf.get('sliding_window')}"),
      (any(t != "full_attention" for t in hf.get("layer_types") or []),
       f"layer_types={hf.get('layer_types')} (sliding-window layers)"),
      (hf.get("clip_qkv") is not None, f"clip_qkv={hf.get('clip_qkv')}"),
      (bool(hf.get("mlp_only_layers")) or _get(hf, "decoder_sparse_step", 1) != 1,
       "dense layers between MoE layers (mlp_only_layers / decoder_sparse_step) of "
       "another width"),
      (int(_get(hf, "pretraining_tp", 1)) != 1, "pretraining_tp != 1"),
      (bool(hf.get("quantization_config")),
       f"quantization_config ({(hf.get('quantization_config') or {}).get('quant_method')} "
       f"weights; dequantize to bfloat16 first)"),
      (family.latent and _get(hf, "scoring_func", "sigmoid") != "sigmoid",
       f"scoring_func={hf.get('scoring_func')!r}"),
      (family.latent and _get(hf, "topk_method", "noaux_tc") != "noaux_tc",
       f"topk_method={hf.get('topk_method')!r}"),
      (family.latent and _get(hf, "moe_layer_freq", 1) != 1, "moe_layer_freq != 1"),
  )
  for refused, what in refusals:
    if refused:
      raise Unsupported(f"{family.model_type}: {what} is not supported")
  rope_options(hf)
  return family


def _experts(family: Family, hf: dict[str, Any]) -> int:
  for key in family.experts_keys:
    if hf.get(key) is not None:
      return int(hf[key])
  raise Unsupported(f"{family.model_type}: config.json names no expert count "
                    f"({' or '.join(family.experts_keys)})")


def model_options(hf: dict[str, Any]) -> dict[str, Any]:
  """The `config.model` keys (with `moe`) of an HF config.json."""
  family = check_importable(hf)
  d_model, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  kv_heads = int(_get(hf, "num_key_value_heads", num_heads))
  options = dict(
      num_layers=int(hf["num_hidden_layers"]), d_model=d_model, num_heads=num_heads,
      head_dim=int(_get(hf, "head_dim", d_model // num_heads)),
      num_kv_heads=None if kv_heads == num_heads else kv_heads,
      qk_norm=family.qk_norm, rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
      moe_every=1, first_dense_layers=0, **rope_options(hf))
  if not family.routed:
    options["moe"] = dict(router="dense", num_experts=1, top_k=1,
                          expert_hidden=int(hf[family.hidden_key]), activation="swiglu",
                          num_shared_experts=0, granularity=1)
    return options
  top_k = int(hf["num_experts_per_tok"])
  renormalize = family.renormalize
  if renormalize is None:
    renormalize = bool(_get(hf, "norm_topk_prob", False))
  # transformers' load_balancing_loss_func is K times the Switch form (its
  # f counts the K choices of a token as K whole tokens) and pools the
  # layers' tokens: aux_loss_type="global_batch" with weight K * coefficient
  # gives the same value per layer (README, "Use a Hugging Face checkpoint").
  coefficient = float(_get(hf, "router_aux_loss_coef", 0.0))
  if family.latent:
    return _deepseek_options(hf, options, top_k)
  options["moe"] = dict(
      router="topk", num_experts=_experts(family, hf), top_k=top_k,
      expert_hidden=int(hf[family.hidden_key]), activation="swiglu", score_fn="softmax",
      renormalize=renormalize, capacity_factor=0.0, eval_capacity_factor=None,
      dispatch="dropless", num_shared_experts=0, granularity=1,
      aux_loss_type="global_batch", aux_loss_weight=coefficient * top_k, z_loss_weight=0.0,
      group_by="sequence", group_size=None)
  return options


# DeepSeek-V3's bias update speed gamma (arXiv 2412.19437, §4.2: 0.001): the
# imported bias keeps its values and moves at this rate if fine-tuned.
DEEPSEEK_BIAS_UPDATE_RATE = 1e-3


def _deepseek_options(hf: dict[str, Any], options: dict[str, Any], top_k: int):
  """config.model for DeepSeek-V3: MLA, dense first layers, sigmoid routing
  with the balancing bias, group-limited, shared experts."""
  q_rank = hf.get("q_lora_rank")
  nope, rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
  options.update(
      kv_lora_rank=int(hf["kv_lora_rank"]), q_lora_rank=int(q_rank or 0),
      qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(hf["v_head_dim"]),
      head_dim=nope + rope, num_kv_heads=None,
      first_dense_layers=int(_get(hf, "first_k_dense_replace", 0)),
      dense_hidden=int(hf["intermediate_size"]))
  options["moe"] = dict(
      router="topk", num_experts=int(hf["n_routed_experts"]), top_k=top_k,
      expert_hidden=int(hf["moe_intermediate_size"]), activation="swiglu",
      score_fn="sigmoid", renormalize=bool(_get(hf, "norm_topk_prob", True)),
      routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
      num_groups=int(_get(hf, "n_group", 1)), top_groups=int(_get(hf, "topk_group", 1)),
      num_shared_experts=int(_get(hf, "n_shared_experts", 0)), granularity=1,
      capacity_factor=0.0, eval_capacity_factor=None, dispatch="dropless",
      bias_update_rate=DEEPSEEK_BIAS_UPDATE_RATE, aux_loss_type="none",
      aux_loss_weight=0.0, z_loss_weight=0.0, group_by="sequence", group_size=None)
  return options


def guess_family(model: dict[str, Any]) -> Family:
  """The family a moejax model (config.model as a dict) exports as."""
  moe = model["moe"]
  routed = routing_lib.get_router(moe["router"]).routed
  qk_norm = model.get("qk_norm", "none")
  latent = bool(model.get("kv_lora_rank"))
  for family in FAMILIES.values():
    if family.routed == routed and family.qk_norm == qk_norm and family.latent == latent:
      if routed and family.renormalize is not None and (
          family.renormalize != _renormalizes(moe)):
        continue
      return family
  raise Unsupported(f"no Hugging Face family has routed={routed} with qk_norm={qk_norm!r}"
                    f"{' and multi-head latent attention' if latent else ''}")


def _renormalizes(moe: dict[str, Any]) -> bool:
  """Whether the routed weights are renormalized (`MoEConfig.renormalize_weights`)."""
  return routing_lib.MoEConfig.from_mapping(moe).renormalize_weights


def check_exportable(model: dict[str, Any], family: Family) -> None:
  """Unsupported naming the first option of `model` (config.model as a dict)
  that `family` has no place for."""
  moe = model["moe"]
  routed = routing_lib.get_router(moe["router"]).routed
  name = family.model_type
  latent = bool(model.get("kv_lora_rank"))
  deepseek = family.latent
  refusals = [
      (model.get("qk_norm", "none") != family.qk_norm,
       f"qk_norm={model.get('qk_norm', 'none')!r} ({name} has {family.qk_norm!r})"),
      (latent != deepseek, "multi-head latent attention" if latent else
       f"standard attention ({name} has multi-head latent attention)"),
      (routed != family.routed,
       f"router={moe['router']!r} ({name} is {'an MoE' if family.routed else 'a dense'} "
       f"family)"),
      (moe["activation"] != "swiglu", f"activation={moe['activation']!r} (GELU experts; "
                                      f"{name} has SwiGLU)"),
      (moe.get("num_shared_experts", 0) != 0 and not deepseek,
       f"num_shared_experts > 0 (no slot in {name})"),
      (model.get("moe_every", 1) != 1, "moe_every != 1 (dense layers between MoE layers)"),
      (model.get("first_hash_layers", 0) != 0, f"first_hash_layers > 0 ({name} has no "
                                                f"hash-routed layers)"),
      (moe.get("swiglu_limit", 0.0) != 0, f"swiglu_limit > 0 ({name} does not clamp its "
                                          f"SwiGLU)"),
      (model.get("first_dense_layers", 0) != 0 and not deepseek,
       f"first_dense_layers > 0 ({name} has no dense first layers)"),
      (deepseek and model.get("first_dense_layers", 0) != 0
       and model.get("dense_hidden") is None,
       "dense first layers with shared experts (set dense_hidden: DeepSeek-V3's are plain "
       "MLPs)"),
      (model.get("dense_hidden") is not None and not deepseek and routed,
       f"dense_hidden ({name} has no dense layers)"),
      (model.get("rope_interleave", False) and not deepseek, "rope_interleave=true"),
  ]
  if routed:
    score_fn = "sigmoid" if deepseek else "softmax"
    refusals += [
        (moe["router"] not in ("topk", "switch"),
         f"router={moe['router']!r} (only token-choice top-k routing maps to {name})"),
        (not routing_lib.is_dropless(moe["capacity_factor"]),
         f"capacity_factor={moe['capacity_factor']} (finite capacity drops tokens; "
         f"{name} is dropless: train with capacity_factor=0)"),
        (moe.get("score_fn", "softmax") != score_fn,
         f"score_fn={moe.get('score_fn')!r} ({name} routes on {score_fn} scores)"),
        (moe.get("granularity", 1) != 1, "granularity != 1"),
        (moe.get("num_groups", 1) != 1 and not deepseek,
         "num_groups != 1 (group-limited routing)"),
        (moe.get("routed_scaling_factor", 1.0) != 1.0 and not deepseek,
         "routed_scaling_factor != 1"),
        (moe.get("bias_update_rate", 0.0) > 0 and not deepseek,
         f"a balancing bias (bias_update_rate > 0): {name} has no slot for it"),
        (family.renormalize is not None and family.renormalize != _renormalizes(moe),
         f"renormalize={_renormalizes(moe)} ({name} always renormalizes)"),
    ]
  for refused, what in refusals:
    if refused:
      raise Unsupported(f"cannot export as {name}: {what}")


def hf_config(model: dict[str, Any], family: Family, vocab_size: int,
              max_positions: int) -> dict[str, Any]:
  """config.json for `family` from config.model (a dict)."""
  moe = model["moe"]
  num_heads = model["num_heads"]
  head_dim = model.get("head_dim") or model["d_model"] // num_heads
  theta = float(model["rope_base"])
  hf = dict(
      architectures=[family.architecture], model_type=family.model_type,
      vocab_size=vocab_size, hidden_size=model["d_model"],
      num_hidden_layers=model["num_layers"], num_attention_heads=num_heads,
      num_key_value_heads=model.get("num_kv_heads") or num_heads, head_dim=head_dim,
      hidden_act="silu", rms_norm_eps=model.get("rms_norm_eps", 1e-6),
      rope_theta=theta, rope_parameters=_rope_parameters(model),
      max_position_embeddings=max_positions,
      tie_word_embeddings=bool(model["tie_embeddings"]), attention_bias=False,
      dtype="bfloat16" if model.get("param_dtype") == "bfloat16" else "float32",
      use_cache=True)
  if not family.routed:
    hf["intermediate_size"] = moe["top_k"] * moe["expert_hidden"]
    return hf
  top_k = moe["top_k"]
  hf.update({key: moe["num_experts"] for key in family.experts_keys})
  hf.update(num_experts_per_tok=top_k, output_router_logits=False,
            router_aux_loss_coef=moe["aux_loss_weight"] / top_k)
  hf[family.hidden_key] = moe["expert_hidden"]
  if family.renormalize is None:
    hf["norm_topk_prob"] = _renormalizes(moe)
  if family.model_type == "qwen3_moe":
    hf.update(intermediate_size=top_k * moe["expert_hidden"], decoder_sparse_step=1,
              mlp_only_layers=[], use_sliding_window=False)
  if family.model_type == "mixtral":
    hf.update(sliding_window=None, router_jitter_noise=0.0)
  if family.latent:
    first_dense = model.get("first_dense_layers", 0)
    hf.update(
        kv_lora_rank=model["kv_lora_rank"], q_lora_rank=model["q_lora_rank"] or None,
        qk_nope_head_dim=model["qk_nope_head_dim"], qk_rope_head_dim=model["qk_rope_head_dim"],
        v_head_dim=model["v_head_dim"], head_dim=model["qk_rope_head_dim"],
        n_shared_experts=moe.get("num_shared_experts", 0),
        routed_scaling_factor=moe.get("routed_scaling_factor", 1.0),
        n_group=moe.get("num_groups", 1), topk_group=moe.get("top_groups", 1),
        first_k_dense_replace=first_dense, moe_layer_freq=1,
        intermediate_size=model.get("dense_hidden") or top_k * moe["expert_hidden"],
        rope_interleave=bool(model.get("rope_interleave", False)),
        scoring_func="sigmoid", topk_method="noaux_tc", num_key_value_heads=num_heads,
        norm_topk_prob=_renormalizes(moe))
    hf.pop("router_aux_loss_coef", None)
  return hf


def _rope_parameters(model: dict[str, Any]) -> dict[str, Any]:
  """transformers' `rope_parameters` of config.model's RoPE keys."""
  theta = float(model["rope_base"])
  if not model.get("rope_yarn_factor"):
    return {"rope_type": "default", "rope_theta": theta}
  out = {"rope_type": "yarn", "rope_theta": theta, "factor": model["rope_yarn_factor"],
         "original_max_position_embeddings": model["rope_yarn_original_max_positions"],
         "beta_fast": model["rope_yarn_beta_fast"], "beta_slow": model["rope_yarn_beta_slow"]}
  for key in ("mscale", "mscale_all_dim"):
    if model.get(f"rope_yarn_{key}"):
      out[key] = model[f"rope_yarn_{key}"]
  return out


# ----------------------------------------------------------------------------
# Tensors.

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moejax parameter made of HF tensors.

  names: the HF tensors; with `experts` > 0, templates with "{e}" (one set of
  tensors per expert, the moejax value stacked on axis 0). load(*arrays) ->
  the moejax value (of one expert); save(value) -> the arrays (of one
  expert). `fused`: names are whole [E, ...] tensors (transformers 5's
  in-memory expert layout) and load maps a [e-slice, ...] block.
  """
  names: tuple[str, ...]
  load: Callable[..., np.ndarray]
  save: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  experts: int = 0
  fused: bool = False

  def read(self, checkpoint, index: tuple) -> np.ndarray:
    """moejax_value[index] read from `checkpoint`, touching only the experts
    in index[0] when the value is stacked over experts."""
    index = tuple(index)
    if self.fused:
      block = self.load(*[checkpoint.read(n, (index[0],)) for n in self.names])
      return block[(slice(None),) + index[1:]]
    if not self.experts:
      return self.load(*[checkpoint.read(n) for n in self.names])[index]
    rest = index[1:]
    return np.stack([self.load(*[checkpoint.read(n.format(e=e)) for n in self.names])[rest]
                     for e in range(self.experts)[index[0]]])

  def hf_tensors(self, value: np.ndarray):
    """(name, array) pairs of the per-expert (or plain) HF layout."""
    if not self.experts:
      yield from zip(self.names, self.save(value))
      return
    for e in range(self.experts):
      yield from zip((n.format(e=e) for n in self.names), self.save(value[e]))


def _transpose(w):
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def _plain(name: str) -> Tensor:
  return Tensor((name,), lambda w: w, lambda x: (x,))


def _linear(name: str) -> Tensor:
  """A [out, in] weight stored [in, out]."""
  return Tensor((name,), _transpose, lambda x: (_transpose(x),))


def _heads_in(names: tuple[str, ...], heads: tuple[int, ...], d_model: int,
              head_dim: int) -> Tensor:
  """Projections [h P, D] -> one kernel [D, h, P] (one name) or [D, c, h, P]
  (stacked on axis 1: q, k, v, or k, v)."""
  def load(*ws):
    parts = [w.T.reshape(d_model, h, head_dim) for w, h in zip(ws, heads)]
    return parts[0] if len(parts) == 1 else np.stack(parts, axis=1)

  def save(x):
    if len(names) == 1:
      return (_transpose(x.reshape(d_model, -1)),)
    return tuple(_transpose(x[:, i].reshape(d_model, -1)) for i in range(len(names)))
  return Tensor(names, load, save)


def _heads_out(name: str, num_heads: int, head_dim: int, d_model: int) -> Tensor:
  """o_proj [D, N P] -> [N, P, D]."""
  return Tensor((name,), lambda w: w.T.reshape(num_heads, head_dim, d_model),
                lambda x: (_transpose(x.reshape(num_heads * head_dim, d_model)),))


def _mlp(out: dict, mj: str, hf: str) -> None:
  """A SwiGLU MLP's kernels (gate_proj, up_proj, down_proj) at moejax `mj`."""
  for kernel, proj in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
    out[mj + kernel] = _linear(hf + f"{proj}.weight")


def _latent_attention(out: dict, mj: str, hf: str, model: dict[str, Any]) -> None:
  """MLA's kernels (DeepSeek-V3's names) at moejax `mj` ("layers/i/attention/")."""
  d_model, heads = model["d_model"], model["num_heads"]
  nope, rope, v = model["qk_nope_head_dim"], model["qk_rope_head_dim"], model["v_head_dim"]
  kv_rank, q_rank = model["kv_lora_rank"], model["q_lora_rank"]

  def up(name, rank, width):  # [heads * width, rank] -> [rank, heads, width]
    return Tensor((hf + name,), lambda w: w.T.reshape(rank, heads, width),
                  lambda x: (_transpose(x.reshape(rank, heads * width)),))
  if q_rank:
    out[mj + "q_down"] = _linear(hf + "q_a_proj.weight")
    out[mj + "q_norm/scale"] = _plain(hf + "q_a_layernorm.weight")
    out[mj + "q_up"] = up("q_b_proj.weight", q_rank, nope + rope)
  else:
    out[mj + "query"] = up("q_proj.weight", d_model, nope + rope)
  out[mj + "kv_down"] = _linear(hf + "kv_a_proj_with_mqa.weight")
  out[mj + "kv_norm/scale"] = _plain(hf + "kv_a_layernorm.weight")
  out[mj + "kv_up"] = up("kv_b_proj.weight", kv_rank, nope + v)
  out[mj + "out"] = _heads_out(hf + "o_proj.weight", heads, v, d_model)


def _attention(out: dict, mj: str, hf: str, model: dict[str, Any], family: Family) -> None:
  """A layer's attention kernels at moejax `mj` ("layers/i/attention/")."""
  if model.get("kv_lora_rank"):
    _latent_attention(out, mj, hf, model)
    return
  d_model, num_heads = model["d_model"], model["num_heads"]
  head_dim = model.get("head_dim") or d_model // num_heads
  kv_heads = model.get("num_kv_heads") or num_heads
  if kv_heads == num_heads:
    out[mj + "qkv"] = _heads_in(tuple(hf + f"{p}_proj.weight" for p in "qkv"),
                                (num_heads,) * 3, d_model, head_dim)
  else:
    out[mj + "query"] = _heads_in((hf + "q_proj.weight",), (num_heads,), d_model, head_dim)
    out[mj + "kv"] = _heads_in((hf + "k_proj.weight", hf + "v_proj.weight"),
                               (kv_heads, kv_heads), d_model, head_dim)
  out[mj + "out"] = _heads_out(hf + "o_proj.weight", num_heads, head_dim, d_model)
  if family.qk_norm != "none":
    out[mj + "query_norm/scale"] = _plain(hf + "q_norm.weight")
    out[mj + "key_norm/scale"] = _plain(hf + "k_norm.weight")


def tensors(model: dict[str, Any], family: Family, *, fused_experts: bool = False
            ) -> dict[str, Tensor]:
  """{moejax parameter path in the unscanned layout ("layers/0/attention/qkv"):
  its HF tensors} for config.model (a dict) in `family`'s names. With
  `fused_experts`, the experts are read from transformers 5's fused
  [E, ...] tensors instead of one tensor per expert."""
  moe = model["moe"]
  flags = moe_layer_flags(num_layers=model["num_layers"], moe_every=model.get("moe_every", 1),
                          first_dense_layers=model.get("first_dense_layers", 0),
                          router=moe["router"])
  out = {"embed/embedding": _plain("model.embed_tokens.weight"),
         "final_norm/scale": _plain("model.norm.weight")}
  if not model["tie_embeddings"]:
    out["output_kernel"] = _linear("lm_head.weight")
  for i, is_moe in enumerate(flags):
    hf, mj = f"model.layers.{i}.", f"layers/{i}/"
    _attention(out, mj + "attention/", hf + "self_attn.", model, family)
    out[mj + "attention_norm/scale"] = _plain(hf + "input_layernorm.weight")
    out[mj + "ffn_norm/scale"] = _plain(hf + "post_attention_layernorm.weight")
    if not is_moe:
      _mlp(out, mj + "ffn/ffn/", hf + "mlp.")
      continue
    block = hf + family.moe_block + "."
    out[mj + "ffn/router/kernel"] = _linear(block + "gate.weight")
    if moe.get("bias_update_rate", 0.0) > 0:
      out[mj + "ffn/router/bias"] = _plain(block + "gate.e_score_correction_bias")
    if moe.get("num_shared_experts", 0):
      _mlp(out, mj + "ffn/shared/", block + "shared_experts.")
    experts, hidden = moe["num_experts"], moe["expert_hidden"]
    if fused_experts:
      gate_up, down = block + "experts.gate_up_proj", block + "experts.down_proj"
      out[mj + "ffn/experts/wi_gate"] = Tensor(
          (gate_up,), lambda w: _transpose(w[:, :hidden]), None, fused=True)
      out[mj + "ffn/experts/wi_up"] = Tensor(
          (gate_up,), lambda w: _transpose(w[:, hidden:]), None, fused=True)
      out[mj + "ffn/experts/wo"] = Tensor((down,), _transpose, None, fused=True)
      continue
    for kernel, proj in zip(("wi_gate", "wi_up", "wo"), family.expert_names):
      linear = _linear(block + "experts.{e}." + proj + ".weight")
      out[mj + f"ffn/experts/{kernel}"] = dataclasses.replace(linear, experts=experts)
  return out


def uses_fused_experts(checkpoint, family: Family) -> bool:
  """Whether the checkpoint holds transformers 5's fused expert tensors."""
  return family.routed and checkpoint.has(
      f"model.layers.0.{family.moe_block}.experts.gate_up_proj")
