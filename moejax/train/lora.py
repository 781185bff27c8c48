"""LoRA and QLoRA fine-tuning of a trained run, with qwix.

A fine-tuning run is a new workdir whose config sets

  config.finetune.base            the trained run's workdir (its newest checkpoint)
  config.finetune.lora.rank       r > 0 (0 = off: an ordinary run)
  config.finetune.lora.alpha      the LoRA scale: a layer computes
                                  x W + (alpha / r) x A B
  config.finetune.lora.targets    comma-separated, among
                                    router          the router kernel [D, E]
                                    experts         the routed experts' kernels,
                                                    one A and one B per expert
                                    shared_experts  the shared experts' MLP
                                    attention       qkv [D, 3, N, P] (one A, a B
                                                    per q/k/v head) and out
  config.finetune.lora.quantize_base   "none", or "int8" / "int4": QLoRA
                                  (Dettmers et al. 2023), the frozen base
                                  weights of the targets stored quantized
                                  (qwix PTQ, per-channel scales, per expert)

Everything else of the base is frozen: the other weights, embeddings, norms,
and router state such as the balancing bias (`after_step` does not run). The
optimizer sees only the adapters (`nnx.LoRAParam`), so its state is theirs;
a checkpoint holds the adapters and their optimizer state, and the run's
`finetuned_from.json` names the base (absolute workdir and step), so the run
resumes from the same base even after the base trains on. B starts at zero
(Hu et al. 2021): at step 0 the model computes the base's function.

How qwix adapts a layer: `qwix.apply_lora_to_model` runs the model once and,
for every `dot_general`/`einsum` in a target module whose right operand is one
of the module's parameters, adds `<name>_lora_a` / `<name>_lora_b` and then
adds (alpha / r) x A B to that product on every call of `__call__`. The model
feeds its kernels to their matmuls unsliced (`moejax.nn.attention.weight`)
for this, and the experts use a `dot_general` with the expert axis as a batch
axis, which gives every expert its own A [E, D, r] and B [E, r, H].

Limits: the dropless dispatcher's grouped matmul is not intercepted by qwix,
so `experts` needs a capacity dispatcher (`gather` or `einsum`; `validate`
refuses dropless with it, the other targets train dropless); a target
without adapters after applying (for example `router` on a dense model) is an
error naming it. LoRA runs use the unscanned layout (a scanned base is
converted on load). On a mesh, `build` creates the adapters by tracing the
model as on one device over a replicated copy of the base, then lays the
state out by `parallel.PARAM_AXES` (rules for adapters and quantized
weights); `validate` refuses `shared_experts`, and `attention` under QLoRA,
with `config.mesh.model > 1` (qwix's matmuls there give no output layout for
a sum over model-split axes). Only `__call__` is intercepted: the KV-cache decoding of
`moejax.generate` does not see the adapters, so generation is refused.
"""

import dataclasses
import json
import os
import re
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np
import qwix
from flax import nnx

from moejax import model as model_lib
from moejax import parallel
from moejax.nn import transformer as transformer_lib
from moejax.nn.config import ModelConfig, check_finite_above
from moejax.train import checkpoints

# Target name -> the module path (under a layer) whose matmuls it adapts.
TARGETS = {"router": "ffn/router", "experts": "ffn/experts",
           "shared_experts": "ffn/shared", "attention": "attention"}
QUANTIZE_BASE = ("none", "int8", "int4")
# Written into the fine-tuning run's workdir: the base run and step.
RECORD_FILE = "finetuned_from.json"
# Model keys a fine-tuning run may set differently from its base: they change
# how the base's function is computed, batched or regularized in training
# (capacity, routing groups, dispatch, losses, noise), not its parameters or
# what they mean.
_FREE_MODEL_KEYS = frozenset(
    ["config.model.remat", "config.model.scan_layers"]
    + [f"config.model.moe.{key}" for key in (
        "capacity_factor", "eval_capacity_factor", "capacity_rounding", "min_capacity",
        "group_by", "group_size", "batch_prioritized", "dispatch", "dropless_exchange",
        "grouped_matmul", "aux_loss_type", "aux_loss_weight", "z_loss_weight", "jitter",
        "noise_std", "expert_dropout")])


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a LoRA fine-tuning run (False for configs saved
  before `config.finetune` existed)."""
  finetune = config.get("finetune")
  lora = finetune.get("lora") if finetune is not None else None
  return bool(lora.get("rank", 0)) if lora is not None else False


def parse_targets(targets: Any) -> tuple[str, ...]:
  """`config.finetune.lora.targets` -> the target names; ValueError names a bad one."""
  if not isinstance(targets, str) or not targets.strip():
    raise ValueError(f"config.finetune.lora.targets must be a comma-separated list of "
                     f"{', '.join(TARGETS)}, got {targets!r}")
  names = tuple(part.strip() for part in targets.split(","))
  for name in names:
    if name not in TARGETS:
      raise ValueError(f"config.finetune.lora.targets={targets!r}: {name!r} is not a "
                       f"target; valid: {', '.join(TARGETS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.finetune.lora.targets={targets!r} names a target twice")
  return names


def validate(config: ml_collections.ConfigDict) -> None:
  """The `config.finetune` keys (no files are read)."""
  finetune, lora = config.finetune, config.finetune.lora
  rank = lora.rank
  if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
    raise ValueError(f"config.finetune.lora.rank must be an integer >= 0 (0 = off), "
                     f"got {rank!r}")
  check_finite_above("config.finetune.lora.alpha", lora.alpha, 0)
  if lora.quantize_base not in QUANTIZE_BASE:
    raise ValueError(f"config.finetune.lora.quantize_base must be one of "
                     f"{list(QUANTIZE_BASE)}, got {lora.quantize_base!r}")
  base = finetune.base
  if base is not None and not (isinstance(base, str) and base.strip()):
    raise ValueError(f"config.finetune.base must be a trained run's workdir or None, "
                     f"got {base!r}")
  if rank and base is None:
    raise ValueError(f"config.finetune.lora.rank={rank} fine-tunes a trained run: set "
                     f"config.finetune.base to its workdir")
  if base is not None and not rank:
    raise ValueError(f"config.finetune.base={base!r} needs config.finetune.lora.rank > 0 "
                     f"(LoRA is the fine-tuning moejax offers)")
  if rank and config.init.upcycle_from is not None:
    raise ValueError("config.finetune.base and config.init.upcycle_from both initialize "
                     "the model: set one")
  targets = parse_targets(lora.targets)
  model_split = config.mesh.model if isinstance(config.mesh.model, int) else 1
  unsplittable = [t for t in targets
                  if t == "shared_experts" or (t == "attention" and lora.quantize_base != "none")]
  if rank and model_split > 1 and unsplittable:
    raise ValueError(
        f"config.mesh.model={model_split} with LoRA on {', '.join(unsplittable)}"
        + (f" (quantize_base={lora.quantize_base!r})" if lora.quantize_base != "none" else "")
        + ": these matmuls sum over an axis split across the model devices, and qwix's "
        "adapter and quantized matmuls give no output layout for that sum on an Explicit "
        "mesh; use config.mesh.model=1 (data and expert parallelism take every target)")
  if rank and "experts" in targets and config.model.moe.dispatch == "dropless":
    raise ValueError(
        f"config.model.moe.dispatch='dropless' with config.finetune.lora.targets="
        f"{lora.targets!r}: qwix does not adapt the dropless grouped matmul, so the experts "
        f"would get no adapters; use dispatch 'gather' or 'einsum' with a capacity_factor "
        f"> 0 (dropless takes the router, shared_experts and attention targets)")
  if rank and config.model.scan_layers:
    raise ValueError("config.model.scan_layers=True: LoRA fine-tuning runs the unscanned "
                     "layout (a scanned base checkpoint is converted on load); set "
                     "config.model.scan_layers=False")


def base_run(config: ml_collections.ConfigDict, workdir: str
             ) -> tuple[str, int, ml_collections.ConfigDict]:
  """(base workdir, step, its config): the base and step recorded in
  `workdir` (a resumed or evaluated run; the recorded absolute path, else
  config.finetune.base), else config.finetune.base's newest checkpoint.
  ValueError names what is missing."""
  recorded = read_record(workdir)
  base = config.finetune.base
  if recorded is not None and os.path.isdir(recorded["base"]):
    base = recorded["base"]
  where = f"config.finetune.base={base!r}"
  if not os.path.isdir(base):
    raise ValueError(f"{where} is not a directory (a trained run's workdir)")
  steps = checkpoints.list_steps(base)
  if recorded is not None:
    step = recorded["step"]
    if step not in steps:
      raise ValueError(f"{where}: this run was fine-tuned from its checkpoint {step} "
                       f"({os.path.join(workdir, RECORD_FILE)}), which is gone; the "
                       f"adapters only make sense on that base")
  else:
    if not steps:
      raise ValueError(f"{where} holds no checkpoint (checkpoints/<step>/)")
    step = steps[-1]
  damage = checkpoints.check_files(os.path.join(base, "checkpoints", str(step)))
  if damage is not None:
    raise ValueError(f"{where}: its checkpoint {step} cannot be read ({damage})")
  saved = checkpoints.read_config(base, step)
  if saved is None:
    raise ValueError(f"{where}: checkpoint {step} records no config")
  base_config = ml_collections.ConfigDict(saved)
  if enabled(base_config):
    raise ValueError(f"{where} is itself a LoRA run; fine-tune a fully trained run")
  return base, step, base_config


def read_record(workdir: str) -> Optional[dict[str, Any]]:
  """`workdir`'s finetuned_from.json, or None before the run's first start.
  ValueError if it is damaged."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({e}); it names the base checkpoint this "
                     f"run's adapters belong to") from None
  if not (isinstance(record, dict) and isinstance(record.get("base"), str)
          and isinstance(record.get("step"), int)):
    raise ValueError(f"{path} does not name a base workdir and step (\"base\", \"step\"); "
                     f"it names the base checkpoint this run's adapters belong to")
  return record


def _model_keys(model: Any) -> dict[str, Any]:
  """{"config.model.<key>": value} of a config.model mapping, nested keys dotted."""
  flat = flax.traverse_util.flatten_dict(dict(model), sep=".")
  return {f"config.model.{key}": value for key, value in flat.items()}


def check_base(base_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first model key where `config` differs from the
  base run's (the adapters sit on the base's weights and function); keys
  the base's config predates count as their defaults."""
  given = _model_keys(config.model.to_dict())
  saved = {**_model_keys(dataclasses.asdict(ModelConfig())),
           **_model_keys(base_config.model.to_dict())}
  for key in sorted(set(given) | set(saved)):
    if key in _FREE_MODEL_KEYS:
      continue
    if given.get(key) != saved.get(key):
      raise ValueError(f"{key}={given.get(key)!r}, but the base run "
                       f"config.finetune.base={config.finetune.base!r} has "
                       f"{saved.get(key)!r}: a fine-tuning run keeps the base's model")


def module_pattern(targets: tuple[str, ...]) -> str:
  """The qwix module-path regex of `targets` (any layer, either layout)."""
  return r"(.*/)?(" + "|".join(re.escape(TARGETS[t]) for t in targets) + ")"


def apply(model: transformer_lib.TransformerLM, config: ml_collections.ConfigDict,
          tokens: jax.Array) -> transformer_lib.TransformerLM:
  """`model` with LoRA adapters on the targets (QLoRA: targets' base weights
  quantized first), from a sample batch of `tokens` <int32>[B, L]. Adapters
  are initialized from `config.seed` (A: He-uniform, B: zeros). ValueError if
  a target gets no adapter."""
  lora = config.finetune.lora
  targets = parse_targets(lora.targets)
  pattern = module_pattern(targets)
  qtype = None if lora.quantize_base == "none" else lora.quantize_base
  remat, model.remat = model.remat, "none"  # the first call creates the adapters

  @nnx.jit
  def adapted(model):
    # Traced, so that qwix follows a parameter through a dtype cast.
    if qtype is not None:
      model = qwix.quantize_model(
          model, qwix.PtqProvider([qwix.QtRule(module_path=pattern, weight_qtype=qtype)]),
          tokens)
      for _, module in nnx.iter_modules(model):
        if "qwix_rngs" in vars(module):  # set (static) by the PTQ pass
          delattr(module, "qwix_rngs")
    return qwix.apply_lora_to_model(
        model, qwix.LoraProvider(module_path=pattern, rank=lora.rank, alpha=float(lora.alpha),
                                 weight_qtype=qtype),
        tokens, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), 0x10A)))

  try:
    # Traced as on one device (no ambient mesh): qwix creates each adapter on
    # the layer's first call, which under a mesh would be inside the experts'
    # shard_map, with one device's share of the experts. `build` then lays
    # the adapters out by `parallel.PARAM_AXES`.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      model = adapted(model)
  finally:
    model.remat = remat
  found = adapter_counts(model)
  for target in targets:
    if not found.get(target):
      raise ValueError(_no_adapter_message(target, config))
  return model


def _no_adapter_message(target: str, config) -> str:
  moe = config.model.moe
  why = {
      "router": f"the model has no learned router (router={moe.router!r})",
      "shared_experts": "the model has no shared experts "
                        "(config.model.moe.num_shared_experts=0)",
      "experts": "the experts' matmuls were not intercepted: the dropless dispatcher's "
                 "grouped matmul is not one qwix adapts; set config.model.moe.dispatch to "
                 "'gather' or 'einsum' with a capacity_factor > 0, or the model has no "
                 "routed experts",
  }.get(target, "no matmul of that module was intercepted")
  return f"config.finetune.lora.targets names {target!r}, but no adapter was created: {why}"


def adapter_counts(model_or_state) -> dict[str, int]:
  """Adapter parameters per target: {target: number of scalars}."""
  state = (nnx.state(model_or_state, nnx.LoRAParam)
           if isinstance(model_or_state, nnx.Module) else model_or_state)
  counts: dict[str, int] = {}
  for path, variable in nnx.to_flat_state(state):
    module = "/".join(str(p) for p in path[:-1])
    for target, suffix in TARGETS.items():
      if module == suffix or module.endswith("/" + suffix):
        counts[target] = counts.get(target, 0) + int(np.prod(variable.get_value().shape))
  return counts


def split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(adapters, frozen base) of a LoRA model's state."""
  adapters, frozen = nnx.split_state(state, nnx.LoRAParam, ...)
  return adapters, frozen


def placed(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """A LoRA model's state laid out on `mesh` by `parallel.PARAM_AXES` (which
  has rules for the adapters and for qwix's quantized weights)."""
  return jax.device_put(state, parallel.param_shardings(state, mesh))


def attach(config: ml_collections.ConfigDict, vocab_size: int, mesh, graphdef, params,
           *, scanned: bool):
  """(graphdef, adapters, frozen base) of a fine-tuning run from its base's
  restored parameters (`graphdef`, `params`, in the base's layout: `scanned`):
  mapped to this run's unscanned layout, quantized where QLoRA asks, fresh
  adapters added, laid out on `mesh`. `moejax.run.lora_model` reads the base
  `Run` and calls this. Call under `parallel.activate(mesh)`."""
  train = config.train
  # qwix creates the adapters by running the model once on a batch this shape.
  sample_tokens = model_lib.global_batch(
      {"inputs": np.zeros((train.batch_size // jax.process_count(), train.seq_len),
                          np.int32)}, parallel.batch_sharding(mesh))["inputs"]
  if scanned:  # to this run's unscanned layout
    pure = transformer_lib.convert_layout(nnx.to_pure_dict(params), scanned=False,
                                          **model_lib.model_config(config).layout_args)
    graphdef, params = model_lib.abstract(config, vocab_size)
    nnx.replace_by_pure_dict(params, pure)
  # `apply` traces as on one device, so its inputs are replicated for it (a
  # passing copy of the base on every device), typed without the Explicit
  # mesh's layouts (which arrays made in the trace lack: the dropless grouped
  # matmul writes its rows into a fresh buffer); `placed` shards the result.
  replicated = jax.sharding.NamedSharding(parallel.with_auto_axes(mesh),
                                          jax.sharding.PartitionSpec())
  model = nnx.merge(graphdef, jax.device_put(params, replicated))
  model = apply(model, config, jax.device_put(sample_tokens, replicated))
  graphdef, state = nnx.split(model)
  adapters, frozen = split(placed(state, mesh))
  return graphdef, adapters, frozen


def describe(config: ml_collections.ConfigDict, base: str, step: int,
             adapters: nnx.State) -> dict[str, Any]:
  """The record a fine-tuning run keeps of its base and adapters."""
  lora = config.finetune.lora
  return {"base": os.path.abspath(base), "step": step,
          "targets": list(parse_targets(lora.targets)), "rank": lora.rank,
          "alpha": lora.alpha, "quantize_base": lora.quantize_base,
          "adapter_params": adapter_counts(adapters)}
