"""The dataset contract: deterministic global batches, sharded by process.

The global training batch at step s is a pure function of (seed, s, data
config, seq_len, global batch size): it does not depend on how often an
iterator was created or restored, so resuming is `set_state({"step": s})`.
Process p of P receives rows [p * B_local, (p + 1) * B_local) of it, with
B_local = B / P, and computes only those rows; the union over processes is
exactly the batch a single process sees.

A batch is a dict of numpy arrays for this process:
  "inputs":  <int32>[B_local, L] tokens,
  "targets": <int32>[B_local, L] the next tokens (inputs shifted left by one),
  "weights": <float32>[B_local, L] 1 where the target counts in the loss,
  plus dataset-specific fields (synthetic_mixture adds "domain" <int32>[B_local]).
"""

import abc
from typing import Any, Callable, Optional

import numpy as np

Batch = dict[str, np.ndarray]


def is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def philox(seed: int, stream: int, row: int = 0, step: int = 0) -> np.random.Generator:
  """An independent generator for (seed, stream, row, step).

  Philox (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") is
  counter-based: the key selects the stream, the upper counter words select
  the row and step, and draws advance the lowest word, which no row exhausts.
  So any row of any step is available without generating the others.
  """
  key = np.array([seed % 2**64, stream], np.uint64)
  counter = np.array([0, 0, row, step], np.uint64)
  return np.random.Generator(np.random.Philox(key=key, counter=counter))


def lm_batch(windows: np.ndarray, weights: Optional[np.ndarray] = None) -> Batch:
  """Token windows <int>[B, L + 1] -> inputs/targets/weights of length L."""
  windows = np.asarray(windows, np.int32)
  inputs, targets = windows[:, :-1], windows[:, 1:]
  if weights is None:
    weights = np.ones(inputs.shape, np.float32)
  return {"inputs": np.ascontiguousarray(inputs), "targets": np.ascontiguousarray(targets),
          "weights": np.asarray(weights, np.float32)}


def batch_spec(global_batch_size: int, seq_len: int, sharding: Any = None
               ) -> dict[str, Any]:
  """The shapes, dtypes and layout of a global training batch (`lm_batch`'s
  fields), with nothing read or allocated: what a step is lowered with ahead
  of time (`moejax.aot`). `sharding` (e.g. `parallel.batch_sharding(mesh)`)
  lays every field out; None leaves the layout to the compiler."""
  import jax  # pylint: disable=import-outside-toplevel (batches are numpy)
  shape = (global_batch_size, seq_len)
  return {"inputs": jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding),
          "targets": jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding),
          "weights": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)}


class StepIterator:
  """Training batches from step `step` on; the whole state is the next step.

  `next(it)` returns `batch_at(step)` and advances. `get_state()` is a small
  JSON-serializable dict to store with a checkpoint; after
  `set_state({"step": s})` the next batch is the one an uninterrupted iterator
  yields at step s.
  """

  def __init__(self, batch_at: Callable[[int], Batch], step: int = 0):
    self._batch_at = batch_at
    self._step = self._checked_step(step)

  @staticmethod
  def _checked_step(step: Any) -> int:
    if not is_int(step) or step < 0:
      raise ValueError(f"iterator step must be an integer >= 0, got {step!r}")
    return int(step)

  @property
  def step(self) -> int:
    return self._step

  def __iter__(self) -> "StepIterator":
    return self

  def __next__(self) -> Batch:
    batch = self._batch_at(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "step" not in state:
      raise ValueError(f"iterator state must be a dict with a 'step', got {state!r}")
    self._step = self._checked_step(state["step"])


class Dataset(abc.ABC):
  """Base class: batch geometry and process sharding; subclasses make rows.

  Attributes:
    vocab_size: the model's vocabulary size (every token id is below it).
    entropy_floor: nats/token the best possible model approaches, if known.
    unigram_entropy: nats/token of the unigram distribution of the train data.
    info: JSON-serializable facts for summary.json.
  """

  vocab_size: int
  entropy_floor: Optional[float]
  unigram_entropy: float
  info: dict[str, Any]

  def __init__(self, *, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size),
                        ("process_count", process_count)):
      if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not is_int(seed):
      raise ValueError(f"seed must be an integer, got {seed!r}")
    if not is_int(process_index) or not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    self.seq_len = int(seq_len)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    start = self.process_index * self.local_batch_size
    # Global row indices of this process within every global batch.
    self.local_rows = np.arange(start, start + self.local_batch_size, dtype=np.int64)

  @abc.abstractmethod
  def train_batch(self, step: int) -> Batch:
    """This process's rows of the global training batch at `step`."""

  @abc.abstractmethod
  def eval_batches(self, num_batches: int) -> list[Batch]:
    """This process's rows of the held-out batches, identical on every call."""

  def train_iterator(self) -> StepIterator:
    """An iterator over `train_batch(0), train_batch(1), ...`."""
    return StepIterator(self.train_batch)

  @staticmethod
  def _check_num_batches(num_batches: int) -> None:
    if not is_int(num_batches) or num_batches < 1:
      raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
