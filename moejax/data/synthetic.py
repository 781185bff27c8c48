"""synthetic_mixture: D sparse random Markov sources with an exactly known entropy.

Every sequence comes from one of D domains (uniform prior w_d = 1/D). Domain d
is a first-order Markov chain over the shared vocabulary of V tokens in which
each state s has K = `branching` successors with Dirichlet(1) probabilities
P_d(. | s). The successors of a state are its next state on a domain-specific
random ring (a random cyclic order of all V tokens; this makes the chain
irreducible) plus K - 1 other distinct random states, and the first state of
the ring always has a self-loop when K >= 2 (this makes it aperiodic). So the
stationary distribution pi_d exists, is unique, and power iteration converges
to it. Sequences start in pi_d, hence every position is marginally stationary.

Entropy rate (Cover & Thomas, Elements of Information Theory, Thm. 4.2.4, for a
stationary Markov chain: H = sum_s pi(s) H(P(. | s))), averaged over domains:
    entropy_floor = sum_d w_d sum_s pi_d(s) H(P_d(. | s))   [nats/token].
This is the expected per-token loss of a model that knows the domain and the
chains. A model that must infer the domain from the prefix pays a little more
at the start of each sequence (about log D nats in total per sequence while
the domain is ambiguous), so the best achievable loss on finite sequences is
slightly above the floor, approaching it as seq_len grows.

Randomness is counter-based (Philox), keyed by (seed, stream): the chains, the
training rows and the held-out rows use different streams, and row r of step s
draws from counter (r, s) only. Any process can therefore produce any row of
any batch without producing the others.
"""

from typing import Any, Optional, Sequence

import numpy as np

from moejax.data import base

_TRAIN_STREAM, _EVAL_STREAM, _CHAIN_STREAM = 0, 1, 2
# Power iteration stops when the L1 change of every pi_d is below this.
_STATIONARY_TOLERANCE = 1e-14
_STATIONARY_MAX_ITERATIONS = 100_000


def _distinct_offsets(rng: np.random.Generator, num_rows: int, count: int,
                      high: int) -> np.ndarray:
  """<int64>[num_rows, count]: per row, `count` distinct integers in [1, high).

  Vectorized sampling without replacement: the j-th value is uniform over the
  high - 1 - j values not yet taken, found by skipping past the taken ones in
  increasing order.
  """
  taken = np.empty((num_rows, 0), np.int64)
  for j in range(count):
    value = rng.integers(1, high - j, size=num_rows)
    for earlier in np.sort(taken, axis=1).T:
      value = value + (value >= earlier)
    taken = np.concatenate([taken, value[:, None]], axis=1)
  return taken


def _entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
  """Shannon entropy in nats along `axis`, with 0 log 0 = 0."""
  safe = np.where(probs > 0, probs, 1.0)
  return -np.sum(probs * np.log(safe), axis=axis)


class MarkovMixture:
  """D sparse first-order Markov chains over V tokens, K successors per state.

  Attributes:
    successors: <int32>[D, V, K] successor tokens of each state.
    probs: <float64>[D, V, K] their probabilities (rows sum to 1).
    stationary: <float64>[D, V] stationary distribution of each chain.
    domain_entropy_rates: <float64>[D] nats/token of each chain.
    entropy_rate: nats/token, the mean of `domain_entropy_rates`.
    unigram_entropy: nats/token of the token distribution mean_d pi_d.
  """

  def __init__(self, successors: np.ndarray, probs: np.ndarray):
    self.num_domains, self.vocab_size, self.branching = successors.shape
    self.successors = successors.astype(np.int32)
    self.probs = probs.astype(np.float64)
    self.stationary = self._stationary_distributions()
    self.domain_entropy_rates = np.sum(self.stationary * _entropy(self.probs), axis=-1)
    self.entropy_rate = float(np.mean(self.domain_entropy_rates))
    self.unigram_entropy = float(_entropy(self.stationary.mean(axis=0)))

    num_domains, vocab_size = self.num_domains, self.vocab_size
    # Flat state ids d * V + s let one gather serve rows of different domains.
    offsets = (np.arange(num_domains) * vocab_size)[:, None, None]
    self._next_flat = (self.successors + offsets).reshape(num_domains * vocab_size, -1)
    cdf = np.cumsum(self.probs, axis=-1)
    self._transition_cdf = cdf[..., :-1].reshape(num_domains * vocab_size, -1)
    start_cdf = np.cumsum(self.stationary, axis=-1)
    start_cdf[:, -1] = 1.0  # so that every u in [0, 1) falls inside its domain
    # Domain d's CDF shifted to [d, d + 1]: one searchsorted for all rows.
    self._start_cdf_flat = (start_cdf + np.arange(num_domains)[:, None]).ravel()

  @classmethod
  def random(cls, *, vocab_size: int, num_domains: int, branching: int,
             rng: np.random.Generator) -> "MarkovMixture":
    """Draws the D chains (see the module docstring for their structure)."""
    if not 1 <= branching <= vocab_size:
      raise ValueError(f"branching={branching} must be in [1, vocab_size={vocab_size}]")
    num_states = num_domains * vocab_size
    ring_order = np.stack([rng.permutation(vocab_size) for _ in range(num_domains)])
    # Successor k of the state at ring position q sits at ring position
    # q + 1 + offset_k: offset 0 is the ring edge, offset V - 1 is a self-loop.
    offsets = np.concatenate(
        [np.zeros((num_states, 1), np.int64),
         _distinct_offsets(rng, num_states, branching - 1, vocab_size)], axis=1)
    offsets = offsets.reshape(num_domains, vocab_size, branching)
    if branching >= 2:
      has_loop = np.any(offsets[:, 0] == vocab_size - 1, axis=-1)
      offsets[~has_loop, 0, -1] = vocab_size - 1
    positions = (np.arange(vocab_size)[None, :, None] + 1 + offsets) % vocab_size
    successors_by_position = np.take_along_axis(
        ring_order[:, :, None], positions.reshape(num_domains, -1, 1), axis=1
    ).reshape(num_domains, vocab_size, branching)
    # Re-index rows from ring position to state id.
    successors = np.empty_like(successors_by_position)
    successors[np.arange(num_domains)[:, None], ring_order] = successors_by_position
    weights = rng.gamma(1.0, size=(num_domains, vocab_size, branching))  # Dirichlet(1)
    probs = weights / weights.sum(axis=-1, keepdims=True)
    return cls(successors, probs)

  def _stationary_distributions(self) -> np.ndarray:
    """pi_d = pi_d P_d by power iteration on the sparse chains: <float64>[D, V]."""
    num_domains, vocab_size = self.num_domains, self.vocab_size
    targets = (self.successors + (np.arange(num_domains) * vocab_size)[:, None, None]).ravel()
    pi = np.full((num_domains, vocab_size), 1.0 / vocab_size)
    for _ in range(_STATIONARY_MAX_ITERATIONS):
      flow = (pi[:, :, None] * self.probs).ravel()
      new_pi = np.bincount(targets, weights=flow, minlength=num_domains * vocab_size)
      new_pi = new_pi.reshape(num_domains, vocab_size)
      new_pi /= new_pi.sum(axis=-1, keepdims=True)
      change = np.abs(new_pi - pi).sum(axis=-1).max()
      pi = new_pi
      if change < _STATIONARY_TOLERANCE:
        return pi
    raise RuntimeError("power iteration for the stationary distributions did not converge "
                       f"in {_STATIONARY_MAX_ITERATIONS} iterations (change {change:.3g})")

  def sample(self, uniforms: np.ndarray, domains: Optional[Sequence[int]] = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sequences from uniforms <float64>[B, N + 1] in [0, 1).

    Column 0 picks the domain (uniformly among `domains`, default all),
    column 1 the start state (from pi_d), column t + 1 the transition into
    token t.

    Returns:
      tokens <int32>[B, N] and domain <int32>[B].
    """
    batch, num_columns = uniforms.shape
    length = num_columns - 1
    vocab_size = self.vocab_size
    choices = np.arange(self.num_domains) if domains is None else np.asarray(domains)
    domain = choices[np.minimum((uniforms[:, 0] * len(choices)).astype(np.int64),
                                len(choices) - 1)]
    state = np.searchsorted(self._start_cdf_flat, domain + uniforms[:, 1], side="right")
    state = np.minimum(state, (domain + 1) * vocab_size - 1)  # guards float rounding
    flat_states = np.empty((batch, length), np.int64)
    flat_states[:, 0] = state
    for t in range(1, length):
      choice = np.sum(uniforms[:, t + 1, None] >= self._transition_cdf[state], axis=-1)
      state = self._next_flat[state, choice]
      flat_states[:, t] = state
    tokens = flat_states - domain[:, None] * vocab_size
    return tokens.astype(np.int32), domain.astype(np.int32)

  def log_prob_transitions(self, tokens: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """<float64>[B, N - 1]: log P_d(tokens[:, t + 1] | tokens[:, t]) under the true chain."""
    current, following = tokens[:, :-1], tokens[:, 1:]
    d = domain[:, None]
    match = self.successors[d, current] == following[..., None]   # [B, N - 1, K]
    prob = np.sum(np.where(match, self.probs[d, current], 0.0), axis=-1)
    with np.errstate(divide="ignore"):
      return np.log(prob)


class SyntheticMixtureDataset(base.Dataset):
  """Batches from a `MarkovMixture` built from `seed`; infinite, no download.

  `entropy_floor` is the exact entropy rate (module docstring), `unigram_entropy`
  the exact entropy of the stationary token distribution. Training rows and
  eval rows come from different Philox streams, so eval sequences are held out
  (fresh draws from the same sources). Batches carry "domain" <int32>[B_local].
  """

  def __init__(self, *, vocab_size: int, num_domains: int, branching: int,
               seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               domains: Optional[Sequence[int]] = None):
    super().__init__(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    self.source = MarkovMixture.random(
        vocab_size=vocab_size, num_domains=num_domains, branching=branching,
        rng=base.philox(self.seed, _CHAIN_STREAM))
    self.vocab_size = vocab_size
    # Rows come from `domains` only (None: all); the floor is theirs.
    self.domains = None if domains is None else tuple(int(d) for d in domains)
    selected = list(range(num_domains)) if self.domains is None else list(self.domains)
    self.entropy_floor = float(np.mean(self.source.domain_entropy_rates[selected]))
    self.unigram_entropy = float(_entropy(self.source.stationary[selected].mean(axis=0)))
    self.info: dict[str, Any] = {
        "name": "synthetic_mixture", "tokenizer": None, "vocab_size": vocab_size,
        "num_domains": num_domains, "branching": branching,
        "domains": None if self.domains is None else list(self.domains),
        "entropy_floor": self.entropy_floor, "unigram_entropy": self.unigram_entropy,
        "domain_entropy_rates": [float(h) for h in self.source.domain_entropy_rates],
        "num_train_tokens": None,  # an infinite stream
        "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
        "seed": self.seed,
    }

  def _batch(self, stream: int, step: int) -> base.Batch:
    uniforms = np.stack([base.philox(self.seed, stream, row, step).random(self.seq_len + 2)
                         for row in self.local_rows])
    tokens, domain = self.source.sample(uniforms, self.domains)
    batch = base.lm_batch(tokens)
    batch["domain"] = domain
    return batch

  def train_batch(self, step: int) -> base.Batch:
    return self._batch(_TRAIN_STREAM, step)

  def eval_batches(self, num_batches: int) -> list[base.Batch]:
    self._check_num_batches(num_batches)
    return [self._batch(_EVAL_STREAM, i) for i in range(num_batches)]
