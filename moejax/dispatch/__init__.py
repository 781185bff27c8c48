"""Dispatch: how routed tokens reach the experts and come back.

Every dispatcher maps `(x [G, S, D], routing, experts) -> [G, S, D]` (see
`dispatch.base`); given the same routing all give the same outputs and
gradients.
"""

import functools
from typing import Callable

from moejax.dispatch.base import Experts
from moejax.dispatch.dropless import dropless_dispatch
from moejax.dispatch.einsum import einsum_dispatch
from moejax.dispatch.gather import gather_dispatch
from moejax.dispatch.grouped_matmul import grouped_matmul

DISPATCHERS: dict[str, Callable] = {
    "gather": gather_dispatch,
    "einsum": einsum_dispatch,
    "dropless": dropless_dispatch,
}


def get_dispatcher(name: str, *, grouped_matmul: str = "auto") -> Callable:
  """The dispatcher called `name`; ValueError listing the valid names otherwise.

  `grouped_matmul` (`config.model.moe.grouped_matmul`) is bound into the
  dispatcher that runs one ("dropless"); the others have no use for it.
  """
  if name not in DISPATCHERS:
    raise ValueError(f"unknown dispatch {name!r}; valid dispatchers: {sorted(DISPATCHERS)}")
  if DISPATCHERS[name] is dropless_dispatch:
    return functools.partial(dropless_dispatch, grouped_matmul=grouped_matmul)
  return DISPATCHERS[name]


__all__ = ["DISPATCHERS", "Experts", "dropless_dispatch", "einsum_dispatch",
           "gather_dispatch", "get_dispatcher", "grouped_matmul"]
