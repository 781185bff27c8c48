"""Test-session setup: quick XLA compiles and one persistent compilation cache.

The suite is bound by XLA:CPU compile time (small models, many distinct
programs). The run compiles with `--xla_backend_optimization_level=0` (LLVM
without its optimization passes; unless XLA_FLAGS already sets a level): the
same programs, about half the compile time, and numbers equal to an optimized
build's to about 1e-7 relative (measured: a 5-step train/loss 4.3863192 vs
4.3863196). Every xdist worker and subprocess inherits XLA_FLAGS
(tests/host_devices.py adds a device count to it).

Many tests train the same small configs again (resume, faults, the CLI in a
subprocess, notebooks in quick mode), each process compiling the same
programs. The test run gets a fresh cache folder (made by the controlling
process, removed at its end) that every xdist worker and every subprocess
inherits through JAX_COMPILATION_CACHE_DIR, so a program compiled once loads
from disk afterwards. Entries are keyed by the program, jax/XLA versions and
flags, and device layout, so results are those of a fresh compile.

The test install has libtpu (tests/test_aot.py compiles for a TPU topology);
jax would try to start a TPU backend at every import, and log its failure, so
the run and its subprocesses compute on CPU (JAX_PLATFORMS=cpu unless set).
"""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
_OWNED = "MOEJAX_TEST_OWNS_JAX_CACHE"
_QUICK_COMPILE = "--xla_backend_optimization_level=0"


def pytest_configure(config):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if not hasattr(config, "workerinput") and "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_QUICK_COMPILE}".strip()
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    # An xdist worker (the controller set the environment it inherited), or
    # a cache the caller chose.
    return
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moejax-test-jax-cache-")
  os.environ[_OWNED] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  os.environ.update(_CACHE_ENV)
  if "jax" in sys.modules:  # imported before this hook: read its env vars already
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  if hasattr(config, "workerinput"):
    return
  owned = os.environ.pop(_OWNED, None)
  if owned and owned == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    shutil.rmtree(owned, ignore_errors=True)
