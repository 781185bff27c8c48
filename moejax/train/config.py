"""The run configuration: every key with its default, and validation.

`default_config()` is the single definition of the keys; files in configs/
start from it and change what their run needs. `validate_config` checks a
config before anything is built or compiled and raises `ValueError` naming the
offending key.
"""

import dataclasses
import difflib
import functools
import math
import re
import sys
from typing import Any, Callable, Mapping, Optional

from absl import flags

import ml_collections

from moejax import data
from moejax.nn.config import DTYPES as _DTYPES
from moejax.nn.config import ModelConfig
from moejax.nn.config import is_int as _is_int
from moejax.routing import MoEConfig
from moejax.train import lora


def moe_config() -> ml_collections.ConfigDict:
  """The keys of `config.model.moe`: the fields of `routing.MoEConfig`, with
  its defaults (documented there and in the README config table)."""
  moe = ml_collections.ConfigDict()
  for field in dataclasses.fields(MoEConfig):
    default = field.default
    if default is None:  # Optional fields: a typed placeholder, so a flag can set them
      kind = {"eval_capacity_factor": float, "group_size": int,
              "renormalize": bool}[field.name]
      default = ml_collections.config_dict.placeholder(kind)
    moe[field.name] = default
  return moe


def model_config() -> ml_collections.ConfigDict:
  """The keys of `config.model`: the fields of `nn.config.ModelConfig`, with
  its defaults (documented there and in the README config table)."""
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.name == "moe":
      model.moe = moe_config()
    elif field.name in ("head_dim", "num_kv_heads", "dense_hidden"):  # None = derived
      model[field.name] = ml_collections.config_dict.placeholder(int)
    else:
      model[field.name] = field.default
  return model


def train_config() -> ml_collections.ConfigDict:
  """The keys of `config.train` with their defaults."""
  train = ml_collections.ConfigDict()
  train.steps = 300
  train.batch_size = 32           # global, over all processes
  train.seq_len = 128
  train.learning_rate = 3e-3
  train.warmup_steps = 30
  # Length of the warmup + cosine schedule; None = steps. Set it to run the
  # first `steps` steps of a longer run (which then resumes on the same curve).
  train.schedule_steps = ml_collections.config_dict.placeholder(int)
  train.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  train.weight_decay = 0.1
  train.grad_clip = 1.0
  train.b1 = 0.9
  train.b2 = 0.95
  # adamw, or muon: Muon on the matrices (per expert, per scanned layer), AdamW
  # on embeddings, routers and norms (moejax.train.optim).
  train.optimizer = "adamw"
  # QK-clip (Kimi K2's MuonClip): after each step, every attention head whose
  # largest logit in the step exceeded tau has its query and key weights
  # scaled to cap it at tau (Kimi: 100). 0 = off. Either optimizer.
  train.qk_clip_tau = 0.0
  # Storage dtype of the AdamW moments (computed in float32 either way).
  train.moment_dtype = "float32"   # float32 | bfloat16
  train.log_every = 10
  train.eval_every = 100
  train.eval_batches = 4
  train.checkpoint_every = 100
  train.keep_checkpoints = 3
  train.peak_flops_per_device = ml_collections.config_dict.placeholder(float)
  # Resume even where the config differs from the checkpoint's in keys that
  # change training (fine-tuning, a lower learning rate after a divergence);
  # the differences are recorded in workdir/config_changes.jsonl.
  train.resume_with_changes = False
  # Record a routing trace of the eval batches every N steps (0 = never) into
  # workdir/traces/step_<N>/ (`moejax.trace`).
  train.trace_every = 0
  # Train on a trace's batches with its recorded experts (R3 routing replay,
  # arXiv 2510.11370): step s uses the trace's batch s mod its batch count;
  # evaluation stays on the run's own eval batches and routing. None = off.
  train.replay_trace = ml_collections.config_dict.placeholder(str)
  return train


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default (documented in the README config table)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.train = train_config()

  # config.data: name, data_dir, manual_dir, text_key, train_split, eval_split,
  # tokenizer, vocab_size, num_domains, branching, loader (see moejax/data/pipeline.py).
  config.data = data.default_config()

  # config.model: the fields of moejax.nn.config.ModelConfig, with its defaults
  # (num_layers, d_model, num_heads, head_dim, num_kv_heads, qk_norm, rms_norm_eps,
  # moe_every, first_dense_layers, tie_embeddings, rope_base, dtype, param_dtype, scan_layers, remat, moe).
  config.model = model_config()

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                   # -1 = all remaining devices
  config.mesh.fsdp = 1                    # parameters + optimizer state split (FSDP)
  config.mesh.expert = 1
  config.mesh.model = 1

  # Sparse upcycling (moejax/train/upcycle.py): a new run's MoE parameters from
  # the newest checkpoint of a dense run; routers fresh, optimizer from step 0.
  config.init = ml_collections.ConfigDict()
  config.init.upcycle_from = ml_collections.config_dict.placeholder(str)  # a run directory
  config.init.upcycle_noise = 0.0   # relative std of noise on the copied experts

  # LoRA / QLoRA fine-tuning of a trained run (moejax/train/lora.py): the base
  # frozen, only the adapters trained; rank 0 = an ordinary run.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.base = ml_collections.config_dict.placeholder(str)  # the trained run's workdir
  config.finetune.lora = ml_collections.ConfigDict()
  config.finetune.lora.rank = 0
  config.finetune.lora.alpha = 16.0       # scale alpha / rank on A B
  config.finetune.lora.targets = "experts"  # router,experts,shared_experts,attention
  config.finetune.lora.quantize_base = "none"  # none | int8 | int4 (QLoRA)
  return config


def from_json(recorded: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A run config from its JSON record (`resume.to_json`, a checkpoint's or
  a workdir's config.json), laid over `default_config()`: every key keeps its
  type (a None placeholder still takes a value from the command line) and
  keys the record predates take their defaults."""
  config = default_config()

  def merge(target: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
      if isinstance(value, Mapping) and isinstance(target.get(key), ml_collections.ConfigDict):
        merge(target[key], value)
      else:
        target[key] = value
  with config.unlocked():
    merge(config, recorded)
  return config


def key_paths(config: ml_collections.ConfigDict, prefix: str = "config") -> dict[str, object]:
  paths = {}
  for name, value in config.items():
    path = f"{prefix}.{name}"
    if isinstance(value, ml_collections.ConfigDict):
      paths.update(key_paths(value, path))
    else:
      paths[path] = value
  return paths


def unknown_key_message(key: str, known) -> str:
  """`unknown config key K; did you mean M?` for a dotted key path."""
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else "; every key is listed in the README config table"
  return f"unknown config key {key}{hint}"


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; builds and compiles nothing.

  Checks that the keys are exactly those of `default_config()` (a typo in a
  config file is an error, as it is on the command line), the values of the
  train, model and mesh sections, and the data section through
  `moejax.data.validate_data_config`. The model keys are checked by
  `nn.config.ModelConfig`; the MoE options by the routers when the model is
  built (`moejax.model.check`, under `nnx.eval_shape`).
  """
  expected = key_paths(default_config())
  given = key_paths(config)
  unknown = sorted(set(given) - set(expected))
  missing = sorted(set(expected) - set(given))
  _require(not unknown, unknown_key_message(unknown[0], expected) if unknown else "")
  _require(not missing, f"config is missing key(s) {missing}")
  _check_train(config.train)
  _check_init(config.init)
  ModelConfig.from_mapping(config.model)  # every config.model check, in one place
  _check_group_size(config)
  for key in ("data", "fsdp", "expert", "model"):
    value = config.mesh[key]
    _require(_is_int(value) and (value == -1 or value > 0),
             f"config.mesh.{key} must be -1 (fill) or a positive integer, got {value!r}")
  lora.validate(config)
  _check_qk_clip(config)
  data.validate_data_config(config.data)


def _check_train(train: ml_collections.ConfigDict) -> None:
  for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
              "checkpoint_every", "keep_checkpoints"):
    value = train[key]
    _require(_is_int(value) and value > 0,
             f"config.train.{key} must be a positive integer, got {value!r}")
  if train.schedule_steps is not None:
    _require(_is_int(train.schedule_steps) and train.schedule_steps > 0,
             f"config.train.schedule_steps must be a positive integer or None, got "
             f"{train.schedule_steps!r}")
  # warmup_steps >= the schedule is allowed: the run is then all warmup
  # (moejax.train.optim.learning_rate_schedule).
  _require(_is_int(train.warmup_steps) and train.warmup_steps >= 0,
           f"config.train.warmup_steps must be an integer >= 0, got {train.warmup_steps!r}")
  _require(isinstance(train.resume_with_changes, bool),
           f"config.train.resume_with_changes must be true or false, got "
           f"{train.resume_with_changes!r}")
  trace_every = train.get("trace_every", 0)
  _require(_is_int(trace_every) and trace_every >= 0,
           f"config.train.trace_every must be an integer >= 0 (0 = off), got {trace_every!r}")
  replay = train.get("replay_trace")
  _require(replay is None or (isinstance(replay, str) and replay.strip() != ""),
           f"config.train.replay_trace must be a trace folder or None, got {replay!r}")
  _check_optimizer(train)
  optimizer = train.get("optimizer", "adamw")
  _require(optimizer in ("adamw", "muon"),
           f"config.train.optimizer must be 'adamw' or 'muon', got {optimizer!r}")


def _check_qk_clip(config: ml_collections.ConfigDict) -> None:
  tau = config.train.qk_clip_tau
  _require(isinstance(tau, (int, float)) and not isinstance(tau, bool)
           and math.isfinite(tau) and tau >= 0,
           f"config.train.qk_clip_tau must be a finite number >= 0 (0 = off), got {tau!r}")
  if not tau:
    return
  _require(config.model.qk_norm == "none",
           f"config.train.qk_clip_tau={tau!r} rescales the query and key kernels, which "
           f"config.model.qk_norm={config.model.qk_norm!r} normalizes away: set one of the two")
  _require(not config.finetune.lora.rank,
           f"config.train.qk_clip_tau={tau!r} changes the attention kernels, which a LoRA "
           f"run (config.finetune.lora.rank={config.finetune.lora.rank}) keeps frozen: set "
           f"config.train.qk_clip_tau=0")


def _check_init(init: ml_collections.ConfigDict) -> None:
  # Whether the directory exists is checked when a run starts without
  # checkpoints (moejax.train.upcycle): a resumed upcycled run never reads it.
  if init.upcycle_from is not None:
    _require(isinstance(init.upcycle_from, str) and init.upcycle_from.strip() != "",
             f"config.init.upcycle_from must be a dense run's workdir or None, got "
             f"{init.upcycle_from!r}")
  _require(isinstance(init.upcycle_noise, (int, float)) and not isinstance(
      init.upcycle_noise, bool) and math.isfinite(init.upcycle_noise)
           and init.upcycle_noise >= 0,
           f"config.init.upcycle_noise must be a finite number >= 0, got "
           f"{init.upcycle_noise!r}")
  _require(not init.upcycle_noise or init.upcycle_from is not None,
           f"config.init.upcycle_noise={init.upcycle_noise!r} needs "
           f"config.init.upcycle_from (it is noise on experts copied from a dense run)")


def _check_optimizer(train: ml_collections.ConfigDict) -> None:
  _require(train.learning_rate > 0,
           f"config.train.learning_rate must be > 0, got {train.learning_rate!r}")
  _require(0 <= train.final_lr_fraction <= 1,
           f"config.train.final_lr_fraction must be in [0, 1], got {train.final_lr_fraction!r}")
  _require(train.weight_decay >= 0,
           f"config.train.weight_decay must be >= 0, got {train.weight_decay!r}")
  _require(train.grad_clip >= 0,
           f"config.train.grad_clip must be >= 0 (0 = off), got {train.grad_clip!r}")
  for key in ("b1", "b2"):
    _require(0 <= train[key] < 1, f"config.train.{key} must be in [0, 1), got {train[key]!r}")
  _require(train.peak_flops_per_device is None or train.peak_flops_per_device > 0,
           f"config.train.peak_flops_per_device must be > 0 or None, "
           f"got {train.peak_flops_per_device!r}")
  _require(train.moment_dtype in _DTYPES,
           f"config.train.moment_dtype must be one of {list(_DTYPES)}, got "
           f"{train.moment_dtype!r}")


def _check_group_size(config: ml_collections.ConfigDict) -> None:
  """The MoE layer's grouping rule (moejax/nn/moe_layer.py), checked on the
  batch shape the run will use."""
  moe, train = config.model.moe, config.train
  if moe.group_size is None:
    return
  _require(_is_int(moe.group_size) and moe.group_size > 0,
           f"config.model.moe.group_size must be a positive integer or None, got "
           f"{moe.group_size!r}")
  if moe.group_by == "batch":
    _require(train.batch_size % moe.group_size == 0,
             f"config.model.moe.group_size={moe.group_size} does not divide "
             f"config.train.batch_size={train.batch_size} (group_by='batch' groups the "
             f"tokens at one position across the batch)")
  else:
    tokens = train.batch_size * train.seq_len
    _require(tokens % moe.group_size == 0,
             f"config.model.moe.group_size={moe.group_size} does not divide the {tokens} "
             f"tokens of a batch (config.train.batch_size x config.train.seq_len)")


def _config_file_arg(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def _unknown_override(argv: list[str]) -> Optional[str]:
  """The first --config.KEY override that names no key of the config."""
  known = key_paths(default_config())
  sections = {path.rsplit(".", i)[0] for path in known for i in range(1, path.count("."))}
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key = "config." + arg[len("--config."):].split("=", 1)[0]
      if key not in known and key not in sections:
        return unknown_key_message(key, known)
  return None


def flags_parser(config_flag) -> Callable[[list[str]], list[str]]:
  """The absl `flags_parser` of a command with a `--config` file flag
  (`config_flag`, from `config_flags.DEFINE_config_file`): a bad --config
  file or override exits 1 with one line naming it."""
  return functools.partial(_parse_flags, config_flag)


def _parse_flags(config_flag, argv: list[str]) -> list[str]:
  try:
    remaining = flags.FLAGS(argv)
    # ml_collections defers a config file that failed to load to its first use
    # (a command whose --config is optional has None when it is not given).
    if config_flag.value is not None:
      _ = config_flag.value.keys()
    return remaining
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(argv) or f"a --config override is invalid ({e})"
  except SyntaxError as e:
    message = (f"--config={_config_file_arg(argv)}: syntax error at line {e.lineno}: "
               f"{e.msg}")
  except OSError as e:
    found = re.search(r"\[Errno \d+\] ([^:\n]+)", str(e))
    reason = found.group(1) if found else "not found or not readable"
    message = f"--config={_config_file_arg(argv)}: cannot load the config file ({reason})"
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself raised (a NameError in get_config, ...).
    message = (f"--config={_config_file_arg(argv)}: loading the config file failed: "
               f"{type(e).__name__}: {e}")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)
