"""The same run on 1 device, 8 host devices and 2 processes; resume across meshes.

Every run is a `python -m moejax.main` subprocess: the device count of a JAX
process is fixed at start-up (XLA_FLAGS), and two processes talk through
jax.distributed on 127.0.0.1 with gloo CPU collectives.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import host_devices  # tests/host_devices.py: the environment of N host devices

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small enough for seconds per run; 8 sequences = 8 routing groups.
SMALL = {
    "train.steps": 8, "train.batch_size": 8, "train.seq_len": 32, "train.warmup_steps": 2,
    "train.log_every": 1, "train.eval_every": 4, "train.eval_batches": 1,
    "train.checkpoint_every": 4, "model.num_layers": 2, "model.d_model": 32,
    "model.num_heads": 2, "model.moe.num_experts": 4, "model.moe.expert_hidden": 32,
    "data.vocab_size": 64, "data.num_domains": 2,
}


def run(workdir, *flags, devices=1, process=None, env_extra=None, check=True):
  env = host_devices.subprocess_env(devices, **(env_extra or {}))
  args = [sys.executable, "-m", "moejax.main", "--config=configs/default.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in SMALL.items()], *flags]
  if process is not None:
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_same_losses(a, b, rtol=1e-4):
  assert sorted(a) == sorted(b)
  for step in a:
    np.testing.assert_allclose(b[step], a[step], rtol=rtol, err_msg=f"step {step}")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  run(workdir)
  return losses(workdir)


@pytest.mark.slow
def test_eight_devices_expert_parallel_match_one_device(tmp_path, single_device):
  run(tmp_path, "--config.mesh.data=2", "--config.mesh.expert=4", devices=8)
  assert_same_losses(single_device, losses(tmp_path))


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path, single_device):
  port = free_port()
  procs = [run(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}", "--config.mesh.expert=2", devices=2, process=i)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert_same_losses(single_device, losses(tmp_path))


@pytest.mark.slow
def test_resume_on_one_device_from_an_eight_device_checkpoint(tmp_path, single_device):
  # Train to the step-4 checkpoint on a (2, 4, 1) mesh, then finish on 1 device.
  run(tmp_path, "--config.mesh.data=2", "--config.mesh.expert=4", "--config.train.steps=8",
      devices=8)
  checkpoints = tmp_path / "checkpoints"
  subprocess.run(["rm", "-rf", str(checkpoints / "8")], check=True)
  run(tmp_path)
  assert_same_losses(single_device, losses(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (("--config.mesh.data=3",), "config.mesh"),
    (("--config.mesh.data=1", "--config.mesh.expert=8", "--config.model.moe.num_experts=4"),
     "num_experts"),
])
def test_bad_mesh_fails_before_compiling(tmp_path, flags, message):
  result = run(tmp_path, *flags, devices=8, check=False)
  assert result.returncode == 1
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "checkpoints").exists()
