"""Per-expert weight quantization (moejax.quantize) and its report."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from moejax import quantize
from moejax.nn import TransformerLM
from moejax.train import config as config_lib
from moejax import train as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernel(shape=(4, 16, 8), outlier_expert=0, factor=100.0):
  w = jax.random.normal(jax.random.key(0), shape)
  return w.at[..., outlier_expert, :, :].multiply(factor)


@pytest.mark.parametrize("setting", ["int8", "int4"])
def test_one_experts_outliers_do_not_set_another_experts_scale(setting):
  w = _kernel()
  per_expert = qwix.dequantize(quantize.quantize_kernel(w, setting))
  # Expert 1 quantized alone (as a 1-expert kernel) is what it gets here.
  alone = qwix.dequantize(quantize.quantize_kernel(w[1:2], setting))
  np.testing.assert_array_equal(per_expert[1], alone[0])
  shared = qwix.dequantize(quantize.quantize_kernel(w, f"{setting}_shared"))
  error = lambda d: float(jnp.max(jnp.abs(d[1] - w[1])))
  assert error(shared) > 10 * error(per_expert)


def test_int8_error_is_half_a_step_of_its_expert_and_channel():
  w = _kernel()
  q = quantize.quantize_kernel(w, "int8")
  assert q.scale.shape == (4, 1, 8)  # one scale per expert and output channel
  # absmax calibration: each scale is its own (expert, channel) range over a
  # fixed number of int8 steps (qwix maps absmax to 127.5)...
  absmax = np.max(np.abs(np.asarray(w)), axis=1, keepdims=True)
  ratio = np.asarray(q.scale) / absmax
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)
  assert 1 / 128 <= ratio.flat[0] <= 1 / 127
  # ... and every weight is within half a step of its scale.
  step = np.asarray(q.scale)
  assert np.all(np.abs(np.asarray(qwix.dequantize(q)) - np.asarray(w)) <= step / 2 + 1e-6)


def test_stacked_layers_get_scales_per_unit_and_expert():
  w = jax.random.normal(jax.random.key(1), (3, 4, 16, 8))
  assert quantize.quantize_kernel(w, "int8").scale.shape == (3, 4, 1, 8)
  assert quantize.quantize_kernel(w, "int8_shared").scale.shape == (3, 1, 1, 8)


def test_quantize_params_touches_only_routed_experts_and_counts_their_storage():
  model = TransformerLM(vocab_size=40, num_layers=2, d_model=16, num_heads=2,
                        moe=dict(num_experts=4, top_k=2, expert_hidden=32,
                                 num_shared_experts=1, activation="swiglu", group_by="batch"),
                        moe_every=2, rngs=nnx.Rngs(0))
  params = nnx.state(model)
  quantized, stored = quantize.quantize_params(params, "int8")
  _, float_bytes = quantize.quantize_params(params, None)
  before = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params)))
  after = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(quantized)))
  changed = sorted(quantize._name(p) for p in before if not np.array_equal(before[p], after[p]))
  assert changed == ["layers/1/ffn/experts/wi_gate", "layers/1/ffn/experts/wi_up",
                     "layers/1/ffn/experts/wo"]
  # 3 kernels of 4 x 16 x 32 values: float32 4 bytes; int8 1 byte + one float32
  # scale per expert and output channel.
  values = 3 * 4 * 16 * 32
  assert float_bytes == 4 * values
  assert stored == values + 4 * (2 * 4 * 32 + 4 * 16)
  # The caller's parameters are left as they were.
  model_wo = nnx.to_pure_dict(nnx.state(model))["layers"][1]["ffn"]["experts"]["wo"]
  np.testing.assert_array_equal(model_wo,
                                before[next(p for p in before
                                            if quantize._name(p).endswith("experts/wo"))])
  stats = quantize.expert_weight_stats(params)
  assert sorted(stats) == changed
  assert len(stats["layers/1/ffn/experts/wo"]["std"]) == 4


def test_unknown_setting_names_the_choices():
  with pytest.raises(ValueError, match="int8"):
    quantize.check_setting("int3")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = config_lib.default_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.model.moe.update(expert_hidden=32, num_experts=4, group_by="batch")
  config.train.update(seq_len=16, batch_size=8, steps=20, warmup_steps=2, log_every=10,
                      eval_every=20, eval_batches=2, checkpoint_every=20)
  workdir = str(tmp_path_factory.mktemp("quant") / "run")
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_quantize_report_cli(run, tmp_path):
  out = tmp_path / "report.json"
  done = subprocess.run([sys.executable, "-m", "experiments.quantize_report",
                         f"--workdir={run}", "--settings=int8,int4,int8_shared",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  report = json.loads(out.read_text())
  assert set(report["settings"]) == {"int8", "int4", "int8_shared"}
  int8, int4 = report["settings"]["int8"], report["settings"]["int4"]
  assert abs(int8["relative_change"]) < 0.01
  assert int8["memory_ratio"] < 0.3 and int4["memory_ratio"] < int8["memory_ratio"]
  assert int8["delta"] == pytest.approx(int8["eval/loss"] - report["float"]["eval/loss"])
  assert len(report["weight_stats"]) == 2 * 2  # 2 MoE layers x (wi, wo)
  bad = subprocess.run([sys.executable, "-m", "experiments.quantize_report",
                        f"--workdir={run}", "--settings=int3"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "int3" in bad.stderr.strip().splitlines()[-1]
