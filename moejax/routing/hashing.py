"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models",
§3): a token is sent to experts chosen by a fixed random function of its
vocabulary id, with no learned router and hence no balancing loss.

Letters: G groups, S tokens per group, E experts, K choices per token.
"""

import jax
import jax.numpy as jnp
import numpy as np

# 2^32 / golden ratio, odd: multiples of it by distinct integers are distinct
# mod 2^32 and spread over the whole word (Knuth's multiplicative hashing).
_GOLDEN = 0x9E3779B9
# Separates the seed's stream from id 0 / seed 0 (an all-zero input is a fixed
# point of the finalizer below).
_SEED_OFFSET = 0x7F4A7C15


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (Appleby 2011, `fmix32`) on uint32.

  Each xor-shift and each odd multiply mod 2^32 is invertible, so the map is a
  bijection of uint32 with full avalanche: flipping one input bit flips each
  output bit with probability ~1/2.
  """
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _expert_keys(token_ids: jax.Array, num_experts: int, seed) -> jax.Array:
  """<uint32>[..., E] pseudo-random key of every (token id, expert) pair."""
  ids = jax.lax.bitcast_convert_type(token_ids.astype(jnp.int32), jnp.uint32)
  seed_key = _fmix32(jnp.asarray(seed, jnp.int32).astype(jnp.uint32)
                     * jnp.uint32(_GOLDEN) + jnp.uint32(_SEED_OFFSET))
  # Hashing the id with the seed key first makes the map per seed unrelated,
  # not a shift of the same map.
  token_key = _fmix32(ids ^ seed_key)
  # (e + 1) * golden is distinct for every e < 2^32, and fmix32 is a bijection,
  # so the E keys of one token are pairwise distinct: top-k has no ties.
  expert_offset = (jnp.arange(1, num_experts + 1, dtype=jnp.uint32)
                   * jnp.uint32(_GOLDEN))
  return _fmix32(token_key[..., None] + expert_offset)


def hash_experts(token_ids: jax.Array, num_experts: int, top_k: int,
                 seed: int = 0) -> jax.Array:
  """K distinct experts per token, a fixed pseudo-random function of its id.

  Each (id, expert) pair gets a 32-bit key from an integer mixing hash of
  (id, seed, expert); the token's experts are the K largest keys, best first.
  Nothing is stored, so any vocabulary size works, and equal ids get equal
  experts wherever they occur (any group, position, batch or host). Because
  the keys of one id behave as E independent uniform draws, the ranking is a
  uniformly random permutation of the experts, so each of the K choices (and
  the expert load) is uniform over experts in expectation over ids. Balance
  over a real corpus follows the id frequencies: a very frequent id sends all
  its occurrences to the same K experts (Hash Layers also study a hash
  balanced on id frequencies).

  Args:
    token_ids: <int32>[G, S] vocabulary ids (any integer shape works; ids
      outside int32 wrap).
    num_experts: E, static.
    top_k: K <= E, static.
    seed: selects one of many unrelated maps (a Python int or <int32>[]).

  Returns:
    <int32>[G, S, K] expert indices in [0, E), pairwise distinct along K.
  """
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, "
                     f"num_experts={num_experts}")
  # One independent hash per choice could pick an expert twice; ranking all E
  # keys of the token gives K distinct experts by construction.
  _, experts = jax.lax.top_k(_expert_keys(token_ids, num_experts, seed), top_k)
  return experts.astype(jnp.int32)


def balanced_table(counts: np.ndarray, num_experts: int, top_k: int,
                   seed: int = 0) -> np.ndarray:
  """Hash Layers' balanced assignment (Roller et al. 2021, §3, "Balanced"):
  token ids in order of decreasing frequency (ties in a `seed`-shuffled
  order) each go to the K experts with the least total frequency so far, so
  the expert loads of the counted stream are as even as its most frequent ids
  allow. Ids never counted keep the random map (`hash_experts`).

  Args:
    counts: <int>[V] occurrences of every id in the training data.
    num_experts, top_k: E, K.
    seed: breaks ties between equally frequent ids and equally loaded experts.

  Returns:
    <int32>[V, K]: row v holds id v's experts, least loaded first.
  """
  counts = np.asarray(counts, np.float64)
  table = np.array(hash_experts(jnp.arange(len(counts), dtype=jnp.int32), num_experts,
                                  top_k, seed))
  rng = np.random.default_rng(seed)
  shuffled = rng.permutation(len(counts))
  order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
  loads = np.zeros(num_experts)
  tiebreak = rng.random(num_experts) * 1e-9  # never outweighs a count of 1
  for token in order[counts[order] > 0]:
    experts = np.argsort(loads + tiebreak, kind="stable")[:top_k]
    table[token] = experts
    loads[experts] += counts[token]
  return table.astype(np.int32)
