"""Sweep definitions (configs/sweeps/) and the runner (experiments/sweep.py)."""

import csv
import functools
import json
import os
import subprocess
import sys
import warnings

import pytest
from flax import nnx

from experiments import sweep
from moejax import routing
from moejax.nn import NonCausalRoutingWarning
from moejax.scaling import accounting
from moejax import model as model_lib
from moejax import train as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = ("experts", "granularity", "routers", "capacity")
SCALES = ("tiny", "small", "medium")


@functools.lru_cache(maxsize=None)
def _points(name: str, scale: str) -> tuple[sweep.Point, ...]:
  return tuple(sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", f"{name}.py:{scale}")))


def _built_nonembed(config) -> tuple[int, float]:
  """(total, active per token) non-embedding parameters of the abstract model:
  every parameter but the embedding and the untied output kernel; active
  counts a routed expert's parameters times the fraction of experts a token
  uses (K g of E g; capacity_factor of E g for expert choice)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NonCausalRoutingWarning)
    model = nnx.eval_shape(lambda: model_lib.build(
        config, accounting.config_vocab_size(config), nnx.Rngs(0)))
  total = active = 0.0
  moe = routing.MoEConfig.from_mapping(config.model.moe.to_dict())
  num_experts = moe.experts
  per_token = routing.get_router(moe.router).experts_per_token(moe)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[0] in ("embed", "output_kernel"):
      continue
    size = variable.get_value().size
    total += size
    active += size * per_token / num_experts if "experts" in path else size
  return int(total), active


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("scale", SCALES)
def test_points_validate_and_match_the_built_model(name, scale):
  points = _points(name, scale)  # load_sweep validates every config
  assert len({point.name for point in points}) == len(points) >= 4
  for point in points:
    counts = accounting.counts_from_config(point.config)
    total, active = _built_nonembed(point.config)
    assert counts["params_total_nonembed"] == total, point.name
    assert counts["params_active_nonembed"] == pytest.approx(active, rel=1e-12), point.name


@pytest.mark.parametrize("name", SWEEPS)
def test_unknown_scale_lists_the_valid_ones(name):
  module = sweep.load_module(os.path.join(ROOT, "configs", "sweeps", f"{name}.py"), name)
  assert module.BASE_CONFIG == "configs/default.py"
  with pytest.raises(ValueError, match=r"valid scales: \['medium', 'small', 'tiny'\]"):
    module.get_sweep("huge")


@pytest.mark.parametrize("scale", SCALES)
def test_granularity_keeps_parameters_fixed(scale):
  by_shape = {}
  for point in _points("granularity", scale):
    counts = accounting.counts_from_config(point.config)
    shape = (point.config.model.d_model, point.config.train.steps)
    by_shape.setdefault(shape, []).append((point.config.model.moe.granularity, counts))
  sizes = {d_model for d_model, _ in by_shape}
  budgets = {steps for _, steps in by_shape}
  assert len(sizes) >= 2 and len(budgets) >= 2
  for runs in by_shape.values():
    assert [g for g, _ in runs] == [1, 2, 4, 8]
    # Everything but the routers (D E g per MoE layer) is the same for every G.
    # The routers stay small: < 3% of all, < 8% of the active parameters at G = 8.
    for key, bound in (("params_total_nonembed", 0.03), ("params_active_nonembed", 0.08)):
      without_router = {counts[key] - counts["params_router"] for _, counts in runs}
      assert len(without_router) == 1, key
      assert max(counts["params_router"] / counts[key] for _, counts in runs) < bound
    assert len({counts["params_experts"] for _, counts in runs}) == 1


def test_experts_sweep_fixes_active_parameters():
  points = _points("experts", "tiny")
  assert [point.name for point in points] == ["dense", "e2", "e4", "e8", "e16", "e32"]
  counts = [accounting.counts_from_config(point.config) for point in points]
  # Per-token FLOPs differ only by the router (D E per layer), 6 FLOPs per weight.
  for count in counts[1:]:
    extra = count["flops_per_token"] - counts[0]["flops_per_token"]
    assert extra == 6 * count["params_router"]


MICRO_SWEEP = '''
BASE_CONFIG = {base!r}

def get_sweep(scale):
  shared = {{"model.d_model": 16, "model.num_layers": 1, "model.num_heads": 2,
            "model.moe.expert_hidden": 16, "model.moe.top_k": 1,
            "train.seq_len": 16, "train.batch_size": 4, "train.steps": 3,
            "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 3,
            "train.eval_batches": 1, "train.checkpoint_every": 3}}
  return [("e2", {{**shared, "model.moe.num_experts": 2}}),
          ("e4", {{**shared, "model.moe.num_experts": {e4}}})]
'''


def _micro_sweep(tmp_path, e4=4) -> str:
  path = tmp_path / "micro.py"
  path.write_text(MICRO_SWEEP.format(base=os.path.join(ROOT, "configs", "default.py"),
                                     e4=e4))
  return f"{path}:test"


def _fake_train(calls):
  """A train_fn that writes what the runner reads, and records its calls."""
  def train(config, workdir):
    calls.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    kwargs = model_lib.architecture(config, accounting.config_vocab_size(config))
    summary = {"params": accounting.param_counts(**kwargs),
               "train_flops_per_token": accounting.train_flops_per_token(
                   **kwargs, seq_len=config.train.seq_len)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": config.train.steps, "train/loss": 1.0,
                          "eval/loss": 2.0}) + "\n")
  return train


def test_runner_writes_results_and_resumes(tmp_path):
  points = sweep.load_sweep(_micro_sweep(tmp_path), sweep.parse_extra(["train.steps=2"]))
  assert [point.config.train.steps for point in points] == [2, 2]
  assert [point.overrides["train.steps"] for point in points] == [2, 2]
  workdir = str(tmp_path / "run")
  path = sweep.run_sweep(points, workdir)  # real training, 2 steps each
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert [row["name"] for row in rows] == ["e2", "e4"]
  required = ["name", "model.moe.num_experts", "train.steps", "num_experts", "top_k",
              "granularity", "params_total_nonembed", "params_active_nonembed",
              "flops_per_token", "tokens_seen", "train_loss", "eval_loss", "wall_seconds"]
  assert set(required) <= set(rows[0])
  assert [row["num_experts"] for row in rows] == ["2", "4"]
  assert rows[0]["tokens_seen"] == str(2 * 4 * 16)
  for row, point in zip(rows, points):
    counts = accounting.counts_from_config(point.config)
    assert int(row["params_total_nonembed"]) == counts["params_total_nonembed"]
    assert float(row["flops_per_token"]) == counts["flops_per_token"]
    metrics = os.path.join(workdir, "points", point.name, "metrics.jsonl")
    with open(metrics) as f:
      last = [json.loads(line) for line in f][-1]
    assert float(row["eval_loss"]) == pytest.approx(last["eval/loss"])
    assert float(row["train_loss"]) == pytest.approx(last["train/loss"])

  calls = []
  os.remove(path)
  sweep.run_sweep(points, workdir, train_fn=_fake_train(calls))
  assert calls == []  # both points finished: nothing trains again
  assert os.path.exists(path)  # results.csv is rewritten from the done.json files


def test_shards_split_the_points(tmp_path):
  points = sweep.load_sweep(_micro_sweep(tmp_path))
  workdir = str(tmp_path / "run")
  calls = []
  path = sweep.run_sweep(points, workdir, shard=sweep.parse_shard("0/2"),
                         train_fn=_fake_train(calls))
  assert calls == ["e2"]
  with open(path) as f:
    assert [row["name"] for row in csv.DictReader(f)] == ["e2"]
  sweep.run_sweep(points, workdir, shard=(1, 2), train_fn=_fake_train(calls))
  assert calls == ["e2", "e4"]
  with open(path) as f:  # both shards' points, in sweep order
    assert [row["name"] for row in csv.DictReader(f)] == ["e2", "e4"]


def test_a_bad_point_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"sweep point 1 \(e4\).*num_experts"):
    sweep.load_sweep(_micro_sweep(tmp_path, e4=0))
  with pytest.raises(ValueError, match="unknown config key config.model.moe.experts"):
    sweep.load_sweep(_micro_sweep(tmp_path), {"model.moe.experts": 2})
  with pytest.raises(ValueError, match="config.train.steps"):
    sweep.load_sweep(_micro_sweep(tmp_path), {"train.steps": "many"})
  with pytest.raises(ValueError, match="shard"):
    sweep.parse_shard("2/2")
  with pytest.raises(ValueError, match="key=value"):
    sweep.parse_extra(["train.steps"])


def test_garbage_in_a_points_files_is_named(tmp_path):
  points = sweep.load_sweep(_micro_sweep(tmp_path))
  workdir = tmp_path / "run"
  sweep.run_sweep(points, str(workdir), train_fn=_fake_train([]))
  done = workdir / "points" / "e2" / sweep.DONE
  done.write_bytes(b"\xb9\x00 not json")
  with pytest.raises(ValueError, match=f"{done} is not readable JSON"):
    sweep.run_sweep(points, str(workdir), train_fn=_fake_train([]))

  def train_then_garbage(config, point_dir):
    _fake_train([])(config, point_dir)
    with open(os.path.join(point_dir, "metrics.jsonl"), "a") as f:
      f.write("\x00\x00 disk garbage\n")
  metrics = tmp_path / "other" / "points" / "e2" / "metrics.jsonl"
  with pytest.raises(ValueError, match=f"{metrics} line 2 is not JSON"):
    sweep.run_sweep(points, str(tmp_path / "other"), train_fn=train_then_garbage)


# The sweep CLI with a point that SIGTERM stops (its StopSignals block is the
# trainer's), then a second SIGTERM after the point's save, before exit.
_SWEEP_WITH_SECOND_SIGTERM = '''
import json, os, runpy, signal, sys, time
from moejax import train
from moejax.train import signals

def preempted_train(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with signals.StopSignals(lambda signum: RuntimeError("startup")) as stop:
    stop.deferred = True
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # stopped at step 1
      f.write(json.dumps({"step": 1, "train/loss": 1.0}) + "\\n")
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.5)

train.train_and_evaluate = preempted_train
sys.argv[0] = "experiments.sweep"
runpy.run_module("experiments.sweep", run_name="__main__", alter_sys=True)
'''


def test_sweep_second_sigterm_after_a_points_save_keeps_exit_status_0(tmp_path):
  command = [sys.executable, "-c", _SWEEP_WITH_SECOND_SIGTERM,
             f"--sweep={_micro_sweep(tmp_path)}", f"--workdir={tmp_path / 'run'}"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  assert "SIGTERM ignored" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "points" / "e2" / sweep.DONE).exists()  # stopped early
