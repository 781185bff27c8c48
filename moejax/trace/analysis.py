"""Dissecting routing traces: a JSON report and figures.

    report = analyze(trace)              # one trace
    report = analyze(trace, other)       # and routing stability against another
    write_figures(report, out_dir)

Every statistic counts real tokens only (loss weight > 0) and, for loads,
kept assignments only. Per MoE layer i, `report["layers"][str(i)]` holds:

  load                 <E> fraction of the layer's kept assignments each
                       expert took (sums to 1).
  load_max_over_mean   max load / mean load (MaxVio + 1, Wang et al. 2024).
  zipf_alpha, zipf_r2  least-squares fit of log load against log rank over the
                       experts with load > 0 (load ~ rank^-alpha; alpha 0 is
                       uniform), as Megatron-Core's routing-concentration tool.
  top_coverage         {"n": fraction of assignments the n busiest experts
                       take} for n = 1, E/8, E/4, E/2 (distinct, >= 1).
  coactivation_lift    <E, E> P(i and j both process a token) / (P(i) P(j))
                       over the real tokens (the diagonal is 0). With exactly
                       K experts per token picked without preference it is
                       `coactivation_random` = (K - 1) E / (K (E - 1)) (0.57
                       at K=2, E=8): pairs above it are preferred together.
  coactivation_random  that baseline, K the mean number of kept experts per
                       token (exact when every token keeps K).
  specialization_bits  I(token id; first expert) in bits, the plug-in
                       estimate over the trace (biased upward when ids are
                       rare: compare it with `specialization_bits_shuffled`,
                       the same estimate with the first experts permuted
                       across tokens).
  id_purity            fraction of tokens whose first expert is their id's
                       most frequent first expert (1: routing is a function
                       of the token id, as hash routing is).
  predictability       (not for the first MoE layer) fraction of tokens whose
                       first expert equals the first expert this layer's router
                       picks from the previous MoE layer's router input
                       (`predicted_overlap`: mean |picked ∩ actual| / K').
With a second trace of the same tokens, `stability` per layer:
  changed_first        fraction of tokens whose first expert differs.
  changed_any          fraction whose set of kept experts differs (R3, arXiv
                       2510.11370, counts tokens that differ in any choice).
  overlap              mean |set A ∩ set B| / max(|A|, |B|, 1).
and `changed_any_layer`: the fraction of tokens whose experts differ in at
least one MoE layer.
"""

import math
import os
from typing import Any, Optional

import numpy as np

from moejax.trace import Trace, TraceError


def _kept_experts(layer: dict[str, np.ndarray], mask: np.ndarray, num_experts: int
                  ) -> np.ndarray:
  """<bool>[T, E] which experts each real token was processed by."""
  experts, kept = layer["experts"][mask], layer["kept"][mask]
  chosen = np.zeros((experts.shape[0], num_experts), bool)
  rows = np.broadcast_to(np.arange(experts.shape[0])[:, None], experts.shape)
  chosen[rows[kept], experts[kept]] = True
  return chosen


def concentration(load: np.ndarray) -> dict[str, Any]:
  """Zipf fit and top-n coverage of a load vector (fractions summing to 1)."""
  ranked = np.sort(np.asarray(load, np.float64))[::-1]
  positive = ranked[ranked > 0]
  alpha = r2 = float("nan")
  if len(positive) >= 2:
    x, y = np.log(np.arange(1, len(positive) + 1)), np.log(positive)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    alpha = float(-slope)
    r2 = float(1.0 - np.sum(residual ** 2) / total) if total > 0 else 1.0
  num = len(ranked)
  sizes = sorted({max(1, n) for n in (1, num // 8, num // 4, num // 2)})
  return {"zipf_alpha": alpha, "zipf_r2": r2,
          "top_coverage": {str(n): float(ranked[:n].sum()) for n in sizes}}


def coactivation_lift(chosen: np.ndarray) -> np.ndarray:
  """<E, E> lift of expert pairs over the tokens of `chosen` <bool>[T, E]."""
  chosen = chosen.astype(np.float64)
  num_experts = chosen.shape[1]
  if not len(chosen):
    return np.zeros((num_experts, num_experts))
  joint = chosen.T @ chosen / len(chosen)
  expected = np.outer(chosen.mean(axis=0), chosen.mean(axis=0))
  lift = np.divide(joint, expected, out=np.zeros_like(joint), where=expected > 0)
  np.fill_diagonal(lift, 0.0)
  return lift


def coactivation_random(chosen: np.ndarray) -> float:
  """The lift of K experts per token picked without preference (see module)."""
  num_experts = chosen.shape[1]
  k = float(chosen.sum(axis=1).mean()) if len(chosen) else 0.0
  if k <= 0 or num_experts < 2:
    return float("nan")
  return (k - 1) * num_experts / (k * (num_experts - 1))


def mutual_information_bits(ids: np.ndarray, experts: np.ndarray) -> float:
  """Plug-in I(id; expert) in bits from paired samples."""
  if not len(ids):
    return 0.0
  _, id_index = np.unique(ids, return_inverse=True)
  _, expert_index = np.unique(experts, return_inverse=True)
  joint = np.zeros((id_index.max() + 1, expert_index.max() + 1))
  np.add.at(joint, (id_index, expert_index), 1.0)
  joint /= joint.sum()
  outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
  nonzero = joint > 0
  return float(np.sum(joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])))


def id_purity(ids: np.ndarray, experts: np.ndarray) -> float:
  """Fraction of tokens routed to their id's most frequent first expert."""
  if not len(ids):
    return float("nan")
  pairs = np.stack([ids, experts], axis=1)
  unique, counts = np.unique(pairs, axis=0, return_counts=True)
  best: dict[int, int] = {}
  for (token, _), count in zip(unique, counts):
    best[int(token)] = max(best.get(int(token), 0), int(count))
  return float(sum(best.values()) / len(ids))


def _layer_report(trace: Trace, index: int, rng: np.random.Generator) -> dict[str, Any]:
  layer, mask = trace.layers[index], trace.mask
  chosen = _kept_experts(layer, mask, trace.num_experts)
  counts = chosen.sum(axis=0).astype(np.float64)
  load = counts / max(counts.sum(), 1.0)
  ids, first = trace.inputs[mask], layer["experts"][mask][:, 0]
  out: dict[str, Any] = {
      "load": load.tolist(),
      "load_max_over_mean": float(load.max() * len(load)) if counts.sum() else float("nan"),
      **concentration(load),
      "coactivation_lift": coactivation_lift(chosen).tolist(),
      "coactivation_random": coactivation_random(chosen),
      "specialization_bits": mutual_information_bits(ids, first),
      "specialization_bits_shuffled": mutual_information_bits(ids, rng.permutation(first)),
      "id_purity": id_purity(ids, first)}
  if "predicted" in layer:
    predicted, actual = layer["predicted"][mask], layer["experts"][mask]
    out["predictability"] = float(np.mean(predicted[:, 0] == actual[:, 0]))
    hits = (predicted[:, :, None] == actual[:, None, :]).any(axis=2).sum(axis=1)
    out["predicted_overlap"] = float(np.mean(hits / actual.shape[1]))
  return out


def stability(trace: Trace, other: Trace) -> dict[str, Any]:
  """How the routing of the same tokens differs between two traces."""
  if trace.inputs.shape != other.inputs.shape or not np.array_equal(trace.inputs,
                                                                    other.inputs):
    raise TraceError(f"the traces {trace.path} and {other.path} were recorded on different "
                     f"tokens; stability compares the routing of the same tokens")
  if sorted(trace.layers) != sorted(other.layers) or trace.num_experts != other.num_experts:
    raise TraceError(f"the traces {trace.path} and {other.path} have different MoE layers "
                     f"or experts")
  mask = trace.mask & other.mask
  per_layer, any_changed = {}, np.zeros(int(mask.sum()), bool)
  for index in sorted(trace.layers):
    a = _kept_experts(trace.layers[index], mask, trace.num_experts)
    b = _kept_experts(other.layers[index], mask, other.num_experts)
    changed = np.any(a != b, axis=1)
    any_changed |= changed
    size = np.maximum(np.maximum(a.sum(axis=1), b.sum(axis=1)), 1)
    first_a = trace.layers[index]["experts"][mask][:, 0]
    first_b = other.layers[index]["experts"][mask][:, 0]
    per_layer[str(index)] = {
        "changed_first": float(np.mean(first_a != first_b)),
        "changed_any": float(np.mean(changed)),
        "overlap": float(np.mean((a & b).sum(axis=1) / size))}
  return {"layers": per_layer, "changed_any_layer": float(np.mean(any_changed))}


def analyze(trace: Trace, other: Optional[Trace] = None, *, seed: int = 0
            ) -> dict[str, Any]:
  """The report described in the module docstring."""
  rng = np.random.default_rng(seed)
  report: dict[str, Any] = {
      "trace": trace.path, "step": trace.meta.get("step"), "router": trace.meta.get("router"),
      "num_experts": trace.num_experts, "choices": trace.meta.get("choices"),
      "tokens": int(trace.mask.sum()), "eval/loss": trace.meta.get("eval/loss"),
      "layers": {str(i): _layer_report(trace, i, rng) for i in sorted(trace.layers)}}
  if other is not None:
    report["other"] = other.path
    report["other_eval/loss"] = other.meta.get("eval/loss")
    report["stability"] = stability(trace, other)
  return report


def _load_figure(plt, report, layers):
  num_experts = report["num_experts"]
  load = np.array([report["layers"][i]["load"] for i in layers]) * num_experts
  fig, ax = plt.subplots(figsize=(max(4, 0.5 * num_experts + 2), 0.5 * len(layers) + 1.8))
  image = ax.imshow(load, cmap="viridis", aspect="auto")
  ax.set(xlabel="expert", ylabel="MoE layer", yticks=range(len(layers)), yticklabels=layers,
         title="expert load / uniform load")
  fig.colorbar(image, ax=ax)
  return fig


def _concentration_figure(plt, report, layers):
  num_experts = report["num_experts"]
  fig, ax = plt.subplots(figsize=(5, 4))
  for i in layers:
    ranked = np.sort(report["layers"][i]["load"])[::-1]
    alpha = report["layers"][i]["zipf_alpha"]
    ax.loglog(np.arange(1, num_experts + 1), np.maximum(ranked, 1e-6), marker=".",
              label=f"layer {i} (alpha {alpha:.2f})")
  ax.axhline(1 / num_experts, color="gray", linestyle="--", label="uniform")
  ax.set(xlabel="expert rank", ylabel="load", title="routing concentration")
  ax.legend(fontsize=7)
  return fig


def _coactivation_figure(plt, report, layers):
  cols = min(4, len(layers))
  rows = math.ceil(len(layers) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
  for ax, i in zip(axes.flat, layers):
    lift = np.array(report["layers"][i]["coactivation_lift"])
    baseline = report["layers"][i]["coactivation_random"]
    if np.isfinite(baseline) and baseline > 0:
      lift = lift / baseline
    image = ax.imshow(lift, cmap="magma", vmin=0)
    ax.set_title(f"layer {i}: co-activation lift" + (" / random" if np.isfinite(baseline)
                                                     else ""), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  return fig


def _per_layer_figure(plt, report, layers):
  series = {"id purity": [report["layers"][i]["id_purity"] for i in layers],
            "predictability": [report["layers"][i].get("predictability", np.nan)
                               for i in layers]}
  if "stability" in report:
    stab = report["stability"]["layers"]
    series["changed (any expert)"] = [stab[i]["changed_any"] for i in layers]
    series["changed (first expert)"] = [stab[i]["changed_first"] for i in layers]
  fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 3, 3.5))
  width = 0.8 / len(series)
  for n, (name, values) in enumerate(series.items()):
    ax.bar(np.arange(len(layers)) + n * width, values, width, label=name)
  ax.set(xticks=np.arange(len(layers)) + 0.4 - width / 2, xticklabels=layers,
         xlabel="MoE layer", ylabel="fraction of tokens", ylim=(0, 1),
         title="specialization, predictability" + (", stability" if "stability" in report
                                                   else ""))
  ax.legend(fontsize=7)
  return fig


_FIGURES = {"load.png": _load_figure, "concentration.png": _concentration_figure,
            "coactivation.png": _coactivation_figure, "per_layer.png": _per_layer_figure}


def write_figures(report: dict[str, Any], out: str) -> list[str]:
  """PNG figures of a report into the folder `out`; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  layers = list(report["layers"])
  paths = []
  for name, draw in _FIGURES.items():
    fig = draw(plt, report, layers)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
