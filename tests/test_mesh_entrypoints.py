"""Every shipped config trains on 8 host devices, expert parallel, and
`moejax.evaluate` reads the run back on them.

One subprocess (this file run as a script: the device count is fixed when jax
starts) trains each config in configs/ for 2 steps, shrunk for the CPU (width,
depth, expert width, vocabulary, batch) but with its own seq_len, group_size,
group_by and routing, on the mesh named in `CONFIGS`; then evaluates the
default run with `moejax.evaluate` on its own reader mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_mesh_entrypoints.py OUT
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from shared_data import SHAKESPEARE_DIR  # tests/shared_data.py

REPO = pathlib.Path(__file__).resolve().parents[1]

# config file -> (mesh data x expert, the keys shrunk for the CPU)
CONFIGS = {
    "default": ((1, 8), {"model.num_layers": 1, "train.batch_size": 8}),
    "shakespeare": ((1, 8), {"model.num_layers": 1, "train.batch_size": 8}),
    # group_size 1024 = two sequences of 512: each of the 8 batch shards holds
    # 2 rows, one group.
    "lm1b": ((4, 2), {"model.num_layers": 2, "model.num_heads": 4,
                      "train.batch_size": 16}),
}
SMALL = {"model.d_model": 32, "model.moe.expert_hidden": 16, "train.steps": 2,
         "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 2,
         "train.eval_batches": 1, "train.checkpoint_every": 2}


def shipped_config(name: str, data_dir: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  (data, expert), shrunk = CONFIGS[name]
  config.update_from_flattened_dict({**SMALL, **shrunk, "mesh.data": data,
                                     "mesh.expert": expert, "mesh.model": 1})
  if config.data.name == "lm1b":  # SentencePiece on TFDS lm1b: not offline
    config.data.update(name="synthetic_mixture", tokenizer="byte", vocab_size=64,
                       eval_split="validation")
  elif config.data.name == "tiny_shakespeare":
    config.data.update(data_dir=data_dir, manual_dir=str(SHAKESPEARE_DIR))
  else:
    config.data.vocab_size = 64
  return config


def worker(out: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  results = {}
  for name in CONFIGS:
    config = shipped_config(name, os.path.join(out, "tfds"))
    results[name] = train.train_and_evaluate(config, os.path.join(out, name))
  results["evaluate"] = evaluate_lib.evaluate(os.path.join(out, "default"))
  print(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("mesh"))],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_trains_expert_parallel_on_8_devices(runs, name):
  metrics = runs[name]  # the last logged values: step 2 and its evaluation
  for key in ("train/loss", "eval/loss", "train/grad_norm"):
    assert 0 < metrics[key] < 10, (key, metrics)
  assert 0 <= metrics["train/dropped_fraction"] < 1, metrics  # routed, with a capacity


@pytest.mark.slow
def test_evaluate_on_8_devices_measures_what_training_logged(runs):
  # Training evaluated on its (1, 8, 1) mesh, `evaluate` on its reader mesh:
  # the same parameters and batches, so the same loss.
  assert runs["evaluate"]["eval/loss"] == pytest.approx(runs["default"]["eval/loss"],
                                                        rel=1e-5)


if __name__ == "__main__":
  worker(sys.argv[1])
