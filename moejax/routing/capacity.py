"""Expert capacity: how many slots each expert has in each routing group."""

import math

# Capacities are rounded up; products such as 1.1 * 10 are not exact in binary
# floating point (11.000000000000002) and would otherwise round up one slot too
# far. Rounding to this many decimals first removes that noise.
_CAPACITY_DECIMALS = 9


def _ceil(value: float) -> int:
  return math.ceil(round(value, _CAPACITY_DECIMALS))


def is_dropless(capacity_factor: float) -> bool:
  """capacity_factor == 0 selects dropless token choice (no capacity)."""
  return capacity_factor == 0


def round_up(capacity: int, multiple: int) -> int:
  """`capacity` rounded up to a multiple of `multiple` (vmoe's `multiple_of`,
  `vmoe.moe.compute_capacity`, default 4 there; 1 here = no rounding)."""
  return capacity + (-capacity) % multiple


def token_choice_capacity(*, num_tokens: int, num_experts: int, top_k: int,
                          capacity_factor: float, min_capacity: int,
                          rounding: int = 1) -> int:
  """Slots per expert per group for token-choice routing.

  GShard (Lepikhin et al. 2020, Algorithm 1) / Switch Transformer (Fedus et al.
  2021, eq. 3 "expert capacity = tokens per batch / experts * capacity factor"),
  with the top-k factor of GShard:
      C = max(min_capacity, ceil(capacity_factor * K * S / E)),
  then rounded up to a multiple of `rounding`. vmoe computes
  ceil(capacity_factor * S * K / E) rounded up to a multiple of 4
  (`capacity_multiple_of`), so `rounding=4` (with min_capacity=1) gives its
  capacity exactly; flaxformer's (`min_expert_capacity`, no rounding) is
  `rounding=1` with min_capacity set to its `min_expert_capacity`.
  Dropless (capacity_factor == 0): C = S, since a token picks each expert at
  most once, so no expert can receive more than S assignments per group.
  """
  if is_dropless(capacity_factor):
    return num_tokens
  return round_up(max(min_capacity,
                      _ceil(capacity_factor * top_k * num_tokens / num_experts)), rounding)


def expert_choice_capacity(*, num_tokens: int, num_experts: int,
                           capacity_factor: float, min_capacity: int,
                           rounding: int = 1) -> int:
  """Tokens each expert takes per group for expert-choice routing.

  Expert Choice (Zhou et al. 2022, §3.1: k = n * c / e, c the capacity factor,
  i.e. the average number of experts per token):
      C = min(S, max(min_capacity, ceil(capacity_factor * S / E))),
  with the max rounded up to a multiple of `rounding` before the min.
  """
  return min(num_tokens, round_up(
      max(min_capacity, _ceil(capacity_factor * num_tokens / num_experts)), rounding))
