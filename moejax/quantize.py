"""Weight-only post-training quantization of the routed experts, with qwix.

A routed-expert kernel (`.../ffn/experts/{wi, wi_gate, wi_up, wo}`, shape
[E, in, out], or [units, E, in, out] with scanned layers) is quantized by
`qwix.quantize` with symmetric absmax calibration along its contracted axis
`in`, one scale per (expert, output channel) (`per_expert=True`, settings
"int8" and "int4"): one expert's outliers cannot set another expert's scale.
The "_shared" settings keep one scale per output channel for all experts of a
layer, the usual per-channel scheme of a dense layer applied to the stacked
kernel, for comparison.

The model computes with the kernels dequantized from their qwix `QArray`s
(`qwix.dequantize`): the numbers of weight-only quantization, whose kernels
dequantize at use. Memory is counted for the quantized storage: qvalues at
8 or 4 bits plus the float32 scales. Attention, embeddings, routers, norms,
dense FFNs and shared experts stay as trained.
"""

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

# setting -> (quantized type, bits, per-expert scales)
SETTINGS = {
    "int8": (jnp.int8, 8, True),
    "int4": (jnp.int4, 4, True),
    "int8_shared": (jnp.int8, 8, False),
    "int4_shared": (jnp.int4, 4, False),
}
_EXPERT_KERNEL = re.compile(r"(^|/)ffn/experts/(wi|wi_gate|wi_up|wo)$")


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def is_expert_kernel(name: str) -> bool:
  """Whether a parameter path ("layers/1/ffn/experts/wi") is a routed-expert kernel."""
  return bool(_EXPERT_KERNEL.search(name))


def check_setting(setting: str) -> None:
  if setting not in SETTINGS:
    raise ValueError(f"quantization setting must be one of {list(SETTINGS)}, got {setting!r}")


def quantize_kernel(kernel: jax.Array, setting: str) -> qwix.QArray:
  """The QArray of one expert kernel [..., E, in, out] in `setting`."""
  check_setting(setting)
  qtype, _, per_expert = SETTINGS[setting]
  ndim = kernel.ndim
  # Every axis but the contracted one (ndim - 2) has its own scales; the
  # shared settings also pool the expert axis (ndim - 3).
  axes = [a for a in range(ndim) if a != ndim - 2 and (per_expert or a != ndim - 3)]
  return qwix.quantize(kernel, qtype, channelwise_axes=axes, calibration_method="absmax",
                       scale_dtype=jnp.float32)


def _storage_bytes(q: qwix.QArray, bits: int) -> int:
  return int(np.prod(q.qvalue.shape)) * bits // 8 + int(q.scale.size) * q.scale.dtype.itemsize


def quantize_params(params: nnx.State, setting: Optional[str]) -> tuple[nnx.State, int]:
  """(params with every routed-expert kernel replaced by its dequantized
  `setting` QArray, the bytes of the expert kernels as stored). `setting`
  None leaves the parameters as they are (the float baseline)."""
  pure = nnx.to_pure_dict(params)
  total = 0

  def convert(path, value):
    nonlocal total
    if not is_expert_kernel(_name(path)):
      return value
    if setting is None:
      total += int(value.size) * value.dtype.itemsize
      return value
    q = quantize_kernel(value, setting)
    total += _storage_bytes(q, SETTINGS[setting][1])
    return qwix.dequantize(q).astype(value.dtype)

  if setting is not None:
    check_setting(setting)
  new = jax.tree_util.tree_map_with_path(convert, pure)
  state = jax.tree.map(lambda x: x, params)  # a copy: the caller's params stay
  nnx.replace_by_pure_dict(state, new)
  return state, total


def expert_weight_stats(params: nnx.State) -> dict[str, dict[str, list[float]]]:
  """Per routed-expert kernel: min, max, std and absmax per expert, and the
  ratio of the largest expert absmax to the median one (how far one expert's
  outliers would stretch a shared scale). Keys are parameter paths; with
  scanned layers the stacked units are listed as path + "/unit<u>"."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params)):
    name = _name(path)
    if not is_expert_kernel(name):
      continue
    value = np.asarray(value, np.float32)
    units = value.reshape((-1,) + value.shape[-3:])
    for u, kernel in enumerate(units):
      flat = kernel.reshape(kernel.shape[0], -1)
      absmax = np.abs(flat).max(axis=1)
      key = name if len(units) == 1 else f"{name}/unit{u}"
      out[key] = {"min": flat.min(axis=1).tolist(), "max": flat.max(axis=1).tolist(),
                  "std": flat.std(axis=1).tolist(), "absmax": absmax.tolist(),
                  "absmax_max_over_median": float(absmax.max() / np.median(absmax))}
  return out
