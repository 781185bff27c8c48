"""The study tools: moejax.evaluate, experiments.compare_runs, fit diagnosis,
interleaved sweep shards and the shared study code (experiments/studies)."""

import csv
import json
import os
import subprocess
import sys
import warnings

import ml_collections
import numpy as np
import pytest

from experiments import compare_runs
from experiments import fit_scaling
from experiments import sweep
from experiments.studies import common
from moejax import evaluate as evaluate_lib
from moejax.nn import NonCausalRoutingWarning
from moejax.scaling import laws
from moejax.train import config as config_lib
from moejax import train as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("experts", "capacity", "expert_choice", "z_loss", "granularity", "bias_balancing",
           "hash_layers", "routing_stability")


def _tiny_config(**moe) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=1, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, **moe)
  config.train.update(seq_len=16, batch_size=8, steps=6, warmup_steps=1, log_every=3,
                      eval_every=6, eval_batches=2, checkpoint_every=6)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two trained runs: top-2 grouped by position (causal) and expert choice
  grouped by sequence (leaks the future)."""
  base = tmp_path_factory.mktemp("runs")
  made = {}
  for name, moe in (("topk", dict(router="topk", top_k=2, group_by="batch")),
                    ("ec", dict(router="expert_choice", top_k=2, capacity_factor=2.0,
                                group_by="sequence"))):
    workdir = str(base / name)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", NonCausalRoutingWarning)
      made[name] = (workdir, trainer.train_and_evaluate(_tiny_config(**moe), workdir))
  return made


# ------------------------------------------------------------------ evaluate


def test_evaluate_as_trained_reproduces_the_training_evaluation(runs):
  workdir, final = runs["topk"]
  result = evaluate_lib.evaluate(workdir)
  assert result["step"] == 6 and result["num_batches"] == 2
  assert result["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
  assert result["eval/layer0/max_violation"] == pytest.approx(
      final["eval/layer0/max_violation"], rel=1e-6)
  assert result["moe_layers"] == [0] and np.array(result["expert_load"]).shape == (1, 4)
  assert 0.0 <= result["eval/dropped_fraction"] < 1.0


def test_evaluate_capacity_settings(runs):
  workdir, _ = runs["topk"]
  dropless = evaluate_lib.evaluate(workdir, dropless=True)
  assert dropless["dropless"] and dropless["eval/dropped_fraction"] == 0.0
  small = evaluate_lib.evaluate(workdir, eval_capacity_factor=0.25)
  large = evaluate_lib.evaluate(workdir, eval_capacity_factor=4.0)
  assert small["eval/dropped_fraction"] > large["eval/dropped_fraction"]
  # With room for every choice, a capacity is the same computation as dropless.
  assert large["eval/dropped_fraction"] == 0.0
  assert large["eval/loss"] == pytest.approx(dropless["eval/loss"], rel=1e-5)


def test_scrambled_future_measures_the_routing_leak(runs):
  causal = evaluate_lib.evaluate(runs["topk"][0], scramble_after=8)
  with pytest.warns(NonCausalRoutingWarning, match="router='expert_choice'"):  # on purpose
    leaky = evaluate_lib.evaluate(runs["ec"][0], scramble_after=8)
  # Causal routing: the first half's loss cannot depend on the second half.
  assert causal["eval/future_leak"] == pytest.approx(0.0, abs=1e-6)
  assert abs(leaky["eval/future_leak"]) > 1e-4
  # Regrouped causally, expert choice no longer leaks.
  regrouped = evaluate_lib.evaluate(runs["ec"][0], group_by="batch", scramble_after=8)
  assert regrouped["group_by"] == "batch"
  assert regrouped["eval/future_leak"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_refuses_bad_settings_with_one_message(runs, tmp_path):
  with pytest.raises(ValueError, match="either --eval_capacity_factor or --dropless"):
    evaluate_lib.evaluate(runs["topk"][0], dropless=True, eval_capacity_factor=1.0)
  with pytest.raises(ValueError, match="do not apply to this run.*token choice"):
    evaluate_lib.evaluate(runs["ec"][0], dropless=True)
  with pytest.raises(ValueError, match="holds no checkpoint"):
    evaluate_lib.evaluate(str(tmp_path))
  with pytest.raises(ValueError, match="scramble_after"):
    evaluate_lib.evaluate(runs["topk"][0], scramble_after=16)


@pytest.mark.slow
def test_evaluate_cli(runs, tmp_path):
  out = tmp_path / "eval.json"
  done = subprocess.run([sys.executable, "-m", "moejax.evaluate", f"--workdir={runs['topk'][0]}",
                         "--num_batches=1", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert json.loads(out.read_text())["num_batches"] == 1
  bad = subprocess.run([sys.executable, "-m", "moejax.evaluate", f"--workdir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")


# -------------------------------------------------------------- compare_runs


def _fake_run(path, seed, lr, eval_losses, train_losses):
  os.makedirs(path)
  config = {"seed": seed, "train": {"learning_rate": lr, "batch_size": 2, "seq_len": 4,
                                    "steps": 20, "log_every": 10},
            "mesh": {"data": -1}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({"train_flops_per_token": 100.0}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step, train_loss in zip((10, 20), train_losses):
      record = {"step": step, "train/loss": train_loss}
      if step == 20:
        record["eval/loss"] = eval_losses
      f.write(json.dumps(record) + "\n")


def test_compare_runs_groups_seeds_and_tabulates(tmp_path):
  _fake_run(tmp_path / "sweep" / "points" / "a_s0", 0, 1e-3, 2.0, (3.0, 2.2))
  _fake_run(tmp_path / "sweep" / "points" / "a_s1", 1, 1e-3, 2.2, (3.2, 2.4))
  _fake_run(tmp_path / "b_s0", 0, 3e-3, 1.5, (2.5, 1.7))
  out = tmp_path / "out"
  rows = compare_runs.compare([str(tmp_path / "sweep"), str(tmp_path / "b_*")], str(out))
  by_label = {row["config"]: row for row in rows}
  assert set(by_label) == {"learning_rate=0.001", "learning_rate=0.003"}
  a = by_label["learning_rate=0.001"]
  assert a["eval_loss_n"] == 2 and a["seed_values"] == "0 1"
  assert a["eval_loss_mean"] == pytest.approx(2.1)
  assert a["eval_loss_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
  assert by_label["learning_rate=0.003"]["eval_loss_std"] == 0.0
  assert (out / "compare.png").stat().st_size > 10_000
  table = (out / "final_eval_loss.md").read_text()
  assert "| learning_rate=0.001 | 2 | 2.1000 ± 0.1414 |" in table
  with open(out / "final_eval_loss.csv") as f:
    assert len(list(csv.DictReader(f))) == 2


def test_compare_runs_refuses_what_is_not_a_run(tmp_path):
  with pytest.raises(ValueError, match="no such directory"):
    compare_runs.find_runs([str(tmp_path / "missing")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a run directory"):
    compare_runs.find_runs([str(tmp_path / "empty")])


def test_compare_runs_leaves_out_a_run_with_garbage_metrics_and_says_so(tmp_path, capsys):
  _fake_run(tmp_path / "points" / "a_s0", 0, 1e-3, 2.0, (3.0, 2.2))
  _fake_run(tmp_path / "points" / "a_s1", 1, 1e-3, 2.2, (3.2, 2.4))
  _fake_run(tmp_path / "points" / "a_s2", 2, 1e-3, 9.0, (9.0, 9.0))  # broken below
  broken = tmp_path / "points" / "a_s2" / "metrics.jsonl"
  lines = broken.read_text().splitlines(keepends=True)
  broken.write_text(lines[0] + "\x00\x00 disk garbage\n" + "[1, 2]\n" + lines[1])
  rows = compare_runs.compare([str(tmp_path)], str(tmp_path / "out"))
  err = capsys.readouterr().err
  assert f"{broken} line 2: not JSON" in err
  assert f"{broken} line 3: not a record" in err
  assert "left out of the curves and averages" in err
  (row,) = rows
  # The average is that of the two good seeds (the broken run's 9.0 is not in it).
  assert row["seeds"] == 2 and row["seed_values"] == "0 1"
  assert row["eval_loss_mean"] == pytest.approx(2.1)
  assert row["note"] == "a_s2: 2 unparsable line(s) in metrics.jsonl, not averaged"
  table = (tmp_path / "out" / "final_eval_loss.md").read_text()
  assert "| 2 | 2.1000 ± 0.1414 |" in table and "a_s2: 2 unparsable" in table


def test_compare_runs_lists_a_run_with_empty_or_missing_metrics(tmp_path, capsys):
  _fake_run(tmp_path / "points" / "a_s0", 0, 1e-3, 2.0, (3.0, 2.2))
  _fake_run(tmp_path / "points" / "a_s1", 1, 1e-3, 2.2, (3.2, 2.4))
  _fake_run(tmp_path / "points" / "b_s0", 0, 3e-3, 1.5, (2.5, 1.7))
  _fake_run(tmp_path / "points" / "c_s0", 0, 1e-2, 1.5, (2.5, 1.7))
  (tmp_path / "points" / "b_s0" / "metrics.jsonl").write_text("")
  (tmp_path / "points" / "c_s0" / "metrics.jsonl").unlink()  # config.json only
  rows = compare_runs.compare([str(tmp_path)], str(tmp_path / "out"))
  err = capsys.readouterr().err
  assert "b_s0: metrics.jsonl is empty; left out" in err
  assert "c_s0: no metrics.jsonl; left out" in err
  by_label = {row["config"]: row for row in rows}
  assert set(by_label) == {"learning_rate=0.001", "learning_rate=0.003",
                           "learning_rate=0.01"}
  for label, name, why in (("learning_rate=0.003", "b_s0", "metrics.jsonl is empty"),
                           ("learning_rate=0.01", "c_s0", "no metrics.jsonl")):
    row = by_label[label]
    assert row["seeds"] == 0 and row["eval_loss_n"] == 0 and row["eval_loss_mean"] is None
    assert row["note"] == f"{name}: {why}, not averaged"
  table = (tmp_path / "out" / "final_eval_loss.md").read_text()
  assert "| learning_rate=0.003 | 0 | — | — | b_s0: metrics.jsonl is empty, not averaged |" \
      in table


def test_compare_runs_names_a_garbage_config_or_summary(tmp_path):
  _fake_run(tmp_path / "a_s0", 0, 1e-3, 2.0, (3.0, 2.2))
  for name in ("summary.json", "config.json"):
    (tmp_path / "a_s0" / name).write_bytes(b"\xb9\x00 not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'a_s0' / name} is not readable JSON"):
      compare_runs.compare([str(tmp_path / "a_s0")], str(tmp_path / "out"))


def test_mean_series_band_is_the_table_std(tmp_path):
  """One convention: the band of a curve and the ± of a table are the sample std."""
  rows = []
  for seed, final in enumerate((2.0, 2.2, 2.7)):
    name = f"x_s{seed}"
    (tmp_path / "runs" / name).mkdir(parents=True)
    records = [{"step": 10, "eval/loss": final + 1.0}, {"step": 20, "eval/loss": final}]
    (tmp_path / "runs" / name / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    rows.append({"name": name, "config": "x", "seed": seed, "status": "finished",
                 "eval_loss": final})
  steps, mean, band, n = common.mean_series(str(tmp_path), rows, "x", "eval/loss")
  table = common.by_config(rows, "eval_loss")["x"]
  assert list(steps) == [10, 20] and n == 3 == table["n"]
  assert mean[-1] == pytest.approx(table["mean"])
  # Sample std of 2.0, 2.2, 2.7: mean 2.3, squares 0.09 + 0.01 + 0.16 = 0.26,
  # / (3 - 1) = 0.13, sqrt = 0.36056 (the population std would be 0.29439).
  assert table["std"] == pytest.approx(0.36056, abs=1e-5)
  assert band[-1] == pytest.approx(table["std"]) and band[0] == pytest.approx(table["std"])
  # compare_runs' bands and table use the same convention.
  assert compare_runs.sample_std(np.array([[2.0], [2.2], [2.7]]))[0] == pytest.approx(
      table["std"])
  one = common.mean_series(str(tmp_path), rows[:1], "x", "eval/loss")
  assert list(one[2]) == [0.0, 0.0] and one[3] == 1


# ----------------------------------------------------------- fit diagnosis


def test_diagnose_flags_a_degenerate_krajewski_fit():
  fit = {"law": laws.KRAJEWSKI, "bootstrap": {"requested": 10, "succeeded": 10},
         "coefficients": {
             "c": {"value": 3e-5, "ci95": [2e-31, 3.0], "bounds": [0.0, 2.5]},
             "gamma": {"value": 3.0, "ci95": [2.9, 3.0], "bounds": [0.0, 3.0]},
             "alpha": {"value": 0.3, "ci95": [0.25, 0.35], "bounds": [0.0, 3.0]}}}
  kinds = {(w["kind"], w["coefficient"]) for w in laws.diagnose(fit, entropy_floor=1.07)}
  assert kinds == {("at_bound", "gamma"), ("wide_interval", "c"),
                   ("below_entropy_floor", "c")}
  fit["coefficients"]["c"].update(value=1.2, ci95=[1.1, 1.3])
  assert {w["coefficient"] for w in laws.diagnose(fit, 1.07)} == {"gamma"}


def test_a_good_fit_has_no_warnings():
  g = np.array([1.0, 2, 4, 8] * 3)
  loss = laws.granularity_term_loss({"l_inf": 1.5, "g": 0.4, "gamma": 0.7}, g)
  loss = loss * np.exp(0.002 * np.random.default_rng(0).standard_normal(g.size))
  fit = laws.fit_granularity_term(g, loss, bootstrap=30)
  assert fit["coefficients"]["gamma"]["value"] == pytest.approx(0.7, rel=0.15)
  assert laws.diagnose(fit, entropy_floor=1.07) == []
  with pytest.raises(ValueError, match="at least 3 distinct granularities"):
    laws.fit_granularity_term([1, 2, 1, 2], [2.0, 1.9, 2.1, 1.8])


def _granularity_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "params_active_nonembed", "tokens_seen", "granularity",
                     "flops_per_token", "eval_loss", "entropy_floor"])
    writer.writerows(rows)


def test_fit_scaling_warns_and_draws_the_entropy_floor(tmp_path):
  # Losses that do not depend on G at all: gamma is not identified.
  rng = np.random.default_rng(0)
  rows = []
  for n in (1e5, 3e5):
    for d in (1e6, 4e6):
      for g in (1, 2, 4, 8):
        loss = (1.2 + 30 / n**0.3 + 50 / d**0.3) * np.exp(0.01 * rng.standard_normal())
        rows.append([f"n{n}_d{d}_g{g}", n, d, g, 6 * n, loss, 1.07])
  results = tmp_path / "results.csv"
  _granularity_csv(results, rows)
  result = fit_scaling.run(str(results), laws.KRAJEWSKI, str(tmp_path / "fit"), bootstrap=20)
  assert result["entropy_floor"] == pytest.approx(1.07)
  assert result["warnings"], "a fit with no G dependence must be flagged"
  saved = json.loads((tmp_path / "fit" / "fit_krajewski.json").read_text())
  assert saved["warnings"] == result["warnings"]
  assert (tmp_path / "fit" / "krajewski_loss_vs_granularity.png").exists()


def test_fit_scaling_too_few_points_is_one_message(tmp_path):
  results = tmp_path / "results.csv"
  _granularity_csv(results, [[f"g{g}", 1e5, 1e6, g, 6e5, 2.0 - 0.01 * g, 1.07]
                             for g in (1, 2, 4, 8)])
  with pytest.raises(ValueError, match="has 4 runs; law=krajewski fits 7 coefficients"):
    fit_scaling.run(str(results), laws.KRAJEWSKI, str(tmp_path / "fit"))
  done = subprocess.run([sys.executable, "-m", "experiments.fit_scaling",
                         f"--results={results}", f"--out={tmp_path / 'fit'}"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert "needs at least 8 runs" in done.stderr


# ------------------------------------------------------------ sweep shards


def test_every_shard_covers_the_granularity_sweep():
  points = sweep.load_sweep(os.path.join(REPO, "configs", "sweeps", "granularity.py:tiny"))
  for count in (2, 4):
    shards = sweep.shard_assignment(points, count)
    assert sorted(np.bincount(shards)) == [len(points) // count] * count
    for shard in range(count):
      mine = [p for p, s in zip(points, shards) if s == shard]
      assert {p.config.model.moe.granularity for p in mine} == {1, 2, 4, 8}
      assert {p.config.model.d_model for p in mine} == {64, 128}
      assert {p.config.train.steps for p in mine} == {250, 500}


# ------------------------------------------------------------------ studies


@pytest.mark.parametrize("name", STUDIES)
@pytest.mark.parametrize("scale", common.SCALES)
def test_study_points_validate(name, scale):
  points = sweep.load_sweep(os.path.join(REPO, "experiments", "studies", f"{name}.py:{scale}"))
  seeds = {}
  for point in points:
    assert point.name == f"{common.config_name(point.name)}_s{point.config.seed}"
    seeds.setdefault(common.config_name(point.name), set()).add(point.config.seed)
  minimum = 2 if scale == "full" else 1
  assert all(len(s) >= minimum for s in seeds.values()), seeds


def test_granularity_study_fixes_active_and_total_expert_units():
  points = sweep.load_sweep(os.path.join(REPO, "experiments", "studies", "granularity.py:full"))
  for point in points:
    moe = point.config.model.moe
    unit = moe.expert_hidden // moe.granularity
    assert (moe.num_experts + moe.num_shared_experts) * unit == 8 * 128
    assert (moe.top_k + moe.num_shared_experts) * unit == 2 * 128


def test_paired_difference_removes_the_seed_spread():
  rows = [{"config": c, "seed": s, "status": "finished", "eval_loss": base + shift}
          for s, base in ((0, 2.0), (1, 2.5)) for c, shift in (("ref", 0.0), ("x", 0.1))]
  rows.append({"config": "x", "seed": 2, "status": "finished", "eval_loss": 9.0})  # no ref
  assert common.by_config(rows, "eval_loss")["x"]["std"] > 0.3
  paired = common.paired_difference(rows, "eval_loss", "ref")["x"]
  assert paired["mean"] == pytest.approx(0.1) and paired["std"] == pytest.approx(0.0)
  assert paired["n"] == 2


def test_z_loss_instability_criteria():
  from experiments.studies import z_loss  # pylint: disable=g-import-not-at-top
  point = sweep.load_sweep(os.path.join(REPO, "experiments", "studies",
                                        "z_loss.py:quick"))[0]
  def row(losses, eval_loss):
    records = [{"step": i, "train/loss": v, "train/router_logit_max": 2.0 * i}
               for i, v in enumerate(losses)]
    records[-1]["eval/loss"] = eval_loss
    return z_loss.row_metrics(records, point, None)
  assert row([6.0, 4.0, 3.0, 2.5], 2.4)["unstable"] == 0
  assert row([6.0, 4.0, 4.6, 2.5], 2.4)["unstable"] == 1        # a spike of 0.6 nats
  assert row([6.0, 5.9, 5.8, 5.8], 5.7)["unstable"] == 1        # never left the plateau
  assert row([6.0, float("nan"), 3.0, 2.5], 2.4)["unstable"] == 1
  assert row([6.0, 4.0, 3.0, 2.5], 2.4)["router_logit_max_peak"] == 6.0


def test_compare_runs_labels_a_sweeps_points_over_seeds_by_name(tmp_path):
  for seed in (0, 1):
    _fake_run(tmp_path / f"seed{seed}" / "points" / "slow", seed, 1e-3, 2.0 + seed, (3, 2))
    _fake_run(tmp_path / f"seed{seed}" / "points" / "fast", seed, 3e-3, 1.5 + seed, (3, 2))
  rows = compare_runs.compare([str(tmp_path / "seed*")], str(tmp_path / "out"))
  assert {row["config"]: row["seeds"] for row in rows} == {"slow": 2, "fast": 2}
  # one name for two configurations: labelled by the keys again
  _fake_run(tmp_path / "other" / "points" / "slow", 0, 1e-2, 2.0, (3, 2))
  rows = compare_runs.compare([str(tmp_path / "seed*"), str(tmp_path / "other")],
                              str(tmp_path / "out2"))
  assert {row["config"] for row in rows} == {"learning_rate=0.001", "learning_rate=0.003",
                                             "learning_rate=0.01"}


def test_compare_runs_reads_a_committed_study(tmp_path):
  rows = compare_runs.compare([os.path.join(REPO, "experiments", "results", "capacity")],
                              str(tmp_path))
  assert len(rows) == 5 and all(row["eval_loss_n"] == 3 for row in rows)
  labels = [row["config"] for row in rows]
  assert any("capacity_factor=0.5" in label for label in labels)
  study_rows, summary = common.load_results(os.path.join(REPO, "experiments", "results",
                                                         "capacity"))
  by_config = {row["config"]: row for row in rows}
  for name, stats in summary["configs"].items():
    matches = [row for label, row in by_config.items()
               if f"capacity_factor={float(name[2:]) if name != 'dropless' else 0.0}"
               in label]
    assert len(matches) == 1, name
    assert matches[0]["eval_loss_mean"] == pytest.approx(stats["eval_loss"]["mean"])


def test_the_tiny_granularity_fit_is_flagged(tmp_path):
  """The fit the issue reported (configs/sweeps/granularity.py:tiny, measured
  results committed): gamma at its bound, c below the entropy floor of 1.07."""
  results = os.path.join(REPO, "experiments", "results", "granularity_tiny", "results.csv")
  result = fit_scaling.run(results, laws.KRAJEWSKI, str(tmp_path), bootstrap=20)
  kinds = {(w["kind"], w["coefficient"]) for w in result["warnings"]}
  assert ("at_bound", "gamma") in kinds
  assert ("below_entropy_floor", "c") in kinds
  assert result["entropy_floor"] == pytest.approx(1.0725, abs=1e-3)
