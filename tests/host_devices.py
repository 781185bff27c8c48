"""The environment of a test subprocess with N host CPU devices.

The device count of a JAX process is fixed when its backend starts, so
multi-device tests run subprocesses. They keep the test run's XLA_FLAGS
(tests/conftest.py: the compile options of the whole run) and add the count.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNT = "--xla_force_host_platform_device_count"


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
  """os.environ with `devices` CPU devices and this checkout first on PYTHONPATH."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_COUNT)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_COUNT}={devices}"])
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  return env
