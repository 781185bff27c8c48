r"""Evaluates a run's newest checkpoint on its own, with other routing settings.

    python -m moejax.evaluate --workdir=DIR [--num_batches=N]
        [--eval_capacity_factor=F | --dropless] [--group_by=batch|sequence]
        [--scramble_after=P] [--replay=TRACE] [--dtype=float32|bfloat16] [--out=FILE]

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
  --dtype=...               the compute dtype (`model.dtype`; parameters as
                            stored): routing in bfloat16 against float32.
  --replay=TRACE            a routing trace (`python -m moejax.trace record`):
                            evaluates the trace's batches with every MoE layer
                            sending each token to the trace's experts, weighted
                            by this run's routers there (R3, arXiv 2510.11370).
                            A run's own trace reproduces its eval loss.
"""

import contextlib
import json
import sys
from typing import Any, Iterator, NamedTuple, Optional

from absl import app
from absl import flags
from absl import logging
import jax

from moejax import model as model_lib
from moejax import parallel
from moejax import quantize as quantize_lib
from moejax import run as run_lib
from moejax import trace as trace_lib
from moejax.train import checkpoints
from moejax.train import evaluator as evaluator_lib
from moejax.train import lora as lora_lib

# The evaluation's routing settings as config overrides (one definition).
eval_config = evaluator_lib.eval_config


def _check_settings(workdir, config, *, dropless, quantize, num_batches, scramble_after):
  """ValueError naming the first setting that does not apply to this run."""
  if num_batches < 1:
    raise ValueError(f"--num_batches={num_batches} must be >= 1")
  seq_len = config.train.seq_len
  if scramble_after is not None and not 0 < scramble_after < seq_len:
    raise ValueError(f"--scramble_after={scramble_after} must be in (0, seq_len={seq_len})")
  if not lora_lib.enabled(config):
    return
  if quantize is not None:
    raise ValueError(f"{workdir} is a LoRA run: --quantize applies to fully trained runs "
                     f"(config.finetune.lora.quantize_base quantizes a LoRA run's base)")
  if dropless and "experts" in lora_lib.parse_targets(config.finetune.lora.targets):
    raise ValueError(f"{workdir} is a LoRA run with adapters on the experts: --dropless "
                     f"runs them through the grouped matmul, which does not carry the "
                     f"adapters; use --eval_capacity_factor")


def _reader_mesh(config, vocab_size: int) -> jax.sharding.Mesh:
  """The reader mesh for the run's eval batches; settings that do not apply
  to the run's model are one message."""
  try:
    model_lib.check(config, vocab_size)
    mesh = model_lib.reader_mesh(config, config.train.batch_size)
    if lora_lib.enabled(config):  # the mesh chosen against the targets
      config.mesh.update({axis: mesh.shape[axis] for axis in parallel.AXES})
      lora_lib.validate(config)
  except ValueError as e:
    first_line = str(e).splitlines()[0]
    raise ValueError(f"these evaluation settings do not apply to this run: {first_line}"
                     ) from None
  return mesh


class Opened(NamedTuple):
  """A run opened for reading (`opened`): its newest readable checkpoint's
  parameters on the reader mesh, with the evaluation's config."""
  run: run_lib.Run
  step: int
  config: Any  # the trained config with the evaluation's routing settings
  trained: Any  # the config as trained
  dataset: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  params: Any
  num_batches: int

  def global_batches(self, local_batches) -> list[dict[str, jax.Array]]:
    """This process's rows of each batch -> global arrays on the mesh."""
    sharding = parallel.batch_sharding(self.mesh)
    return [model_lib.global_batch(b, sharding) for b in local_batches]


@contextlib.contextmanager
def opened(workdir: str, *, num_batches: Optional[int] = None,
           eval_capacity_factor: Optional[float] = None, dropless: bool = False,
           group_by: Optional[str] = None, scramble_after: Optional[int] = None,
           quantize: Optional[str] = None, dtype: Optional[str] = None
           ) -> Iterator[Opened]:
  """The one way the tools open a run: its newest checkpoint's parameters
  with its config under the evaluation's settings (`eval_config`; `dtype`:
  the compute dtype, default as trained), on the reader mesh, active while
  the `with` block runs. Settings that do not apply to the run are one
  ValueError."""
  run = run_lib.Run(workdir)
  _, trained = run.newest()
  config = eval_config(trained, eval_capacity_factor=eval_capacity_factor,
                       dropless=dropless, group_by=group_by, dtype=dtype)
  num_batches = num_batches or config.train.eval_batches
  _check_settings(workdir, config, dropless=dropless, quantize=quantize,
                  num_batches=num_batches, scramble_after=scramble_after)
  dataset = run.dataset(config)
  mesh = _reader_mesh(config, dataset.vocab_size)
  with parallel.activate(mesh):
    step, graphdef, params = run.restore_params(config, dataset.vocab_size, mesh)
    yield Opened(run, step, config, trained, dataset, mesh, graphdef, params, num_batches)


def evaluate(workdir: str, *, num_batches: Optional[int] = None,
             eval_capacity_factor: Optional[float] = None, dropless: bool = False,
             group_by: Optional[str] = None, scramble_after: Optional[int] = None,
             quantize: Optional[str] = None, replay: Optional[str] = None,
             dtype: Optional[str] = None) -> dict[str, Any]:
  """Evaluates the newest readable checkpoint of `workdir`; see the module
  docstring.

  `quantize`: a `moejax.quantize.SETTINGS` name; the routed experts' kernels
  are quantized (weight-only) before evaluating, and the result adds
  `quantize` and `expert_param_bytes` (their stored size).
  `replay`: a trace folder (`moejax.trace`); the evaluation runs on its
  batches with its experts (`num_batches` = all of them). `dtype`: the
  compute dtype of the evaluation (`model.dtype`; default as trained).
  """
  if quantize is not None:
    quantize_lib.check_setting(quantize)
  if replay is not None and (num_batches is not None or scramble_after is not None):
    raise ValueError("--replay evaluates the trace's own batches: --num_batches and "
                     "--scramble_after do not apply")
  with opened(workdir, num_batches=num_batches, eval_capacity_factor=eval_capacity_factor,
              dropless=dropless, group_by=group_by, scramble_after=scramble_after,
              quantize=quantize, dtype=dtype) as run:
    params, expert_bytes = quantize_lib.quantize_params(run.params, quantize)
    if replay is None:
      num_batches = run.num_batches
      batches = run.global_batches(run.dataset.eval_batches(num_batches))
    else:
      local = trace_lib.load(replay).replay_batches(run.config, run.dataset.vocab_size)
      num_batches, batches = len(local), run.global_batches(local)
    num_domains = 0 if replay else run.dataset.info.get("num_domains", 0)
    result = evaluator_lib.Evaluator(run.graphdef, num_domains=num_domains).run(params, batches)
    if scramble_after is not None:
      before, scrambled = (
          evaluator_lib.Evaluator(run.graphdef, num_domains=num_domains,
                                  loss_before=scramble_after, scramble=scramble
                                  ).run(params, batches)["loss"]
          for scramble in (False, True))
  config, moe = run.config, run.config.model.moe
  out: dict[str, Any] = {
      "workdir": run.run.path, "step": run.step, "num_batches": num_batches,
      "tokens": int(num_batches * config.train.batch_size * config.train.seq_len),
      "router": moe.router, "capacity_factor": run.trained.model.moe.capacity_factor,
      "eval_capacity_factor": (None if dropless else (
          moe.eval_capacity_factor if moe.eval_capacity_factor is not None
          else moe.capacity_factor)),
      "dropless": bool(dropless or moe.capacity_factor == 0), "group_by": moe.group_by,
      "quantize": quantize, "expert_param_bytes": expert_bytes, "replay": replay,
      "dtype": config.model.dtype}
  if scramble_after is not None:
    out.update({"scramble_after": scramble_after, "eval/loss_before": before,
                "eval/loss_before_scrambled": scrambled,
                "eval/future_leak": scrambled - before})
  moe_layers = model_lib.model_config(config).moe_layers
  out.update(evaluator_lib.layer_report(result, moe_layers))
  if moe_layers and len(result["expert_load"]):
    out["expert_load"] = result["expert_load"].tolist()
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
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype "
                                 "of the evaluation (default: as trained)."),
      "replay": flags.DEFINE_string(
          "replay", None, "A trace folder (python -m moejax.trace record): evaluate its "
          "batches with its experts, weighted by this run's routers."),
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
    run_lib.check_output_path(cli["out"].value)  # before the work, not after
    result = compute()
  except (ValueError, checkpoints.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if cli["out"].value:
    run_lib.write_json(cli["out"].value, result)
  else:
    print(json.dumps(result, indent=2))


def main(argv, cli: dict[str, Any]):
  json_cli(argv, cli, lambda: evaluate(
      cli["workdir"].value, num_batches=cli["num_batches"].value,
      eval_capacity_factor=cli["eval_capacity_factor"].value, dropless=cli["dropless"].value,
      group_by=cli["group_by"].value, scramble_after=cli["scramble_after"].value,
      replay=cli["replay"].value, dtype=cli["dtype"].value))


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
