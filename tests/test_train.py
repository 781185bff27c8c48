"""Training loop: outputs, exact resume, preemption, non-finite stop, config errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moejax.train import config as config_lib
from moejax.train import optim
from moejax import train as trainer

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny model and run: seconds per run on 2 CPU cores.
SMALL = {
    "train.steps": 12, "train.batch_size": 8, "train.seq_len": 32, "train.warmup_steps": 2,
    "train.log_every": 2, "train.eval_every": 6, "train.eval_batches": 2,
    "train.checkpoint_every": 4, "model.num_layers": 2, "model.d_model": 32,
    "model.num_heads": 2, "model.moe.num_experts": 4, "model.moe.expert_hidden": 32,
    "data.vocab_size": 64, "data.num_domains": 2,
    "model.moe.group_by": "batch",  # causal routing, as configs/default.py
}


def small_config(**overrides):
  config = config_lib.default_config()
  for key, value in {**SMALL, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def cli(workdir, *flags):
  """The main-job command line with SMALL overrides."""
  overrides = [f"--config.{k}={v}" for k, v in SMALL.items()]
  return [sys.executable, "-m", "moejax.main", "--config=configs/default.py",
          f"--workdir={workdir}", *overrides, *flags]


def checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_run_writes_outputs_and_metrics(tmp_path):
  record = trainer.train_and_evaluate(small_config(), str(tmp_path))
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
  required = {"train/loss", "train/aux_loss", "train/z_loss", "train/dropped_fraction",
              "train/expert_load_max_over_mean", "perf/tokens_per_sec", "perf/mfu",
              "data/entropy_floor"}
  for r in records[1:]:
    assert required <= set(r), required - set(r)
  assert {r["step"] for r in records if "eval/loss" in r} == {6, 12}
  assert all(np.isfinite(v) for r in records for v in r.values())
  assert record["train/loss"] == records[-1]["train/loss"]
  # Top-2 of 4 experts: the balanced aux loss is 1 and the max/mean load >= 1.
  assert records[-1]["train/aux_loss"] >= 0.99
  assert records[-1]["train/expert_load_max_over_mean"] >= 1.0

  summary = json.loads((tmp_path / "summary.json").read_text())
  params = summary["params"]
  assert params["total"] > params["active_per_token"] > 0
  assert params["embedding"] + params["non_embedding"] == params["total"]
  assert summary["train_flops_per_token"] > 6 * params["active_per_token"] - 6 * params["embedding"]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # keep_checkpoints=3 of the saves at 4, 8, 12.
  assert checkpoint_steps(tmp_path) == [4, 8, 12]


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "dense", "sinkhorn",
                                    "hash", "soft_moe"])
def test_every_router_trains_with_one_flag(tmp_path, router):
  overrides = {"model.moe.router": router, "train.steps": 4, "train.eval_every": 4,
               "model.moe.group_by": "batch"}  # causal routing, as configs/default.py
  if router == "switch":
    overrides["model.moe.top_k"] = 1
  trainer.train_and_evaluate(small_config(**overrides), str(tmp_path))
  records = read_metrics(tmp_path)
  assert records[-1]["step"] == 4 and np.isfinite(records[-1]["eval/loss"])
  assert ("train/layer1/max_violation" in records[-1]) == (router != "dense")
  assert os.path.exists(os.path.join(tmp_path, "plots", "expert_load_step4.png")) == (
      router != "dense")
  if router != "dense":  # synthetic_mixture has domains: the specialization measure
    assert 0 <= records[-1]["eval/expert_domain_mi"] <= 1.0  # <= log2(2 domains)
  else:
    assert records[-1]["train/aux_loss"] == 0.0


@pytest.mark.parametrize("options", [
    {"model.moe.score_fn": "softmax_topk", "model.moe.capacity_rounding": 4,
     "model.moe.aux_loss_type": "global_batch", "model.moe.expert_dropout": 0.2},
    {"model.moe.score_fn": "sigmoid", "model.moe.num_groups": 2, "model.moe.top_groups": 1,
     "model.moe.routed_scaling_factor": 2.0, "model.moe.aux_loss_type": "importance",
     "model.moe.bias_update_rate": 1e-3},
    {"model.moe.aux_loss_type": "sequence", "model.moe.capacity_factor": 0.0,
     "model.moe.dispatch": "dropless"},
])
def test_routing_options_train_with_flags(tmp_path, options):
  trainer.train_and_evaluate(small_config(**{"train.steps": 4, "train.eval_every": 4,
                                             "model.moe.group_by": "batch", **options}),
                             str(tmp_path))
  records = read_metrics(tmp_path)
  assert records[-1]["step"] == 4 and np.isfinite(records[-1]["eval/loss"])


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  full = tmp_path / "full"
  trainer.train_and_evaluate(small_config(), str(full))

  # A run that "died" after its step-8 checkpoint: stop it at step 8 by
  # training a copy with steps=12 but deleting what came after step 8.
  part = tmp_path / "part"
  trainer.train_and_evaluate(small_config(), str(part))
  for step in checkpoint_steps(part):
    if step > 8:
      subprocess.run(["rm", "-rf", str(part / "checkpoints" / str(step))], check=True)
  # metrics logged after the checkpoint (steps 10, 12) are still in the file.
  trainer.train_and_evaluate(small_config(), str(part))
  assert [r["step"] for r in read_metrics(part)] == [r["step"] for r in read_metrics(full)]
  full_losses, part_losses = train_losses(full), train_losses(part)
  for step in (10, 12):
    np.testing.assert_allclose(part_losses[step], full_losses[step], rtol=1e-6)


def test_first_steps_of_a_longer_schedule_then_extended_match_full_run(tmp_path):
  full = tmp_path / "full"
  trainer.train_and_evaluate(small_config(), str(full))
  # The first 8 of 12 steps (schedule_steps=12), then extended to all 12.
  part = tmp_path / "part"
  trainer.train_and_evaluate(small_config(**{"train.steps": 8, "train.schedule_steps": 12}),
                             str(part))
  assert max(checkpoint_steps(part)) == 8
  trainer.train_and_evaluate(small_config(), str(part))
  full_losses, part_losses = train_losses(full), train_losses(part)
  assert sorted(part_losses) == sorted(full_losses)
  for step in full_losses:
    np.testing.assert_allclose(part_losses[step], full_losses[step], rtol=1e-6)


def test_schedule_steps_sets_the_learning_rate_curve():
  base = {"train.learning_rate": 1.0, "train.warmup_steps": 30,
          "train.final_lr_fraction": 0.1, "train.steps": 20}
  schedule = optim.learning_rate_schedule(small_config(**base, **{
      "train.schedule_steps": 300}).train)
  np.testing.assert_allclose(schedule(20), 20 / 30, rtol=1e-6)  # still warming up
  np.testing.assert_allclose(schedule(300), 0.1, rtol=1e-6)
  np.testing.assert_allclose(schedule(400), 0.1, rtol=1e-6)  # constant after
  config_lib.validate_config(small_config(**base, **{"train.schedule_steps": 300}))
  # warmup_steps past the schedule (steps=20 < warmup 30): the run is all
  # warmup, on the same line as the first 20 steps of the longer schedule.
  config_lib.validate_config(small_config(**base))
  short = optim.learning_rate_schedule(small_config(**base).train)
  for step in (0, 10, 20):
    np.testing.assert_allclose(short(step), schedule(step), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(short(45), 1.0, rtol=1e-6)  # holds at the peak after warmup
  with pytest.raises(ValueError, match="config.train.warmup_steps"):
    config_lib.validate_config(small_config(**{**base, "train.warmup_steps": -1}))
  with pytest.raises(ValueError, match="config.train.schedule_steps"):
    config_lib.validate_config(small_config(**base, **{"train.schedule_steps": 0}))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  trainer.train_and_evaluate(small_config(**{"train.steps": 4}), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [4]
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")}
  exploding = small_config(**{"train.steps": 12, "train.learning_rate": 1e30,
                              "train.warmup_steps": 0, "train.grad_clip": 0.0,
                              "train.resume_with_changes": True})
  with pytest.raises(trainer.NonFiniteLossError, match=r"checkpoint \(step 4\) is kept"):
    trainer.train_and_evaluate(exploding, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [4]
  after = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")}
  assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--config.model.moe.top_k=9", "top_k"),
    ("--config.train.seq_len=0", "config.train.seq_len"),
    ("--config.data.name=no_such_dataset", "config.data.name"),
    ("--config.data.manual_dir=/no/such/dir", "config.data.manual_dir"),
    ("--config.train.no_such_key=1", "no_such_key"),
])
def test_invalid_config_fails_before_compiling_and_keeps_checkpoints(tmp_path, flag, message):
  trainer.train_and_evaluate(small_config(**{"train.steps": 4}), str(tmp_path))
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  result = subprocess.run(cli(tmp_path, flag), cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  assert after == before


def test_validate_config_rejects_unknown_and_bad_keys():
  config = small_config()
  config.train.unlisted = 3
  with pytest.raises(ValueError, match="config.train.unlisted"):
    config_lib.validate_config(config)
  with pytest.raises(ValueError, match="config.model.dtype"):
    config_lib.validate_config(small_config(**{"model.dtype": "float16"}))
  with pytest.raises(ValueError, match="config.mesh.expert"):
    config_lib.validate_config(small_config(**{"mesh.expert": 0}))


SHAKESPEARE = REPO.parent / "shared" / "data" / "tiny_shakespeare"


@pytest.mark.slow
@pytest.mark.skipif(not (SHAKESPEARE / "input.txt").exists(),
                    reason="needs ../shared/data/tiny_shakespeare beside the clone")
def test_shakespeare_config_builds_offline_and_trains(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("shakespeare", REPO / "configs" / "shakespeare.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.manual_dir = str(SHAKESPEARE)
  config.data.data_dir = str(tmp_path / "tfds")
  for key, value in SMALL.items():
    if not key.startswith("data."):
      section, *rest = key.split(".")
      node = config[section]
      for part in rest[:-1]:
        node = node[part]
      node[rest[-1]] = value
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  records = read_metrics(tmp_path / "run")
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  # Byte-level: 257 symbols; the loss starts near log(257) = 5.55 and falls.
  assert records[0]["train/loss"] > records[-1]["train/loss"]
  assert records[-1]["eval/loss"] < np.log(257)
  assert abs(summary["data/unigram_entropy"] - 3.31) < 0.01
