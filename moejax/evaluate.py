r"""Evaluates a run's newest checkpoint on its own, with other routing settings.

    python -m moejax.evaluate --workdir=DIR [--num_batches=N]
        [--eval_capacity_factor=F | --dropless] [--group_by=batch|sequence]
        [--scramble_after=P] [--out=FILE]

Loads the parameters of the newest checkpoint of DIR (no optimizer state)
with the config they were trained with, and prints (or writes to --out) one
JSON object: the step, the settings, `eval/loss` (nats per target token) on
N held-out batches (the run's `eval_batches` by default; the first batches are
the ones training evaluated on), and per MoE layer i `eval/layer{i}/...`:
`max_violation`, `dropped_fraction`, `router_entropy`, `unrouted_fraction`
(expert choice), `dead_experts`, and on `synthetic_mixture`
`expert_domain_mi` (bits), with their means over layers and the expert load
of every layer (`expert_load`).

Routing settings (parameters are unchanged by all of them):
  (none)                    the trained routing: `eval_capacity_factor` as trained
                            (None = the training capacity factor).
  --eval_capacity_factor=F  every MoE layer evaluates with capacity factor F.
  --dropless                no capacity: token-choice routers with the dropless
                            dispatcher (expert choice has no dropless form).
  --group_by=...            routing groups of the evaluation (`batch` routes the
                            tokens at one position together: causal).
  --scramble_after=P        replaces every row's tokens from position P on with
                            another row's and counts the loss on positions < P
                            only (`eval/loss_before`, also without the
                            replacement): a causal model scores the same both
                            ways; the difference is what routing leaks from the
                            future (`eval/future_leak` = scrambled - real).
"""

import json
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moejax import data as data_lib
from moejax import parallel
from moejax import quantize as quantize_lib
from moejax.train import checkpoints
from moejax.train import config as config_lib
from moejax.train import lora as lora_lib
from moejax.train import routing_report
from moejax.train import steps as steps_lib
from moejax.train import trainer

_LAYER_METRICS = ("dropped_fraction", "router_entropy", "unrouted_fraction")


def load_config(workdir: str) -> tuple[int, ml_collections.ConfigDict]:
  """(newest step, the config it was trained with) of a run directory."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is not a directory")
  steps = checkpoints.list_steps(workdir)
  if not steps:
    raise ValueError(f"{workdir} holds no checkpoint (checkpoints/<step>/)")
  recorded = checkpoints.read_config(workdir, steps[-1])
  if recorded is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"{workdir}: checkpoint {steps[-1]} records no config and there is "
                       f"no config.json")
    with open(path) as f:
      recorded = json.load(f)
  return steps[-1], ml_collections.ConfigDict(recorded)


def eval_config(config: ml_collections.ConfigDict, *, eval_capacity_factor=None,
                dropless: bool = False, group_by: Optional[str] = None
                ) -> ml_collections.ConfigDict:
  """The config with the evaluation's routing settings; ValueError names a bad one."""
  config = ml_collections.ConfigDict(config.to_dict())
  moe = config.model.moe
  if dropless and eval_capacity_factor is not None:
    raise ValueError("give either --eval_capacity_factor or --dropless, not both")
  if dropless:
    moe.capacity_factor = 0.0
    moe.eval_capacity_factor = None
    moe.dispatch = "dropless"
  elif eval_capacity_factor is not None:
    if not np.isfinite(eval_capacity_factor) or eval_capacity_factor <= 0:
      raise ValueError(f"--eval_capacity_factor={eval_capacity_factor} must be > 0 "
                       f"(use --dropless for no capacity)")
    moe.eval_capacity_factor = float(eval_capacity_factor)
    if moe.dispatch == "dropless":  # a capacity needs a capacity dispatcher
      moe.dispatch = "auto"
  if group_by is not None:
    moe.group_by = group_by
    moe.group_size = None
  try:
    config_lib.validate_config(config)
  except ValueError as e:
    raise ValueError(f"these evaluation settings do not apply to this run: {e}") from None
  return config


def _make_eval_step(graphdef, num_domains: int, loss_before: Optional[int] = None,
                    scramble: bool = False):
  """The jitted eval step; with `loss_before` = P only positions < P count in the
  loss, and with `scramble` positions >= P hold another row's tokens. Routing
  always sees the batch's own padding mask."""
  @jax.jit
  def eval_step(params, batch):
    mask = steps_lib.padding_mask(batch)
    inputs, weights = batch["inputs"], batch["weights"]
    positions = jnp.arange(inputs.shape[1])[None, :]
    if loss_before is not None:
      weights = jnp.where(positions < loss_before, weights, 0.0)
      if scramble:  # another row's future: rows are independent windows of the corpus
        inputs = jnp.where(positions >= loss_before, jnp.roll(inputs, 1, axis=0), inputs)
    logits, aux = nnx.merge(graphdef, params)(inputs, mask=mask)
    total, count = steps_lib.cross_entropy(logits, batch["targets"], weights)
    layers = aux.get("layers", {})
    scalars = {name: jnp.stack([jnp.asarray(layer.get(name, jnp.nan), jnp.float32)
                                for layer in layers.values()]) if layers else jnp.zeros(0)
               for name in _LAYER_METRICS}
    loads = steps_lib.layer_loads(aux)
    joints = [routing_report.joint_counts(batch["domain"], layer["first_expert"],
                                          num_domains, loads.shape[-1], mask)
              for layer in layers.values() if num_domains and "domain" in batch]
    joint = jnp.stack(joints) if joints else jnp.zeros((0, 0, 0), jnp.float32)
    return total, count, loads, joint, scalars
  return eval_step


def _run_batches(eval_step, params, batches) -> dict[str, Any]:
  total = count = 0.0
  loads = joint = 0.0
  scalars = {}
  for batch in batches:
    b_total, b_count, b_loads, b_joint, b_scalars = eval_step(params, batch)
    total += float(b_total)
    count += float(b_count)
    loads = loads + np.asarray(b_loads, np.float64)
    joint = joint + np.asarray(b_joint, np.float64)
    for name, value in b_scalars.items():
      scalars[name] = scalars.get(name, 0.0) + np.asarray(value, np.float64)
  n = max(len(batches), 1)
  return {"loss": total / max(count, 1.0), "loads": np.asarray(loads) / n,
          "joint": np.asarray(joint), "scalars": {k: v / n for k, v in scalars.items()}}


def evaluate(workdir: str, *, num_batches: Optional[int] = None,
             eval_capacity_factor: Optional[float] = None, dropless: bool = False,
             group_by: Optional[str] = None, scramble_after: Optional[int] = None,
             quantize: Optional[str] = None) -> dict[str, Any]:
  """Evaluates the newest checkpoint of `workdir`; see the module docstring.

  `quantize`: a `moejax.quantize.SETTINGS` name; the routed experts' kernels
  are quantized (weight-only) before evaluating, and the result adds
  `quantize` and `expert_param_bytes` (their stored size).
  """
  if quantize is not None:
    quantize_lib.check_setting(quantize)
  step, trained = load_config(workdir)
  config = eval_config(trained, eval_capacity_factor=eval_capacity_factor,
                       dropless=dropless, group_by=group_by)
  num_batches = num_batches or config.train.eval_batches
  if num_batches < 1:
    raise ValueError(f"--num_batches={num_batches} must be >= 1")
  seq_len = config.train.seq_len
  if scramble_after is not None and not 0 < scramble_after < seq_len:
    raise ValueError(f"--scramble_after={scramble_after} must be in (0, seq_len={seq_len})")
  dataset = data_lib.make_dataset(
      config.data, seq_len=seq_len, global_batch_size=config.train.batch_size,
      seed=config.seed, cache_dir=os.path.join(workdir, "data_cache"))
  vocab_size = dataset.vocab_size
  config.mesh.data, config.mesh.expert, config.mesh.model = -1, 1, 1
  if config.train.batch_size % jax.device_count():
    config.mesh.data = 1
    config.mesh.model = jax.device_count()
  try:
    trainer.check_model_config(config, vocab_size)
  except ValueError as e:
    first_line = str(e).splitlines()[0]
    raise ValueError(f"these evaluation settings do not apply to this run: {first_line}"
                     ) from None
  if lora_lib.enabled(config):
    if quantize is not None:
      raise ValueError(f"{workdir} is a LoRA run: --quantize applies to fully trained runs "
                       f"(config.finetune.lora.quantize_base quantizes a LoRA run's base)")
    if dropless and "experts" in lora_lib.parse_targets(config.finetune.lora.targets):
      raise ValueError(f"{workdir} is a LoRA run with adapters on the experts: --dropless "
                       f"runs them through the grouped matmul, which does not carry the "
                       f"adapters; use --eval_capacity_factor")
    try:  # the mesh chosen above (for example split heads) against the targets
      lora_lib.validate(config)
    except ValueError as e:
      raise ValueError(f"these evaluation settings do not apply to this run: {e}") from None
  mesh = trainer.make_mesh(config)
  with parallel.activate(mesh):
    graphdef, params = trainer.restore_params(workdir, step, config, vocab_size, mesh)
    params, expert_bytes = quantize_lib.quantize_params(params, quantize)
    batch_sharding = parallel.batch_sharding(mesh)
    batches = [trainer.global_batch(b, batch_sharding)
               for b in dataset.eval_batches(num_batches)]
    num_domains = dataset.info.get("num_domains", 0)
    result = _run_batches(_make_eval_step(graphdef, num_domains), params, batches)
    if scramble_after is not None:
      before = _run_batches(_make_eval_step(graphdef, num_domains, scramble_after),
                            params, batches)
      scrambled = _run_batches(_make_eval_step(graphdef, num_domains, scramble_after,
                                               scramble=True), params, batches)
  moe = config.model.moe
  out: dict[str, Any] = {
      "workdir": os.path.abspath(workdir), "step": step, "num_batches": num_batches,
      "tokens": int(num_batches * config.train.batch_size * seq_len),
      "router": moe.router, "capacity_factor": trained.model.moe.capacity_factor,
      "eval_capacity_factor": (None if dropless else (
          moe.eval_capacity_factor if moe.eval_capacity_factor is not None
          else moe.capacity_factor)),
      "dropless": bool(dropless or moe.capacity_factor == 0), "group_by": moe.group_by,
      "quantize": quantize, "expert_param_bytes": expert_bytes,
      "eval/loss": result["loss"]}
  if scramble_after is not None:
    out.update({"scramble_after": scramble_after, "eval/loss_before": before["loss"],
                "eval/loss_before_scrambled": scrambled["loss"],
                "eval/future_leak": scrambled["loss"] - before["loss"]})
  out.update(_layer_report(config, result))
  return out


def _layer_report(config, result) -> dict[str, Any]:
  moe_layers = [i for i, is_moe in enumerate(trainer.nn_layer_flags(config)) if is_moe]
  out: dict[str, Any] = {}
  if not moe_layers:
    return out
  loads = result["loads"]
  per_layer: dict[str, list[float]] = {}
  for index, layer in enumerate(moe_layers):
    values = {"max_violation": float(routing_report.max_violation(loads[index])),
              "dead_experts": float(routing_report.dead_experts(loads[index]))}
    for name in _LAYER_METRICS:
      value = float(result["scalars"][name][index])
      if np.isfinite(value):
        values[name] = value
    if np.ndim(result["joint"]) == 3 and result["joint"].shape[1] > 0:
      values["expert_domain_mi"] = routing_report.mutual_information_bits(
          result["joint"][index])
    for name, value in values.items():
      out[f"eval/layer{layer}/{name}"] = value
      per_layer.setdefault(name, []).append(value)
  out.update({f"eval/{name}": float(np.mean(v)) for name, v in per_layer.items()})
  out["expert_load"] = np.asarray(loads).tolist()
  out["moe_layers"] = moe_layers
  return out


def _define_flags() -> dict[str, Any]:
  """The CLI's flags, defined only when this module is the program (the library
  is imported by tools with flags of their own, e.g. --workdir)."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "Run directory with checkpoints/."),
      "num_batches": flags.DEFINE_integer("num_batches", None, "Held-out batches "
                                          "(default: the run's train.eval_batches)."),
      "eval_capacity_factor": flags.DEFINE_float(
          "eval_capacity_factor", None, "Capacity factor at evaluation (default: as trained)."),
      "dropless": flags.DEFINE_bool("dropless", False, "Evaluate without capacity "
                                    "(token choice)."),
      "group_by": flags.DEFINE_enum("group_by", None, ["batch", "sequence"], "Routing groups "
                                    "of the evaluation (default: as trained)."),
      "scramble_after": flags.DEFINE_integer(
          "scramble_after", None, "Measure the routing leak: replace tokens from this "
          "position on (see the module docstring)."),
      "out": flags.DEFINE_string("out", None, "Write the JSON here (default: print it)."),
  }


def check_workdir_cli(argv, workdir: Optional[str],
                      verbosity: int = logging.ERROR) -> None:
  """The common start of a CLI that reads a run directory: exits with one
  message (status 2) on stray arguments or without --workdir, and quiets
  logging to `verbosity` unless --verbosity was given (orbax warns about
  read-only folders)."""
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not workdir:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(verbosity)


def json_cli(argv, cli: dict[str, Any], compute) -> None:
  """Runs a JSON-printing CLI over a run directory: `check_workdir_cli`, then
  `compute()` (bad input is one "error: ..." line, exit status 1), then the
  JSON to --out if given, else to stdout."""
  check_workdir_cli(argv, cli["workdir"].value)
  try:
    result = compute()
  except (ValueError, checkpoints.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  text = json.dumps(result, indent=2)
  if cli["out"].value:
    with open(cli["out"].value, "w") as f:
      f.write(text + "\n")
  else:
    print(text)


def main(argv, cli: dict[str, Any]):
  json_cli(argv, cli, lambda: evaluate(
      cli["workdir"].value, num_batches=cli["num_batches"].value,
      eval_capacity_factor=cli["eval_capacity_factor"].value, dropless=cli["dropless"].value,
      group_by=cli["group_by"].value, scramble_after=cli["scramble_after"].value))


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
