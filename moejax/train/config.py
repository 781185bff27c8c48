"""The run configuration: every key with its default, and validation.

`default_config()` is the single definition of the keys; files in configs/
start from it and change what their run needs. `validate_config` checks a
config before anything is built or compiled and raises `ValueError` naming the
offending key.
"""

import dataclasses
import difflib
import math

import ml_collections

from moejax import data
from moejax.nn.transformer import REMAT_POLICIES
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


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default (documented in the README config table)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300
  config.train.batch_size = 32           # global, over all processes
  config.train.seq_len = 128
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 30
  # Length of the warmup + cosine schedule; None = steps. Set it to run the
  # first `steps` steps of a longer run (which then resumes on the same curve).
  config.train.schedule_steps = ml_collections.config_dict.placeholder(int)
  config.train.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  config.train.weight_decay = 0.1
  config.train.grad_clip = 1.0
  config.train.b1 = 0.9
  config.train.b2 = 0.95
  # Storage dtype of the AdamW moments (computed in float32 either way).
  config.train.moment_dtype = "float32"   # float32 | bfloat16
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_batches = 4
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 3
  config.train.peak_flops_per_device = ml_collections.config_dict.placeholder(float)
  # Resume even where the config differs from the checkpoint's in keys that
  # change training (fine-tuning, a lower learning rate after a divergence);
  # the differences are recorded in workdir/config_changes.jsonl.
  config.train.resume_with_changes = False

  # config.data: name, data_dir, manual_dir, text_key, train_split, eval_split,
  # tokenizer, vocab_size, num_domains, branching, loader (see moejax/data/pipeline.py).
  config.data = data.default_config()

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.head_dim = ml_collections.config_dict.placeholder(int)  # None = d_model / num_heads
  config.model.moe_every = 1
  config.model.first_dense_layers = 0
  config.model.tie_embeddings = True
  config.model.rope_base = 10000.0
  config.model.dtype = "float32"          # compute dtype: float32 | bfloat16
  # Storage dtype of the matmul weights (routers and norms stay float32).
  config.model.param_dtype = "float32"    # float32 | bfloat16
  # Stack the repeated layer unit and apply it with nnx.scan (flat compile time).
  config.model.scan_layers = False
  config.model.remat = "none"             # none | full | save_matmuls
  config.model.moe = moe_config()

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                   # -1 = all remaining devices
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


_DTYPES = ("float32", "bfloat16")


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


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; builds and compiles nothing.

  Checks that the keys are exactly those of `default_config()` (a typo in a
  config file is an error, as it is on the command line), the values of the
  train, model and mesh sections, and the data section through
  `moejax.data.validate_data_config`. The MoE options are checked by the model
  itself (`moejax.train.trainer.build_model` under `nnx.eval_shape`).
  """
  expected = key_paths(default_config())
  given = key_paths(config)
  unknown = sorted(set(given) - set(expected))
  missing = sorted(set(expected) - set(given))
  _require(not unknown, unknown_key_message(unknown[0], expected) if unknown else "")
  _require(not missing, f"config is missing key(s) {missing}")

  train = config.train
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
  init = config.init
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
  _require(isinstance(train.resume_with_changes, bool),
           f"config.train.resume_with_changes must be true or false, got "
           f"{train.resume_with_changes!r}")
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

  model = config.model
  for key in ("num_layers", "d_model", "num_heads", "moe_every"):
    _require(_is_int(model[key]) and model[key] > 0,
             f"config.model.{key} must be a positive integer, got {model[key]!r}")
  if model.head_dim is None:
    _require(model.d_model % model.num_heads == 0,
             f"config.model.num_heads={model.num_heads} does not divide config.model.d_model="
             f"{model.d_model}; change one, or set config.model.head_dim for another "
             f"attention width")
  else:
    _require(_is_int(model.head_dim) and model.head_dim > 0,
             f"config.model.head_dim must be a positive integer or None, got {model.head_dim!r}")
  _check_group_size(config)
  for section, key in ((model, "dtype"), (model, "param_dtype"), (train, "moment_dtype")):
    name = "model" if section is model else "train"
    _require(section[key] in _DTYPES,
             f"config.{name}.{key} must be one of {list(_DTYPES)}, got {section[key]!r}")
  _require(isinstance(model.scan_layers, bool),
           f"config.model.scan_layers must be true or false, got {model.scan_layers!r}")
  _require(model.remat in REMAT_POLICIES,
           f"config.model.remat must be one of {list(REMAT_POLICIES)}, got {model.remat!r}")
  for key in ("data", "expert", "model"):
    value = config.mesh[key]
    _require(_is_int(value) and (value == -1 or value > 0),
             f"config.mesh.{key} must be -1 (fill) or a positive integer, got {value!r}")

  lora.validate(config)
  data.validate_data_config(config.data)


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
