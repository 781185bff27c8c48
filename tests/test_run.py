"""The run directory's one owner (`moejax.run.Run`) and the readers that go
through it: fallback past damaged or vanishing checkpoints, atomic records,
output paths checked before the work, nothing written into the run read, and
the health check's refusal of a dead state."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import evaluate as evaluate_lib
from moejax import model as model_lib
from moejax import run as run_lib
from moejax import train as train_lib
from moejax.train import config as config_lib
from moejax.train import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, group_by="batch")
  config.train.update(seq_len=16, batch_size=8, steps=6, warmup_steps=1, log_every=3,
                      eval_every=3, eval_batches=2, checkpoint_every=3, keep_checkpoints=3)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run with checkpoints at steps 3 and 6 and its logged metrics."""
  workdir = str(tmp_path_factory.mktemp("run") / "run")
  train_lib.train_and_evaluate(_tiny_config(), workdir)
  return workdir, run_lib.Run(workdir).metrics()


def _copy(workdir, tmp_path):
  target = str(tmp_path / "copy")
  subprocess.run(["cp", "-r", workdir, target], check=True)
  return target


def test_run_knows_its_steps_config_and_records(trained):
  workdir, records = trained
  run = run_lib.Run(workdir)
  assert run.steps == [3, 6] and run.newest_step == 6
  step, config = run.newest()
  assert step == 6 and config.model.d_model == 32
  steps, losses = run.series("eval/loss")
  assert steps == [3, 6] and losses[-1] == records[-1]["eval/loss"]
  assert run.summary()["params"]["total"] > 0


def test_evaluate_equals_the_logged_eval_with_every_layer_metric(trained):
  workdir, records = trained
  result = evaluate_lib.evaluate(workdir)
  logged = records[-1]
  assert result["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)
  # One evaluator: the loop logs what the CLI reports, layer by layer.
  for key, value in result.items():
    if key.startswith("eval/layer"):
      assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("damage", ["truncated_arrays", "garbage_metadata"])
def test_readers_fall_back_from_a_damaged_newest_checkpoint(trained, tmp_path, capsys,
                                                             damage):
  workdir = _copy(trained[0], tmp_path)
  state = os.path.join(workdir, "checkpoints", "6", "state")
  if damage == "truncated_arrays":  # orbax/TensorStore fails reading them
    for root, _, files in os.walk(state):
      if os.path.basename(root) == "d":
        for name in files:
          with open(os.path.join(root, name), "r+b") as f:
            f.truncate(8)
  else:  # found before orbax runs
    with open(os.path.join(state, "_METADATA"), "w") as f:
      f.write("{garbage")
  result = evaluate_lib.evaluate(workdir)
  assert result["step"] == 3
  err = capsys.readouterr().err
  assert os.path.join("checkpoints", "6") in err and "trying an older one" in err
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # nothing moved


def test_a_checkpoint_deleted_while_read_falls_back(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  run = run_lib.Run(workdir)

  def read(step):
    if step == 6:  # a live run with keep_checkpoints=1 rotates it away
      subprocess.run(["rm", "-rf", run.checkpoint_dir(6)], check=True)
      raise FileNotFoundError(run.checkpoint_dir(6))
    return "params"
  assert run.read_newest(read) == (3, "params")


def test_no_readable_checkpoint_is_one_message(tmp_path):
  run = run_lib.Run(str(tmp_path / "missing"))
  with pytest.raises(run_lib.RunError, match="is not a directory"):
    run.newest()
  os.makedirs(tmp_path / "empty")
  with pytest.raises(run_lib.RunError, match="holds no checkpoint"):
    run_lib.Run(str(tmp_path / "empty")).newest()


def test_garbage_config_json_names_the_file(tmp_path):
  workdir = tmp_path / "old"
  os.makedirs(workdir / "checkpoints" / "5" / "state")
  (workdir / "config.json").write_text("{not json")
  with pytest.raises(run_lib.RunError, match=r"config\.json is not readable JSON"):
    run_lib.Run(str(workdir)).newest()


def test_records_are_written_atomically(tmp_path):
  path = str(tmp_path / "record.json")
  run_lib.write_json(path, {"a": 1})
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["record.json"]  # no temporary file left


def test_tools_never_write_into_the_run_they_read(trained):
  workdir, _ = trained
  before = sorted(os.path.relpath(os.path.join(r, n), workdir)
                  for r, _, names in os.walk(workdir) for n in names)
  evaluate_lib.evaluate(workdir, num_batches=1)
  after = sorted(os.path.relpath(os.path.join(r, n), workdir)
                 for r, _, names in os.walk(workdir) for n in names)
  assert after == before and not os.path.exists(os.path.join(workdir, "data_cache"))


@pytest.mark.parametrize("module,extra", [("moejax.evaluate", []),
                                          ("moejax.generate", ["--max_new_tokens=2"])])
def test_bad_out_path_is_refused_before_the_work(trained, module, extra):
  workdir, _ = trained
  proc = subprocess.run(
      [sys.executable, "-m", module, f"--workdir={workdir}", "--out=/no/such/dir/x.json",
       *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --out=/no/such/dir/x.json: the folder /no/such/dir does not exist"]


def test_generate_bounds_max_new_tokens(trained):
  from moejax import generate as generate_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"max_new_tokens must be an integer in \[1, 65536\]"):
    generate_lib.SamplingOptions(max_new_tokens=10**9).check()


def test_health_check_refuses_a_dead_state():
  """A collapsed state (every weight zero: every logit equal, loss ln V, every
  gradient exactly zero) is finite but dead; a fresh one is alive."""
  config = _tiny_config()
  vocab = 64
  graphdef, params = nnx.split(model_lib.build(config, vocab, nnx.Rngs(0)))
  check = steps_lib.make_health_check(graphdef, seed=0)
  batch = {"inputs": jnp.ones((8, 16), jnp.int32), "targets": jnp.arange(128).reshape(8, 16)
           % vocab, "weights": jnp.ones((8, 16), jnp.float32)}
  entropy = jnp.asarray(np.log(vocab) - 0.5, jnp.float32)
  finite, alive = check(params, {}, batch, jnp.int32(0), entropy)
  assert bool(finite) and bool(alive)
  dead = jax.tree.map(jnp.zeros_like, params)
  finite, alive = check(dead, {}, batch, jnp.int32(0), entropy)
  assert bool(finite) and not bool(alive)
