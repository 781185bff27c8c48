"""The tools after training on a multi-device host: `moejax.evaluate` and
`moejax.generate` (the README's command) as subprocesses on 2 and 8 host
devices, reading a run trained on one device (the readers' mesh policy,
`moejax.model.reader_mesh`)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from moejax import run as run_lib
from moejax import train as train_lib
from moejax.train import config as config_lib

import host_devices  # tests/host_devices.py: the environment of N host devices

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE_DIR = REPO.parent / "shared" / "data" / "tiny_shakespeare"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  if not (SHAKESPEARE_DIR / "input.txt").exists():
    pytest.skip(f"no {SHAKESPEARE_DIR}/input.txt (the ../shared data folder beside the clone)")
  base = tmp_path_factory.mktemp("mesh_tools")
  config = config_lib.default_config()
  config.data.update(name="tiny_shakespeare", data_dir=str(base / "tfds"),
                     manual_dir=str(SHAKESPEARE_DIR))
  config.model.update(d_model=32, num_layers=2, num_heads=4)
  config.model.moe.update(expert_hidden=32, num_experts=8, group_by="batch")
  config.train.update(seq_len=32, batch_size=8, steps=4, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=2, checkpoint_every=4)
  workdir = str(base / "run")
  train_lib.train_and_evaluate(config, workdir)
  return workdir


def _tool(module: str, devices: int, *args: str) -> subprocess.CompletedProcess:
  env = host_devices.subprocess_env(devices)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 8])
def test_generate_samples_with_the_readme_command(text_run, tmp_path, devices):
  out = tmp_path / "samples.json"
  done = _tool("moejax.generate", devices, f"--workdir={text_run}", "--prompt=ROMEO:",
               "--prompt=JULIET:", "--max_new_tokens=8", "--temperature=0.8", "--top_k=40",
               "--seed=0", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  assert [s["prompt"] for s in record["samples"]] == ["ROMEO:", "JULIET:"]
  assert all(isinstance(s["continuation"], str) for s in record["samples"])


@pytest.mark.slow
def test_evaluate_on_8_devices_equals_the_logged_eval(text_run):
  done = _tool("moejax.evaluate", 8, f"--workdir={text_run}", "--scramble_after=16")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout)
  logged = run_lib.Run(text_run).metrics()[-1]
  assert result["step"] == 4 and "eval/future_leak" in result  # rows rolled across shards
  assert result["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-5)
  assert result["eval/layer1/max_violation"] == pytest.approx(
      logged["eval/layer1/max_violation"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_a_study_runs_on_8_devices(tmp_path):
  """A study's miniature end to end on 8 host devices: its sweep trains on the
  default mesh, `moejax.evaluate` evaluates every point (with the
  future-scrambling probe, whose row roll crosses the batch shards)."""
  done = _tool("experiments.studies.expert_choice", 8, f"--workdir={tmp_path}",
               "--scale=quick")
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "results" / "summary.json").read_text())
  assert summary["scale"] == "quick"
  assert all(c["future_leak"]["n"] > 0 for c in summary["configs"].values())
