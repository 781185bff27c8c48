"""experiments.compare_routers: every router of the routers sweep, several corpora and seeds."""

import json
import os

import pytest

from experiments import compare_routers
from experiments import sweep
from moejax.train import config as config_lib

import shared_data  # tests/shared_data.py
from shared_data import SHAKESPEARE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each point shrunk to a few steps; the sweep's router settings are kept.
_TINY = {"model.d_model": 32, "model.num_layers": 1, "train.seq_len": 16,
         "train.batch_size": 8, "train.steps": 3, "train.warmup_steps": 0,
         "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 1,
         "train.checkpoint_every": 3}


def test_routers_sweep_matches_active_compute_and_is_causal():
  routers = sweep.load_module(os.path.join(ROOT, "configs", "sweeps", "routers.py"), "r")
  for corpus, overrides in routers.CORPORA.items():
    shakespeare = corpus == "tiny_shakespeare"
    extra = dict(overrides, **({"data.manual_dir": str(SHAKESPEARE_DIR)} if shakespeare
                               else {}))
    for name, point in routers.get_sweep("tiny"):
      config = sweep.apply_overrides(sweep.load_config_file(routers.BASE_CONFIG),
                                     {**point, **extra})
      moe = config.model.moe
      # active FFN hidden width per token: 2 H = 4 d_model for every router
      if moe.router in ("expert_choice", "soft_moe"):
        per_token = moe.capacity_factor * moe.expert_hidden  # experts per token on average
      else:
        per_token = moe.top_k * moe.expert_hidden            # dense: one FFN of that width
      assert per_token == 4 * config.model.d_model, name
      assert moe.group_by == "batch", name
      if corpus != "synthetic_mixture":
        assert config.data.name == corpus and config.data.tokenizer == "byte"
      if not shakespeare or shared_data.has_shakespeare():
        config_lib.validate_config(config)


def test_one_command_trains_every_corpus_and_seed_and_tabulates(tmp_path):
  options = compare_routers.Options(corpora=["python_stdlib", "synthetic_mixture"], seeds=2,
                                    routers=["dense", "hash"], extra=_TINY)
  text = compare_routers.run(str(tmp_path), options)
  for corpus in options.corpora:
    for seed in (0, 1):
      for router in ("dense", "hash"):
        point = tmp_path / corpus / f"seed{seed}" / "points" / router
        assert json.loads((point / "config.json").read_text())["seed"] == seed
        assert (point / "done.json").exists()
    assert (tmp_path / corpus / "compare" / "compare.png").exists()
  rows = json.loads((tmp_path / "router_table.json").read_text())
  assert [(r["corpus"], r["router"], r["seeds"]) for r in rows] == [
      (c, r, 2) for c in options.corpora for r in ("dense", "hash")]
  for row in rows:  # two seeds train differently: a spread, and a mean between them
    assert row["eval_loss"] > 0 and row["eval_loss_std"] > 0
  by_key = {(r["corpus"], r["router"]): r for r in rows}
  for corpus in options.corpora:  # hash minus dense, paired by seed
    diffs = [json.loads((tmp_path / corpus / f"seed{s}" / "points" / r / "done.json"
                         ).read_text())["eval_loss"] for s in (0, 1) for r in ("hash", "dense")]
    paired = [diffs[0] - diffs[1], diffs[2] - diffs[3]]
    assert by_key[(corpus, "hash")]["vs_dense"] == pytest.approx(sum(paired) / 2)
    assert by_key[(corpus, "hash")]["vs_dense_seeds"] == 2
    assert "vs_dense" not in by_key[(corpus, "dense")]
  stdlib = json.loads((tmp_path / "python_stdlib" / "seed0" / "points" / "dense"
                       / "config.json").read_text())["data"]
  assert stdlib["name"] == "python_stdlib" and stdlib["tokenizer"] == "byte"
  assert "| dense | " in text and "| router | python_stdlib | synthetic_mixture |" in text
  assert (tmp_path / "router_table.md").read_text() == text
  # a rerun trains nothing and writes the same table
  mtime = (tmp_path / "python_stdlib" / "seed1" / "points" / "hash" / "metrics.jsonl").stat()
  assert compare_routers.run(str(tmp_path), options) == text
  assert (tmp_path / "python_stdlib" / "seed1" / "points" / "hash" / "metrics.jsonl"
          ).stat().st_mtime == mtime.st_mtime


@pytest.mark.parametrize("options, message", [
    (dict(corpora=["wikipedia"]), "unknown corpus 'wikipedia'"),
    (dict(corpora=["synthetic_mixture"], routers=["top2"]), r"\['top2'\] are not points"),
    (dict(corpora=["synthetic_mixture"], seeds=0), "--seeds must be >= 1"),
    (dict(corpora=["tiny_shakespeare"], shakespeare_dir="/nonexistent"),
     "--shakespeare_dir='/nonexistent' does not exist"),
])
def test_bad_options_are_one_message_before_training(tmp_path, options, message):
  with pytest.raises(ValueError, match=message):
    compare_routers.run(str(tmp_path), compare_routers.Options(**options))
  assert not any(tmp_path.iterdir())
