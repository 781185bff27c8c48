"""moejax: Mixture-of-Experts language models in JAX/Flax."""

import platform

__version__ = "0.1.0"

# (Python, jax) pairs the whole test suite passed with (README "Install").
TESTED_VERSIONS = (("3.11", "0.10.2"), ("3.12", "0.11.2"))


def versions_note() -> str:
  """This interpreter's Python and jax, and whether moejax was tested with them."""
  import jax  # pylint: disable=import-outside-toplevel
  python = ".".join(platform.python_version_tuple()[:2])
  tested = ", ".join(f"jax {j} on Python {p}" for p, j in TESTED_VERSIONS)
  verdict = "tested" if (python, jax.__version__) in TESTED_VERSIONS else "untested"
  return (f"jax {jax.__version__} on Python {python} ({verdict}; moejax's tests passed with "
          f"{tested})")
