"""Every Python block of the README runs as written, each in a fresh process.

A block may read the run of a README command above it (`/tmp/shakespeare`,
trained by the shakespeare command); the test trains a 4-step miniature of
that config and puts its folder in the path's place.
"""

import pathlib
import re
import subprocess
import sys

import pytest

from moejax import train as train_lib

import host_devices  # tests/host_devices.py: the environment of N host devices

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE_DIR = REPO.parent / "shared" / "data" / "tiny_shakespeare"
RUNS = {"/tmp/shakespeare": "shakespeare"}  # a README path -> the config that writes it


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The README's runs, in miniature: {README path: a trained workdir}."""
  if not (SHAKESPEARE_DIR / "input.txt").exists():
    pytest.skip(f"no {SHAKESPEARE_DIR}/input.txt (the ../shared data folder beside the clone)")
  base = tmp_path_factory.mktemp("readme_runs")
  sys.path.insert(0, str(REPO / "configs"))
  try:
    import shakespeare  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = shakespeare.get_config()
  config.data.manual_dir = str(SHAKESPEARE_DIR)
  config.model.update(d_model=32, num_layers=2, num_heads=4)
  config.model.moe.expert_hidden = 32
  config.train.update(steps=4, batch_size=8, seq_len=32, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=1, checkpoint_every=4)
  train_lib.train_and_evaluate(config, str(base / "shakespeare"))
  return {path: str(base / name) for path, name in RUNS.items()}


def test_the_readme_has_python_blocks():
  assert len(python_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, runs):
  block = python_blocks()[index]
  for path, workdir in runs.items():
    block = block.replace(f'"{path}"', repr(workdir))
  done = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=host_devices.subprocess_env(1))
  assert done.returncode == 0, f"README python block {index}:\n{block}\n{done.stderr[-3000:]}"
