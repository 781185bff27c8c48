"""Hugging Face checkpoints in and out (moejax.hf) against transformers' numbers.

The fixtures in tests/hf_fixtures/ are tiny random models that transformers
built and saved, with its own float32 logits and greedy generations
(`tests/hf_fixtures/make_fixtures.py` made them). Where transformers and torch
are installed, exported folders are also loaded by transformers itself.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import hf
from moejax import train as trainer
from moejax.generate import SamplingOptions, generate_tokens
from moejax.hf import workdirs as hf_cli
from moejax.hf import families
from moejax.hf.checkpoint import write_tensors
from moejax.train import config as config_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "hf_fixtures")
NAMES = ("llama", "qwen3", "mixtral", "qwen3_moe", "qwen3_moe_fused", "olmoe", "deepseek_v3",
         "deepseek_v3_full_query")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(name):
  return np.load(os.path.join(FIXTURES, name, "reference.npz"))


def _logits(model, tokens):
  logits, _ = model(jnp.asarray(tokens, jnp.int32))
  return np.asarray(logits)


@pytest.fixture(scope="module")
def imported():
  """{fixture name: (model, config)}, each imported once."""
  return {name: hf.from_pretrained(os.path.join(FIXTURES, name)) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_import_gives_transformers_logits(imported, name):
  model, _ = imported[name]
  reference = _reference(name)
  np.testing.assert_allclose(_logits(model, reference["tokens"]), reference["logits"],
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(imported, name):
  model, _ = imported[name]
  reference = _reference(name)
  prompt = int(reference["prompt_length"])
  generated = reference["generated"]
  new = generated.shape[1] - prompt
  out = generate_tokens(model, [list(row[:prompt]) for row in generated],
                        SamplingOptions(max_new_tokens=new, temperature=0.0))
  assert [list(row[prompt:]) for row in generated] == out


def test_import_maps_the_family_options(imported):
  _, mixtral = imported["mixtral"]
  assert mixtral.model.num_kv_heads == 2 and mixtral.model.rms_norm_eps == 1e-5
  assert mixtral.model.rope_base == 1e6 and not mixtral.model.tie_embeddings
  assert mixtral.model.moe.renormalize is True and mixtral.model.moe.dispatch == "dropless"
  # transformers' balancing loss is K x the Switch form: weight = K x its coefficient.
  assert mixtral.model.moe.aux_loss_type == "global_batch"
  assert mixtral.model.moe.aux_loss_weight == pytest.approx(2 * 0.001)
  _, olmoe = imported["olmoe"]
  assert olmoe.model.qk_norm == "projection" and olmoe.model.num_kv_heads is None
  assert olmoe.model.moe.renormalize is False
  _, deepseek = imported["deepseek_v3"]
  assert deepseek.model.kv_lora_rank == 16 and deepseek.model.q_lora_rank == 24
  assert deepseek.model.rope_yarn_factor == 4.0 and deepseek.model.rope_interleave
  assert deepseek.model.first_dense_layers == 1 and deepseek.model.dense_hidden == 48
  assert deepseek.model.moe.score_fn == "sigmoid" and deepseek.model.moe.num_groups == 4
  # The balancing bias has a slot: it is kept, and moves at DeepSeek-V3's rate.
  assert deepseek.model.moe.bias_update_rate == 1e-3
  model, _ = imported["deepseek_v3"]
  bias = hf.Checkpoint(os.path.join(FIXTURES, "deepseek_v3")).read(
      "model.layers.1.mlp.gate.e_score_correction_bias")
  assert np.any(bias != 0)
  np.testing.assert_array_equal(np.asarray(model.layers[1].ffn.router.bias[...]), bias)
  _, qwen3 = imported["qwen3"]
  assert qwen3.model.qk_norm == "head" and qwen3.model.head_dim == 16
  assert qwen3.model.tie_embeddings and qwen3.model.moe.router == "dense"


def _tensors(folder):
  checkpoint = hf.Checkpoint(folder)
  return {name: checkpoint.read(name) for name in checkpoint.names}


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral", "qwen3_moe", "olmoe",
                                  "deepseek_v3", "deepseek_v3_full_query"])
def test_export_writes_back_the_same_tensors(imported, name, tmp_path):
  model, config = imported[name]
  out = str(tmp_path / "out")
  hf.save_pretrained(model, config, out)
  original, exported = _tensors(os.path.join(FIXTURES, name)), _tensors(out)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(FIXTURES, name, "config.json")) as f:
    source = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  for key in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
              "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
              "kv_lora_rank", "q_lora_rank", "first_k_dense_replace", "n_group", "topk_group",
              "routed_scaling_factor", "n_shared_experts", "rope_interleave"):
    if key in source:
      assert written[key] == source[key], key


def test_export_of_a_scanned_layout_writes_the_same_tensors(imported, tmp_path):
  # A scanned model (dense first layer, stacked MoE layers) is unscanned for export.
  from moejax import model as model_lib  # pylint: disable=import-outside-toplevel
  from moejax.nn.transformer import convert_layout  # pylint: disable=import-outside-toplevel
  model, config = imported["deepseek_v3"]
  scanned = config.copy_and_resolve_references()
  scanned.model.scan_layers = True
  m = config.model
  pure = convert_layout(nnx.to_pure_dict(nnx.state(model)), scanned=True,
                        num_layers=m.num_layers, moe_every=m.moe_every,
                        first_dense_layers=m.first_dense_layers, router=m.moe.router)
  _, state = model_lib.abstract(scanned, config.data.vocab_size)
  nnx.replace_by_pure_dict(state, pure)
  out = str(tmp_path / "out")
  hf.save_pretrained(state, scanned, out)
  original, exported = _tensors(os.path.join(FIXTURES, "deepseek_v3")), _tensors(out)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_fused_experts_export_per_expert_and_reimport(imported, tmp_path):
  model, config = imported["qwen3_moe_fused"]
  out = str(tmp_path / "out")
  hf.save_pretrained(model, config, out)
  names = hf.Checkpoint(out).names
  assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
  assert not any("gate_up_proj" in n for n in names)
  again, _ = hf.from_pretrained(out)
  reference = _reference("qwen3_moe_fused")
  np.testing.assert_array_equal(_logits(again, reference["tokens"]),
                                _logits(model, reference["tokens"]))


def test_sharded_write_and_read(imported, tmp_path):
  model, config = imported["mixtral"]
  state = dict(families.tensors(config.model.to_dict(), families.FAMILIES["mixtral"])
               ["layers/0/ffn/experts/wo"].hf_tensors(
                   np.asarray(nnx.state(model)["layers"][0]["ffn"]["experts"]["wo"][...])))
  files = write_tensors(str(tmp_path), list(state.items()), max_shard_bytes=1000)
  assert files[-1] == "model.safetensors.index.json" and len(files) == 5
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert sorted(json.load(f)["weight_map"]) == sorted(state)
  shutil.copy(os.path.join(FIXTURES, "mixtral", "config.json"), tmp_path)
  checkpoint = hf.Checkpoint(str(tmp_path))
  for key, value in state.items():
    np.testing.assert_array_equal(checkpoint.read(key), value)


def test_expert_blocks_read_only_their_experts(monkeypatch):
  # A device holding experts [2, 4) of a layer reads those experts' tensors only.
  checkpoint = hf.Checkpoint(os.path.join(FIXTURES, "qwen3_moe"))
  model = hf.hf_run_config(checkpoint.config).model.to_dict()
  source = families.tensors(model, families.FAMILIES["qwen3_moe"])[
      "layers/1/ffn/experts/wi_gate"]
  read = []
  original = checkpoint.read
  monkeypatch.setattr(checkpoint, "read",
                      lambda name, index=None: read.append(name) or original(name, index))
  block = source.read(checkpoint, (slice(2, 4), slice(None), slice(None)))
  assert read == [f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in (2, 3)]
  whole = source.read(checkpoint, (slice(None),) * 3)
  np.testing.assert_array_equal(block, whole[2:4])


def test_placed_on_an_expert_parallel_mesh():
  # 8 host devices, experts split 4 ways: the same logits as transformers.
  code = f"""
import os, numpy as np, jax, jax.numpy as jnp
from moejax import hf, parallel
reference = np.load({os.path.join(FIXTURES, 'qwen3_moe', 'reference.npz')!r})
mesh = parallel.make_mesh({{"data": 2, "fsdp": 1, "expert": 4, "model": 1}})
model, _ = hf.from_pretrained({os.path.join(FIXTURES, 'qwen3_moe')!r}, mesh=mesh)
kernel = model.layers[0].ffn.experts.wi_gate[...]
assert kernel.sharding.spec[0] == "expert", kernel.sharding
from flax import nnx
graphdef, state = nnx.split(model)
with parallel.activate(mesh):
  logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(
      state, jnp.asarray(reference["tokens"], jnp.int32))
print(float(np.abs(np.asarray(logits) - reference["logits"]).max()))
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


# --- refusals ---------------------------------------------------------------

def _copy_fixture(name, tmp_path, **config_changes):
  folder = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), folder)
  with open(folder / "config.json") as f:
    config = json.load(f)
  config.update(config_changes)
  with open(folder / "config.json", "w") as f:
    json.dump(config, f)
  return str(folder)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt_oss"}, "not supported yet: moejax lacks attention sinks"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config \\(fp8"),
    ({"model_type": "bert"}, "model_type 'bert' is not supported; supported:"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type 'longrope'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_import_refuses_by_name(tmp_path, changes, message):
  folder = _copy_fixture("qwen3_moe", tmp_path, **changes)
  with pytest.raises(hf.Unsupported, match=message):
    hf.from_pretrained(folder)


def test_import_refuses_unused_and_missing_tensors(tmp_path):
  from safetensors.numpy import save_file
  folder = _copy_fixture("llama", tmp_path)
  tensors = _tensors(folder)
  extra = dict(tensors, **{"model.layers.0.mlp.gate_proj.bias": np.zeros(48, np.float32)})
  save_file(extra, os.path.join(folder, "model.safetensors"))
  with pytest.raises(hf.Unsupported, match="gate_proj.bias.*no place"):
    hf.from_pretrained(folder)
  tensors.pop("model.layers.1.self_attn.k_proj.weight")
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match="k_proj.weight.*missing"):
    hf.from_pretrained(folder)
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.from_pretrained(str(tmp_path))


def _moe_config(**moe):
  config = config_lib.default_config()
  config.model.moe.update({"activation": "swiglu", "capacity_factor": 0.0,
                           "dispatch": "dropless", **moe})
  config.model.tie_embeddings = False
  return config


@pytest.mark.parametrize("moe, message", [
    (dict(router="expert_choice", capacity_factor=2.0, dispatch="auto"),
     "router='expert_choice'"),
    (dict(router="soft_moe", capacity_factor=1.0, dispatch="auto"), "router='soft_moe'"),
    (dict(capacity_factor=1.25, dispatch="gather"), "capacity_factor=1.25"),
    (dict(activation="gelu"), "activation='gelu'"),
    (dict(num_shared_experts=1), "num_shared_experts"),
    (dict(bias_update_rate=1e-3, aux_loss_type="none"), "balancing bias"),
    (dict(score_fn="sigmoid"), "score_fn='sigmoid'"),
])
def test_export_refuses_by_name(moe, message):
  with pytest.raises(hf.Unsupported, match=message):
    hf.export_plan(_moe_config(**moe), "mixtral")


def test_export_guesses_the_family():
  assert hf.export_plan(_moe_config(), None)[0].model_type == "mixtral"
  config = _moe_config(renormalize=False)
  config.model.qk_norm = "projection"
  assert hf.export_plan(config, None)[0].model_type == "olmoe"
  config = _moe_config(router="dense", top_k=1)
  config.model.qk_norm = "head"
  assert hf.export_plan(config, None)[0].model_type == "qwen3"


# --- the CLI and the tools on an imported workdir ---------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "moejax.hf", *args], capture_output=True,
                        text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=600)


def test_cli_import_export_round_trip(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  done = _cli("import", f"--hf_dir={os.path.join(FIXTURES, 'olmoe')}", f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Imported olmoe" in done.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "0"))
  again = _cli("import", f"--hf_dir={os.path.join(FIXTURES, 'olmoe')}", f"--workdir={workdir}")
  assert again.returncode == 1 and again.stderr.strip().startswith("error:")
  assert len(again.stderr.strip().splitlines()) == 1 and "not empty" in again.stderr
  done = _cli("export", f"--workdir={workdir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  original, exported = _tensors(os.path.join(FIXTURES, "olmoe")), _tensors(out)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  refused = _cli("export", f"--workdir={workdir}", f"--out={tmp_path / 'other'}",
                 "--family=mixtral")
  assert refused.returncode == 1 and "qk_norm='projection'" in refused.stderr
  assert not os.path.exists(tmp_path / "other")
  if _transformers() is not None:
    _check_transformers_logits(out, "olmoe")


def _transformers():
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel
    return transformers
  except ImportError:
    return None


def _check_transformers_logits(folder, name):
  import torch  # pylint: disable=import-outside-toplevel
  transformers = _transformers()
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  reference = _reference(name)
  with torch.no_grad():
    logits = model(torch.tensor(reference["tokens"])).logits.numpy()
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-5, rtol=0)


@pytest.mark.skipif(_transformers() is None,
                    reason="transformers and torch are not installed (CI's install stays "
                           "light); the committed fixtures hold transformers' logits")
@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_the_export(imported, name, tmp_path):
  model, config = imported[name]
  hf.save_pretrained(model, config, str(tmp_path / "out"))
  _check_transformers_logits(str(tmp_path / "out"), name)


def _small_training(config, workdir, steps=10):
  config.train.update(steps=steps, batch_size=4, seq_len=16, warmup_steps=1, log_every=5,
                      eval_every=steps, eval_batches=1, checkpoint_every=steps)
  return trainer.train_and_evaluate(config, workdir)


def test_import_then_lora_then_evaluate(tmp_path):
  base = str(tmp_path / "base")
  hf_cli.import_checkpoint(os.path.join(FIXTURES, "qwen3_moe"), base)
  config = hf.hf_run_config(hf.Checkpoint(os.path.join(FIXTURES, "qwen3_moe")).config)
  config.finetune.base = base
  config.finetune.lora.update(rank=4, targets="attention,router")
  result = _small_training(config, str(tmp_path / "lora"))
  assert np.isfinite(result["eval/loss"])
  from moejax import evaluate  # pylint: disable=import-outside-toplevel
  evaluated = evaluate.evaluate(str(tmp_path / "lora"), num_batches=1)
  assert evaluated["eval/loss"] == pytest.approx(result["eval/loss"], rel=1e-4)


def test_import_dense_then_upcycle_then_train(tmp_path):
  dense = str(tmp_path / "dense")
  hf_cli.import_checkpoint(os.path.join(FIXTURES, "llama"), dense)
  config = hf.hf_run_config(hf.Checkpoint(os.path.join(FIXTURES, "llama")).config)
  config.init.upcycle_from = dense
  config.model.moe.update(router="topk", num_experts=4, top_k=1, renormalize=True,
                          capacity_factor=0.0, dispatch="dropless")
  workdir = str(tmp_path / "moe")
  result = _small_training(config, workdir)
  assert np.isfinite(result["eval/loss"])
  assert os.path.exists(os.path.join(workdir, "upcycled_from.json"))


def test_deepseek_export_refusals_and_mtp_layers(tmp_path):
  # A standard-attention model has no DeepSeek-V3 layout; DeepSeek-V3's
  # multi-token-prediction layer (past num_hidden_layers) is not part of the
  # next-token logits and is left out, as transformers does.
  with pytest.raises(hf.Unsupported, match="standard attention"):
    hf.export_plan(_moe_config(score_fn="sigmoid"), "deepseek_v3")
  from safetensors.numpy import save_file
  folder = _copy_fixture("deepseek_v3", tmp_path)
  tensors = dict(_tensors(folder), **{"model.layers.3.eh_proj.weight": np.ones((4, 4),
                                                                            np.float32)})
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  model, _ = hf.from_pretrained(folder)
  reference = _reference("deepseek_v3")
  np.testing.assert_allclose(_logits(model, reference["tokens"]), reference["logits"],
                             atol=1e-5, rtol=0)


SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tiny_shakespeare")


def test_import_with_its_tokenizer_evaluates_generates_and_exports(tmp_path):
  # The checkpoint's tokenizer.json comes along: text data, evaluation and
  # generation use it, and export writes it back.
  from moejax import evaluate, generate  # pylint: disable=import-outside-toplevel
  from moejax.data import tokenizers  # pylint: disable=import-outside-toplevel
  base = config_lib.default_config()
  base.data.update(name="tiny_shakespeare", manual_dir=SHAKESPEARE)
  base.train.update(seq_len=32, batch_size=4, eval_batches=1)
  workdir = str(tmp_path / "run")
  hf_cli.import_checkpoint(os.path.join(FIXTURES, "qwen3_moe"), workdir, base)
  assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == [
      "tokenizer.json", "tokenizer_config.json"]
  tokenizer = tokenizers.HFTokenizer(os.path.join(workdir, "tokenizer"))
  assert tokenizer.vocab_size == 96 and tokenizer.eos_id == 0
  ids = tokenizer.encode_documents(["First Citizen:"])
  assert ids[-1] == 0 and tokenizer.decode(ids[:-1]) == "First Citizen:"
  result = evaluate.evaluate(workdir, num_batches=1)
  assert np.isfinite(result["eval/loss"]) and result["tokens"] == 4 * 32
  quantized = evaluate.evaluate(workdir, num_batches=1, quantize="int8")
  assert quantized["expert_param_bytes"] < result["expert_param_bytes"]
  assert abs(quantized["eval/loss"] - result["eval/loss"]) < 0.05
  generator = generate.load(workdir)
  assert generator.tokenizer.fingerprint == tokenizer.fingerprint
  text = generator.generate(["First Citizen:"], SamplingOptions(max_new_tokens=8,
                                                                temperature=0.0))[0]
  # Greedy ids decoded by the checkpoint's tokenizer (no bytes, no ids).
  model, _ = hf.from_pretrained(os.path.join(FIXTURES, "qwen3_moe"))
  prompt = [tokenizer.eos_id] + tokenizer.encode_documents(["First Citizen:"])[:-1].tolist()
  expected = generate_tokens(model, [prompt], SamplingOptions(max_new_tokens=8,
                                                              temperature=0.0))[0]
  if tokenizer.eos_id in expected:  # generation stops at the eos token
    expected = expected[:expected.index(tokenizer.eos_id)]
  assert text == tokenizer.decode(expected)
  out = str(tmp_path / "out")
  files = hf_cli.export_run(workdir, out)
  assert "tokenizer.json" in files and os.path.exists(os.path.join(out, "tokenizer.json"))


def test_tokenizer_settings_are_checked():
  from moejax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = pipeline.default_config()
  config.update(name="tiny_shakespeare", manual_dir=SHAKESPEARE, tokenizer="hf")
  with pytest.raises(ValueError, match="needs config.data.tokenizer_path"):
    pipeline.validate_data_config(config)
  config.tokenizer_path = FIXTURES
  with pytest.raises(ValueError, match="no tokenizer.json there"):
    pipeline.validate_data_config(config)
  config.tokenizer_path = os.path.join(FIXTURES, "qwen3_moe")
  pipeline.validate_data_config(config)
  config.vocab_size = 128  # an embedding padded beyond the tokenizer's 96 ids
  assert pipeline.vocab_size(config) == 128
