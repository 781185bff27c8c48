"""Routing report: domain/expert specialization, dead experts, MaxVio, load heatmaps.

Host-side summaries of how a router spreads tokens, for logging during training:

- `joint_counts` (jit-friendly) counts (domain, first expert) pairs on device;
  `mutual_information_bits` turns a window of such counts into I(domain; expert),
  which is 0 when routing ignores the domain and log2(min(Dm, E)) at most.
- `dead_experts` and `max_violation` summarize per-expert load.
- `save_load_heatmap` draws a [layers, experts] load map to a PNG and
  `write_heatmap_image` puts that PNG in TensorBoard, next to the scalars that
  `moejax.train.metrics.MetricWriter` writes there.

Letters: B sequences, L tokens per sequence, Dm domains, E experts.
"""

import os
import struct
import uuid
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, Sequence[float]]


def mutual_information_bits(joint_counts: ArrayLike) -> float:
  """I(domain; expert) in bits from counts of (domain, expert) pairs.

  With p(d, e) = counts[d, e] / sum(counts) and its marginals p(d), p(e),

    I = sum_{d,e} p(d, e) log2(p(d, e) / (p(d) p(e)))

  (Cover & Thomas, "Elements of Information Theory", 2nd ed., eq. 2.28), with
  0 log 0 = 0, so empty cells add nothing.

  Args:
    joint_counts: <float|int>[Dm, E] nonnegative counts of (a token's domain,
      its first expert) pairs; any scale (fractions work too).

  Returns:
    I(domain; expert) in bits, in [0, log2(min(Dm, E))]; 0.0 for all-zero counts.
  """
  counts = np.asarray(jax.device_get(joint_counts), np.float64)
  if counts.ndim != 2:
    raise ValueError(f"joint_counts must be [domains, experts], got shape {counts.shape}")
  if np.any(counts < 0) or not np.all(np.isfinite(counts)):
    raise ValueError("joint_counts must be finite and nonnegative")
  total = counts.sum()
  if total == 0:
    return 0.0
  p = counts / total
  p_domain = p.sum(axis=1, keepdims=True)
  p_expert = p.sum(axis=0, keepdims=True)
  nonzero = p > 0
  # p(d, e) > 0 implies p(d) > 0 and p(e) > 0, so the ratio is finite where used.
  ratio = p[nonzero] / (p_domain * p_expert)[nonzero]
  bits = float(np.sum(p[nonzero] * np.log2(ratio)))
  # I >= 0 exactly; rounding can leave about -1e-16 for independent counts.
  return max(bits, 0.0)


def joint_counts(domain: jax.Array, expert: jax.Array, num_domains: int,
                 num_experts: int, mask: Optional[jax.Array] = None) -> jax.Array:
  """Counts of (domain, first expert) pairs over the routed tokens of a batch.

  jit-friendly: `num_domains` and `num_experts` must be static. A token counts
  when `mask` is True and its expert is >= 0. Indices out of range
  (domain outside [0, num_domains), expert >= num_experts) count nowhere, as in
  `jax.nn.one_hot`, since nothing can be raised under jit.

  Args:
    domain: <int32>[B] the domain of each sequence, or <int32>[B, L] per token.
    expert: <int32>[B, L] each token's first expert (`Routing.first_expert`:
      the first choice for token choice, even if capacity dropped it, so the
      measure is of the router's preference); -1 for a token no expert
      chose (expert choice), which is left out.
    num_domains: Dm, static.
    num_experts: E, static.
    mask: <bool>[B, L] tokens to count (e.g. not padding); None = all.

  Returns:
    <float32>[Dm, E] counts; exact integers while each cell stays below 2**24.
  """
  expert = jnp.asarray(expert)
  domain = jnp.asarray(domain)
  if expert.ndim != 2:
    raise ValueError(f"expert must be [B, L], got shape {expert.shape}")
  if domain.ndim == 1:
    domain = domain[:, None]
  domain = jnp.broadcast_to(domain, expert.shape)
  valid = ((expert >= 0) & (expert < num_experts)
           & (domain >= 0) & (domain < num_domains))
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)
  # One scatter-add into a flat [Dm * E] table (memory O(Dm * E), not the
  # O(B * L * (Dm + E)) of one-hot products); excluded tokens go to an extra
  # last cell that is cut off, since negative indices would wrap around.
  cells = num_domains * num_experts
  flat = jnp.where(valid, domain * num_experts + expert, cells).reshape(-1)
  counts = jnp.zeros((cells + 1,), jnp.float32).at[flat].add(1.0)
  return counts[:cells].reshape(num_domains, num_experts)


def dead_experts(load_sum: ArrayLike) -> int:
  """Number of experts that got no load over a logging window.

  Args:
    load_sum: <float>[E] per-expert load (counts or fractions) summed over the
      window; summing first keeps an expert that is idle in single steps but
      used in the window from counting as dead.

  Returns:
    The number of entries equal to 0.
  """
  load = np.asarray(jax.device_get(load_sum))
  if load.ndim != 1:
    raise ValueError(f"load_sum must be [experts], got shape {load.shape}")
  return int(np.sum(load == 0))


def max_violation(load: ArrayLike) -> Union[float, np.ndarray, jax.Array]:
  """MaxVio, the relative overload of the busiest expert.

  MaxVio = max_e load_e / mean_e load_e - 1, Wang et al. 2024, "Auxiliary-Loss-Free
  Load Balancing Strategy for Mixture-of-Experts", eq. 4 (there with counts of
  tokens; the ratio is the same for fractions). 0 = perfectly balanced; E - 1
  = every token on one expert. All-zero load gives nan (0 / 0).

  Args:
    load: [..., E] per-expert load (fractions or counts); reduced over the
      last axis, so [layers, E] gives one MaxVio per layer.

  Returns:
    A jax.Array (usable under jit) for a jax input; for a numpy or Python
    input, a float when `load` is [E], else an np.ndarray of shape [...].
  """
  if isinstance(load, jax.Array):  # Tracers too, so this works inside jit.
    load = load.astype(jnp.promote_types(load.dtype, jnp.float32))
    return jnp.max(load, axis=-1) / jnp.mean(load, axis=-1) - 1.0
  load = np.asarray(load, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    vio = np.max(load, axis=-1) / np.mean(load, axis=-1) - 1.0
  return float(vio) if vio.ndim == 0 else vio


def save_load_heatmap(path: str, load: ArrayLike, layer_indices: Sequence[int],
                      step: int) -> None:
  """Writes a PNG heatmap of per-layer expert load.

  Colors show load relative to uniform, E * load (1 = the balanced 1/E), on a
  diverging scale centered at 1: blue rows/columns are under-used experts, red
  over-used ones, whatever E is.

  Args:
    path: the PNG to write; parent folders are created. Written to a temporary
      file and renamed, so a reader never sees half a PNG.
    load: <float>[num_moe_layers, E] fraction of assignments per expert, per MoE
      layer (each row sums to 1).
    layer_indices: [num_moe_layers] the Transformer layer index of each row
      (MoE layers need not be consecutive), shown as `layer {i}`.
    step: the training step, shown in the title.
  """
  # The object-oriented API with an Agg canvas: no pyplot, so no global backend
  # switch (other code in the process may plot too), no display, and no
  # pyplot figure registry to leak into; the figure is freed with `fig`.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import TwoSlopeNorm  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  load = np.asarray(jax.device_get(load), np.float64)
  if load.ndim != 2:
    raise ValueError(f"load must be [num_moe_layers, experts], got shape {load.shape}")
  layer_indices = [int(i) for i in layer_indices]
  if len(layer_indices) != load.shape[0]:
    raise ValueError(f"{len(layer_indices)} layer_indices for {load.shape[0]} rows of load")
  num_layers, num_experts = load.shape
  relative = load * num_experts
  # TwoSlopeNorm needs vmin < 1 < vmax; at least [0, 2] keeps a near-balanced
  # map pale instead of stretching tiny deviations to full color.
  finite = relative[np.isfinite(relative)]
  top = max(2.0, float(finite.max())) if finite.size else 2.0
  norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)

  width = min(20.0, 3.0 + 0.3 * num_experts)
  height = min(20.0, 1.5 + 0.35 * num_layers)
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(relative, cmap="RdBu_r", norm=norm, aspect="auto",
                    interpolation="nearest")
  ax.set_yticks(range(num_layers), [f"layer {i}" for i in layer_indices])
  ax.set_xlabel("expert")
  # Integer expert ticks; every expert while they fit, else a few.
  ax.xaxis.set_major_locator(MaxNLocator(nbins=min(num_experts, 16), integer=True))
  ax.set_title(f"expert load, step {int(step)}")
  fig.colorbar(image, ax=ax, label="load / uniform (1/E)")
  fig.tight_layout()

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  fig.clear()


# PNG color type (IHDR byte 25) -> channels, for the Summary.Image colorspace
# field (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA); PNG spec, §11.2.2.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes) -> tuple[int, int, int]:
  """(height, width, channels) from a PNG's IHDR chunk (PNG spec, §11.2.2)."""
  if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
    raise ValueError("not a PNG file")
  width, height = struct.unpack(">II", data[16:24])
  return height, width, _PNG_CHANNELS.get(data[25], 4)


def write_heatmap_image(logdir: str, tag: str, png_path: str, step: int) -> None:
  """Writes a PNG as a TensorBoard image summary to a new event file in `logdir`.

  Uses tensorboardX, as `MetricWriter` does (no TensorFlow import), and stores
  the PNG bytes as they are (Summary.Image.encoded_image_string), so nothing is
  decoded or re-encoded. Each call writes its own event file (TensorBoard reads
  all of a folder's event files as one run); its name carries a random suffix
  because tensorboardX names files by the second and would overwrite a file
  from an earlier call in the same second.

  Note: on resume `MetricWriter` deletes the event files directly in its
  `tensorboard/` folder; pass a subfolder (its own TensorBoard run) to keep
  images across resumes.

  Args:
    logdir: folder of the event file; created if missing.
    tag: the image's TensorBoard tag, e.g. "routing/load_heatmap".
    png_path: the PNG to log (e.g. from `save_load_heatmap`).
    step: the global step of the summary.
  """
  from tensorboardX import FileWriter  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top

  with open(png_path, "rb") as f:
    data = f.read()
  height, width, channels = _png_header(data)
  image = Summary.Image(height=height, width=width, colorspace=channels,
                        encoded_image_string=data)
  summary = Summary(value=[Summary.Value(tag=tag, image=image)])
  os.makedirs(logdir, exist_ok=True)
  writer = FileWriter(logdir, filename_suffix=f".image.{uuid.uuid4().hex[:8]}")
  try:
    writer.add_summary(summary, global_step=int(step))
  finally:
    writer.close()  # Flushes; the file is complete when this returns.
