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


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", routed=False),
    Family("qwen3", "Qwen3ForCausalLM", routed=False, qk_norm="head"),
    Family("mixtral", "MixtralForCausalLM", routed=True, moe_block="block_sparse_moe",
           expert_names=("w1", "w3", "w2"), experts_keys=("num_local_experts",),
           renormalize=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", routed=True, qk_norm="head",
           hidden_key="moe_intermediate_size"),
    Family("olmoe", "OlmoeForCausalLM", routed=True, qk_norm="projection"),
)}
# What the other MoE families need (moejax refuses them by name until then).
NOT_YET = {
    "deepseek_v3": "multi-head latent attention, YaRN and dense first layers of another width",
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


def rope_theta(hf: dict[str, Any]) -> float:
  """The RoPE base, from transformers 5's `rope_parameters` or the older
  top-level `rope_theta` (refusing scaled variants)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise Unsupported(f"rope_type {kind!r} (RoPE scaling) is not supported yet")
  for source in (params, hf):
    if source.get("rope_theta") is not None:
      return float(source["rope_theta"])
  return 10000.0


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
  )
  for refused, what in refusals:
    if refused:
      raise Unsupported(f"{family.model_type}: {what} is not supported")
  rope_theta(hf)
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
      rope_base=rope_theta(hf), tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
      moe_every=1, first_dense_layers=0)
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
  options["moe"] = dict(
      router="topk", num_experts=_experts(family, hf), top_k=top_k,
      expert_hidden=int(hf[family.hidden_key]), activation="swiglu", score_fn="softmax",
      renormalize=renormalize, capacity_factor=0.0, eval_capacity_factor=None,
      dispatch="dropless", num_shared_experts=0, granularity=1,
      aux_loss_type="global_batch", aux_loss_weight=coefficient * top_k, z_loss_weight=0.0,
      group_by="sequence", group_size=None)
  return options


def guess_family(model: dict[str, Any]) -> Family:
  """The family a moejax model (config.model as a dict) exports as."""
  moe = model["moe"]
  routed = routing_lib.get_router(moe["router"]).routed
  qk_norm = model.get("qk_norm", "none")
  for family in FAMILIES.values():
    if family.routed == routed and family.qk_norm == qk_norm:
      if routed and family.renormalize is not None and (
          family.renormalize != _renormalizes(moe)):
        continue
      return family
  raise Unsupported(f"no Hugging Face family has routed={routed} with qk_norm={qk_norm!r}")


def _renormalizes(moe: dict[str, Any]) -> bool:
  renormalize = moe.get("renormalize")
  return moe["top_k"] > 1 if renormalize is None else bool(renormalize)


def check_exportable(model: dict[str, Any], family: Family) -> None:
  """Unsupported naming the first option of `model` (config.model as a dict)
  that `family` has no place for."""
  moe = model["moe"]
  routed = routing_lib.get_router(moe["router"]).routed
  name = family.model_type
  refusals = [
      (model.get("qk_norm", "none") != family.qk_norm,
       f"qk_norm={model.get('qk_norm', 'none')!r} ({name} has {family.qk_norm!r})"),
      (routed != family.routed,
       f"router={moe['router']!r} ({name} is {'an MoE' if family.routed else 'a dense'} "
       f"family)"),
      (moe["activation"] != "swiglu", f"activation={moe['activation']!r} (GELU experts; "
                                      f"{name} has SwiGLU)"),
      (moe.get("num_shared_experts", 0) != 0, "num_shared_experts > 0 (no slot in "
                                              f"{name})"),
      (model.get("moe_every", 1) != 1 or model.get("first_dense_layers", 0) != 0,
       "dense layers between MoE layers (moe_every / first_dense_layers)"),
  ]
  if routed:
    cfg = routing_lib.MoEConfig.from_mapping(moe)
    refusals += [
        (moe["router"] not in ("topk", "switch"),
         f"router={moe['router']!r} (only token-choice top-k routing maps to {name})"),
        (not routing_lib.is_dropless(moe["capacity_factor"]),
         f"capacity_factor={moe['capacity_factor']} (finite capacity drops tokens; "
         f"{name} is dropless: train with capacity_factor=0)"),
        (moe.get("score_fn", "softmax") != "softmax",
         f"score_fn={moe.get('score_fn')!r} ({name} selects on softmax probabilities)"),
        (moe.get("granularity", 1) != 1, "granularity != 1"),
        (moe.get("num_groups", 1) != 1, "num_groups != 1 (group-limited routing)"),
        (moe.get("routed_scaling_factor", 1.0) != 1.0, "routed_scaling_factor != 1"),
        (moe.get("bias_update_rate", 0.0) > 0,
         f"a balancing bias (bias_update_rate > 0): {name} has no slot for it"),
        (family.renormalize is not None and family.renormalize != _renormalizes(moe),
         f"renormalize={_renormalizes(moe)} ({name} always renormalizes)"),
        (cfg.experts != moe["num_experts"], "granularity != 1"),
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
      rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta},
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
  return hf


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


def tensors(model: dict[str, Any], family: Family, *, fused_experts: bool = False
            ) -> dict[str, Tensor]:
  """{moejax parameter path in the unscanned layout ("layers/0/attention/qkv"):
  its HF tensors} for config.model (a dict) in `family`'s names. With
  `fused_experts`, the experts are read from transformers 5's fused
  [E, ...] tensors instead of one tensor per expert."""
  d_model, num_heads = model["d_model"], model["num_heads"]
  head_dim = model.get("head_dim") or d_model // num_heads
  kv_heads = model.get("num_kv_heads") or num_heads
  moe = model["moe"]
  out = {"embed/embedding": _plain("model.embed_tokens.weight"),
         "final_norm/scale": _plain("model.norm.weight")}
  if not model["tie_embeddings"]:
    out["output_kernel"] = _linear("lm_head.weight")
  for i in range(model["num_layers"]):
    hf, mj = f"model.layers.{i}.", f"layers/{i}/"
    attention = hf + "self_attn."
    if kv_heads == num_heads:
      out[mj + "attention/qkv"] = _heads_in(
          tuple(attention + f"{p}_proj.weight" for p in "qkv"), (num_heads,) * 3,
          d_model, head_dim)
    else:
      out[mj + "attention/query"] = _heads_in((attention + "q_proj.weight",), (num_heads,),
                                              d_model, head_dim)
      out[mj + "attention/kv"] = _heads_in(
          (attention + "k_proj.weight", attention + "v_proj.weight"), (kv_heads, kv_heads),
          d_model, head_dim)
    out[mj + "attention/out"] = _heads_out(attention + "o_proj.weight", num_heads, head_dim,
                                           d_model)
    if family.qk_norm != "none":
      out[mj + "attention/query_norm/scale"] = _plain(attention + "q_norm.weight")
      out[mj + "attention/key_norm/scale"] = _plain(attention + "k_norm.weight")
    out[mj + "attention_norm/scale"] = _plain(hf + "input_layernorm.weight")
    out[mj + "ffn_norm/scale"] = _plain(hf + "post_attention_layernorm.weight")
    if not family.routed:
      for kernel, proj in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"),
                           ("wo", "down_proj")):
        out[mj + f"ffn/ffn/{kernel}"] = _linear(hf + f"mlp.{proj}.weight")
      continue
    block = hf + family.moe_block + "."
    out[mj + "ffn/router/kernel"] = _linear(block + "gate.weight")
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
