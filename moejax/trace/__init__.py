r"""Routing traces: which experts every token took, in every MoE layer.

    python -m moejax.trace record --workdir=DIR --out=TRACE [--num_batches=N]
        [--split=eval|train]
    python -m moejax.trace analyze TRACE [TRACE2] --out=DIR
    python -m moejax.evaluate --workdir=DIR --replay=TRACE

`record` (`moejax.trace.recorder.record`) runs the newest checkpoint of a
run over N batches (the run's eval batches by default, the first ones
training evaluated on; `--split=train`: the first N training batches) with
the evaluation's routing and writes what each MoE layer decided for each
token. `load(TRACE)` reads it back as numpy
arrays; `moejax.trace.analysis` dissects one trace or compares two; the
evaluator replays one (`Trace.replay_batches`). A run records a trace of its
eval batches every `config.train.trace_every` steps (`traces/step_<N>/`).

Layout of a trace folder (N rows = sequences, L positions, K' choices):
  trace.json     what was recorded: `format`, `workdir`, `step`, `split`,
                 `num_batches`, `batch_size`, `seq_len`, `vocab_size`,
                 `router`, `num_experts`, `top_k`, `choices` (K'),
                 `moe_layers`, `dtype` (compute), `devices`, `eval/loss` (nats per target token over the
                 recorded batches, as `moejax.evaluate` computes it).
  tokens.npz     inputs <int32>[N, L] (the token ids), targets <int32>[N, L],
                 weights <float32>[N, L] (loss weights; 0 = padding).
  layer<i>.npz   MoE layer i (a Transformer layer index):
                   experts <int32>[N, L, K'] in rank order (first choice
                     first), weights <float32>[N, L, K'] combine weights (0
                     where dropped), kept <bool>[N, L, K'] (False: dropped),
                   and, but in the first MoE layer, predicted <int32>[N, L, K']:
                     the experts this layer's router picks from the router
                     input of the MoE layer before it (cross-layer
                     predictability, as Megatron-Core's routing tools).
Token-choice routers record their K choices (K' = K); expert choice and Soft
MoE record every expert by descending combine weight (K' = E; kept where the
weight is > 0). A token's position is its column.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from moejax import model as model_lib
from moejax import routing
from moejax.data import base as data_base

FORMAT = "moejax.trace/1"
_TOKENS = ("inputs", "targets", "weights")
_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
           "experts": np.int32, "predicted": np.int32, "kept": np.bool_}
_LAYER_FIELDS = ("experts", "weights", "kept", "predicted")


class TraceError(ValueError):
  """A folder that is not a readable trace, or a trace that does not fit."""


@dataclasses.dataclass
class Trace:
  """A loaded trace (see the module docstring for every array).

  Attributes:
    meta: trace.json.
    inputs, targets: <int32>[N, L]; weights: <float32>[N, L].
    layers: {MoE layer index: {"experts", "weights", "kept"[, "predicted"]}}.
    path: the folder it was read from ("" if not read).
  """
  meta: dict[str, Any]
  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  layers: dict[int, dict[str, np.ndarray]]
  path: str = ""

  @property
  def mask(self) -> np.ndarray:
    """<bool>[N, L] real tokens (loss weight > 0)."""
    return self.weights > 0

  @property
  def positions(self) -> np.ndarray:
    """<int32>[N, L] each token's position in its sequence."""
    return np.broadcast_to(np.arange(self.inputs.shape[1], dtype=np.int32),
                           self.inputs.shape)

  @property
  def num_experts(self) -> int:
    return int(self.meta["num_experts"])

  def replay_batches(self, config, vocab_size: int) -> list[dict[str, Any]]:
    """This process's rows of the trace's batches, for a model of `config`,
    each with "routes" {MoE layer: <int32>[B, L, K]} to replay; TraceError
    naming the first thing that does not fit."""
    moe = config.model.moe
    layers = model_lib.model_config(config).moe_layers
    where = f"trace {self.path or '(in memory)'}"
    cls = routing.get_router(moe.router)
    if not cls.replayable:
      raise TraceError(f"router={moe.router!r} cannot replay a trace (the token-choice "
                       f"routers can)")
    typed = routing.MoEConfig.from_mapping(moe.to_dict())
    batch_size, rows = config.train.batch_size, self.inputs.shape[0]
    checks = (
        (sorted(self.layers) == layers,
         f"its MoE layers {sorted(self.layers)} are not the model's {layers}"),
        (self.inputs.shape[1] == config.train.seq_len,
         f"its seq_len {self.inputs.shape[1]} is not the run's {config.train.seq_len}"),
        (int(self.meta["choices"]) == typed.k,
         f"it records {self.meta['choices']} experts per token; the model routes to "
         f"{typed.k}"),
        (self.num_experts == typed.experts,
         f"its {self.num_experts} experts are not the model's {typed.experts}"),
        (int(self.inputs.max(initial=0)) < vocab_size,
         f"its token ids reach {int(self.inputs.max(initial=0))}, outside the "
         f"vocabulary of {vocab_size}"),
        (rows % batch_size == 0,
         f"its {rows} sequences are not whole batches of {batch_size}"))
    for ok, problem in checks:
      if not ok:
        raise TraceError(f"{where} does not fit this run: {problem}")
    local = batch_size // jax.process_count()
    batches = []
    for start in range(0, rows, batch_size):
      take = slice(start + jax.process_index() * local,
                   start + (jax.process_index() + 1) * local)
      batch = {name: getattr(self, name)[take] for name in _TOKENS}
      batch["routes"] = {index: layer["experts"][take] for index, layer in self.layers.items()}
      batches.append(batch)
    return batches


def from_traces(traces: dict[str, Any], meta: dict[str, Any]) -> Trace:
  """A `Trace` from an evaluator's traces (`Evaluator(trace=True)`)."""
  batch = traces["batch"]
  layers = {int(index): {name: np.asarray(value, _DTYPES.get(name, np.float32))
                         for name, value in layer.items()}
            for index, layer in traces["layers"].items()}
  if not layers:
    raise TraceError("the model has no MoE layers: nothing to trace")
  meta = {**meta, "choices": int(next(iter(layers.values()))["experts"].shape[-1])}
  return Trace(meta=meta, layers=layers,
               **{name: np.asarray(batch[name], _DTYPES[name]) for name in _TOKENS})


def check_out(out: str) -> None:
  """TraceError unless `out` is a folder a trace may be written to (absent,
  or empty): a trace never overwrites anything."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise TraceError(f"--out={out} exists and is not an empty folder; a trace is "
                     f"written to a new folder")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise TraceError(f"--out={out}: cannot write in {parent}")


def save(trace: Trace, out: str) -> str:
  """Writes `trace` to the folder `out` (absent or empty), whole or not at
  all (written beside it, then renamed). Returns `out`."""
  check_out(out)
  parent = os.path.dirname(os.path.abspath(out))
  staging = tempfile.mkdtemp(prefix=".trace-", dir=parent)
  try:
    np.savez(os.path.join(staging, "tokens.npz"),
             **{name: getattr(trace, name) for name in _TOKENS})
    for index, layer in trace.layers.items():
      np.savez(os.path.join(staging, f"layer{index}.npz"), **layer)
    with open(os.path.join(staging, "trace.json"), "w") as f:
      json.dump({**trace.meta, "format": FORMAT}, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def load(path: str) -> Trace:
  """Reads a trace folder; TraceError names what is missing or wrong."""
  meta_path = os.path.join(path, "trace.json")
  if not os.path.isfile(meta_path):
    raise TraceError(f"{path} is not a trace folder (no trace.json); record one with "
                     f"python -m moejax.trace record")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise TraceError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    with np.load(os.path.join(path, "tokens.npz")) as tokens:
      arrays = {name: np.asarray(tokens[name], _DTYPES[name]) for name in _TOKENS}
    layers = {}
    for index in meta["moe_layers"]:
      with np.load(os.path.join(path, f"layer{index}.npz")) as layer:
        layers[int(index)] = {name: np.asarray(layer[name], _DTYPES.get(name, np.float32))
                              for name in _LAYER_FIELDS if name in layer.files}
  except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
    if isinstance(e, TraceError):
      raise
    raise TraceError(f"{path} is not a readable trace: {e}") from None
  shape = arrays["inputs"].shape
  for index, layer in layers.items():
    if layer["experts"].shape[:2] != shape:
      raise TraceError(f"{path}: layer{index}.npz has {layer['experts'].shape[:2]} tokens, "
                       f"tokens.npz {shape}")
  return Trace(meta=meta, layers=layers, path=path, **arrays)


def trace_meta(config, *, step: int, vocab_size: int, loss: float, workdir: str,
               split: str, num_batches: int) -> dict[str, Any]:
  """trace.json's fields for a trace of a model of `config` (`choices` is
  filled from the arrays)."""
  moe = config.model.moe
  typed = routing.MoEConfig.from_mapping(moe.to_dict())
  return {"format": FORMAT, "workdir": workdir, "step": int(step), "split": split,
          "num_batches": int(num_batches), "batch_size": int(config.train.batch_size),
          "seq_len": int(config.train.seq_len), "vocab_size": int(vocab_size),
          "router": moe.router,
          "num_experts": typed.experts, "top_k": typed.k,
          "moe_layers": model_lib.model_config(config).moe_layers,
          "dtype": config.model.dtype, "devices": jax.device_count(),
          "eval/loss": float(loss)}


class ReplayDataset:
  """A run's dataset whose training batches are a trace's, with its experts
  (`config.train.replay_trace`): step s trains on the trace's batch s mod
  its batch count, every MoE layer sending each token to the recorded
  experts (weighted by the current routers, so gradients reach them as in
  R3). Everything else (eval batches, vocabulary, entropies) is `base`'s."""

  def __init__(self, trace: Trace, base, config):
    self._base = base
    self._batches = trace.replay_batches(config, base.vocab_size)
    self.trace = trace

  def __getattr__(self, name):
    return getattr(self._base, name)

  def train_batch(self, step: int) -> dict[str, Any]:
    return self._batches[step % len(self._batches)]

  def train_iterator(self) -> data_base.StepIterator:
    return data_base.StepIterator(self.train_batch)
