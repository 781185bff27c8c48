r"""Samples text from a run's newest checkpoint, with a key/value cache.

    python -m moejax.generate --workdir=DIR --prompt="ROMEO:" [--prompt=...]
        [--max_new_tokens=200] [--temperature=0.8] [--top_k=0] [--top_p=1.0]
        [--seed=0] [--dropless] [--quantize=int8|int4] [--mesh=auto] [--out=FILE]

Loads only the parameters of the newest checkpoint of DIR (no optimizer
state) with the config they were trained with, on a mesh of your choice
(`--mesh=data,expert,model`; default `auto`, the readers' policy
`moejax.model.reader_mesh`: the prompts split over "data" as far as they
divide the devices, the rest on "model" (heads and expert hidden units), or
on "expert" where the heads do not divide), and samples `--max_new_tokens`
tokens after every prompt. Prints each prompt's continuation (or writes a
JSON object with the settings and the samples to --out).

`--quantize=int8` (or int4, ...: `moejax.quantize.SETTINGS`) samples with
the routed experts' weights quantized per expert and channel.

Prompts are text, tokenized with the run's tokenizer (byte or its
SentencePiece model) after a document separator (the token that starts every
document in training), so an empty prompt starts a new document. A sample
ends early at the next separator (the end of its document). Runs on
`synthetic_mixture` have no text: their prompts are space-separated token ids
and samples print as ids.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature,
restricted to the `top_k` most probable tokens (0 = all) and to the smallest
set whose probability reaches `top_p` (nucleus sampling, Holtzman et al.
2020; 1.0 = all), sampled with keys derived from `--seed` and the position:
the same seed and prompts give the same samples.

Routing at decode time is per position and causal. The model is built with
`group_by="batch"`: the routing group of a step is the B sequences' tokens at
that position, the only tokens that exist when it is decoded. Token-choice
routers apply their evaluation capacity (`eval_capacity_factor`, else the
training factor) to those B tokens, or none with `--dropless`; expert choice
lets each expert take its share of them; dense and dropless routing are
token-local. Decoding therefore computes exactly what a full forward pass of
the same model computes on the finished sequences (tests/test_generate.py
checks this for every router), and it matches training when the run trained
with `group_by="batch"` on batches of B sequences (configs/default.py's
routing) or with token-local routing; a run that routed groups of one
sequence (group_by="sequence") with a capacity is decoded with a different
capacity rule, which `--dropless` avoids for token-choice routers.

Prompts of different lengths: all sequences start at position 0; the common
prefix of the shortest prompt is read in one pass, and after it each step
feeds every sequence its next prompt token while it still has one, else its
last sample.
"""

import dataclasses
import sys
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moejax import evaluate as evaluate_lib
from moejax import model as model_lib
from moejax import parallel
from moejax import quantize as quantize_lib
from moejax import run as run_lib
from moejax.train import checkpoints
from moejax.train import evaluator as evaluator_lib
from moejax.train import lora as lora_lib


# The most tokens sampled after a prompt: the key/value cache is allocated for
# the whole length up front (1e9 would ask for hundreds of GB).
MAX_NEW_TOKENS = 1 << 16


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How the next token is drawn from the logits (see the module docstring)."""
  max_new_tokens: int = 200
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def check(self) -> None:
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
        or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
      raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}] (the "
                       f"key/value cache holds every position), got {self.max_new_tokens!r}")
    if not np.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                       f"{self.temperature!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = all tokens), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = all tokens), got {self.top_p!r}")


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int,
                  top_p: float, vocab_size: Optional[int] = None) -> jax.Array:
  """<int32>[B] next tokens from <float32>[B, V] logits (see SamplingOptions).

  Ids >= `vocab_size` (a model vocabulary padded beyond the tokenizer's) are
  never drawn.
  """
  logits = logits.astype(jnp.float32)
  if vocab_size is not None and vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep a token while the tokens more probable than it hold < top_p: the
    # smallest prefix of the sorted vocabulary whose mass reaches top_p.
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_tokens(model, prompts: Sequence[Sequence[int]], options: SamplingOptions, *,
                    vocab_size: Optional[int] = None, stop_id: Optional[int] = None
                    ) -> list[list[int]]:
  """Continuations of token-id prompts: for each prompt, up to
  `options.max_new_tokens` sampled ids (cut after the first `stop_id`).

  `model` is a `TransformerLM` (its routing as described in the module
  docstring); every prompt must hold at least one token. A model whose
  parameters live on a mesh (`load(...).model`) decodes under that mesh
  unless the caller made another one ambient (`parallel.activate`).
  """
  mesh = _params_mesh(model)
  if mesh is None or parallel.current_mesh() is not None:
    return _generate_tokens(model, prompts, options, vocab_size, stop_id)
  with parallel.activate(mesh):
    return _generate_tokens(model, prompts, options, vocab_size, stop_id)


def _params_mesh(model) -> Optional[jax.sharding.Mesh]:
  """The mesh the model's parameters are laid out on (None: no mesh)."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return None


def _generate_tokens(model, prompts, options, vocab_size, stop_id) -> list[list[int]]:
  options.check()
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  total = int(lengths.max()) + options.max_new_tokens
  buffer = np.zeros((batch, total), np.int32)
  for row, prompt in enumerate(prompts):
    buffer[row, :len(prompt)] = prompt
  first = int(lengths.min())
  graphdef, state = nnx.split(model)
  sample = dict(temperature=options.temperature, top_k=options.top_k,
                top_p=options.top_p, vocab_size=vocab_size)

  @jax.jit
  def prefill(state, tokens, cache):
    return nnx.merge(graphdef, state).decode(tokens, cache)

  @jax.jit
  def step(state, cache, logits, forced, lengths, position):
    key = jax.random.fold_in(jax.random.key(options.seed), position)
    drawn = sample_logits(logits[:, -1], key, **sample)
    token = jnp.where(position < lengths, forced, drawn)
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
    return token, logits, cache

  cache = model.init_cache(batch, total)
  logits, cache = prefill(state, jnp.asarray(buffer[:, :first]), cache)
  lengths_device = jnp.asarray(lengths)
  for position in range(first, total):
    token, logits, cache = step(state, cache, logits, jnp.asarray(buffer[:, position]),
                                lengths_device, jnp.int32(position))
    buffer[:, position] = np.asarray(token)
  out = []
  for row in range(batch):
    new = buffer[row, lengths[row]:lengths[row] + options.max_new_tokens].tolist()
    if stop_id is not None and stop_id in new:
      new = new[:new.index(stop_id) + 1]
    out.append(new)
  return out


@dataclasses.dataclass
class Generator:
  """A run's newest parameters and tokenizer, ready to sample (`load`)."""
  model: Any
  config: ml_collections.ConfigDict
  step: int
  tokenizer: Any  # None for synthetic_mixture (prompts and samples are ids)
  vocab_size: int
  mesh: jax.sharding.Mesh

  def encode(self, prompt: str) -> list[int]:
    if self.tokenizer is None:
      try:
        ids = [int(t) for t in prompt.split()]
      except ValueError:
        raise ValueError(f"{self.config.data.name} has no text tokenizer: a prompt is "
                         f"space-separated token ids, got {prompt!r}") from None
      if any(not 0 <= i < self.vocab_size for i in ids):
        raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {prompt!r}")
      return ids
    separator = [self.tokenizer.eos_id]
    return separator + ([] if not prompt else
                        self.tokenizer.encode_documents([prompt])[:-1].tolist())

  def decode(self, ids: Sequence[int]) -> str:
    if self.tokenizer is None:
      return " ".join(str(i) for i in ids)
    if ids and ids[-1] == self.tokenizer.eos_id:
      ids = ids[:-1]
    return self.tokenizer.decode(ids)

  def generate(self, prompts: Sequence[str], options: SamplingOptions = SamplingOptions()
               ) -> list[str]:
    """The continuation of each prompt, detokenized."""
    encoded = [self.encode(p) for p in prompts]
    if self.tokenizer is None and any(not e for e in encoded):
      raise ValueError("a synthetic_mixture prompt needs at least one token id")
    stop = None if self.tokenizer is None else self.tokenizer.eos_id
    ids = generate_tokens(self.model, encoded, options, vocab_size=self.vocab_size,
                          stop_id=stop)
    return [self.decode(i) for i in ids]


def parse_mesh(text: str) -> Optional[dict[str, int]]:
  """"data,expert,model" -> config.mesh values (-1 = the devices left over);
  "auto" -> None (the readers' mesh policy, `moejax.model.reader_mesh`)."""
  if text == "auto":
    return None
  parts = text.split(",")
  try:
    values = [int(p) for p in parts]
  except ValueError:
    values = []
  if len(values) != 3:
    raise ValueError(f"--mesh must be auto or three integers data,expert,model (-1 = the "
                     f"rest), got {text!r}")
  return dict(zip(("data", "expert", "model"), values))


def _device_mesh(config, mesh: str, batch_size: int) -> jax.sharding.Mesh:
  """The mesh the model is sampled on: --mesh, checked against the devices and
  the model (not the training batch), or the readers' policy for `batch_size`
  prompts."""
  sizes = parse_mesh(mesh)
  if sizes is None:
    return model_lib.reader_mesh(config, batch_size)
  mesh_only = ml_collections.ConfigDict(config.to_dict())
  mesh_only.mesh.update(sizes)
  resolved = parallel.validate_mesh_config(sizes, num_devices=jax.device_count())
  mesh_only.train.batch_size = parallel.mesh.batch_shards(resolved)
  return model_lib.make_mesh(mesh_only, training=False)


def load(workdir: str, *, dropless: bool = False, mesh: str = "auto",
         quantize: Optional[str] = None, batch_size: int = 1) -> Generator:
  """The newest readable checkpoint of `workdir` as a Generator (see the
  module docstring), on `mesh` ("data,expert,model", or "auto": the readers'
  policy for `batch_size` prompts); `quantize` (a `moejax.quantize.SETTINGS`
  name, e.g. "int8") quantizes the routed experts' kernels, per expert."""
  if quantize is not None:
    quantize_lib.check_setting(quantize)
  run = run_lib.Run(workdir)
  _, trained = run.newest()
  if lora_lib.enabled(trained):
    raise ValueError(f"{workdir} is a LoRA fine-tuning run: its adapters act through "
                     f"qwix's interception of the model's __call__, which KV-cache "
                     f"decoding does not go through; evaluate it with python -m "
                     f"moejax.evaluate --workdir={workdir}")
  config = evaluator_lib.eval_config(trained, dropless=dropless, group_by="batch")
  dataset = run.dataset(config)
  vocab_size = dataset.vocab_size
  device_mesh = _device_mesh(config, mesh, batch_size)
  with parallel.activate(device_mesh):
    step, graphdef, params = run.restore_params(config, vocab_size, device_mesh)
    params, _ = quantize_lib.quantize_params(params, quantize)
  return Generator(model=nnx.merge(graphdef, params), config=config, step=step,
                   tokenizer=getattr(dataset, "tokenizer", None), vocab_size=vocab_size,
                   mesh=device_mesh)


def _define_flags() -> dict[str, Any]:
  defaults = SamplingOptions()
  return {
      "workdir": flags.DEFINE_string("workdir", None, "Run directory with checkpoints/."),
      "prompt": flags.DEFINE_multi_string("prompt", [""], "A prompt (repeat for a batch)."),
      "max_new_tokens": flags.DEFINE_integer("max_new_tokens", defaults.max_new_tokens,
                                             "Tokens sampled after each prompt."),
      "temperature": flags.DEFINE_float("temperature", defaults.temperature,
                                        "Softmax temperature; 0 = greedy."),
      "top_k": flags.DEFINE_integer("top_k", defaults.top_k, "Sample among the k most "
                                    "probable tokens; 0 = all."),
      "top_p": flags.DEFINE_float("top_p", defaults.top_p, "Nucleus sampling mass; 1 = all."),
      "seed": flags.DEFINE_integer("seed", defaults.seed, "Sampling seed."),
      "dropless": flags.DEFINE_bool("dropless", False, "Route without a capacity "
                                    "(token-choice routers)."),
      "quantize": flags.DEFINE_enum("quantize", None, list(quantize_lib.SETTINGS),
                                    "Quantize the routed experts' weights (per expert)."),
      "mesh": flags.DEFINE_string("mesh", "auto", "Device mesh data,expert,model (-1 = "
                                  "the devices left over), or auto: the prompts over "
                                  "data, the rest on model (or expert)."),
      "out": flags.DEFINE_string("out", None, "Write a JSON object here (default: print "
                                 "the samples)."),
  }


def main(argv, cli: dict[str, Any]):
  evaluate_lib.check_workdir_cli(argv, cli["workdir"].value)
  options = SamplingOptions(max_new_tokens=cli["max_new_tokens"].value,
                            temperature=cli["temperature"].value, top_k=cli["top_k"].value,
                            top_p=cli["top_p"].value, seed=cli["seed"].value)
  prompts = cli["prompt"].value
  try:
    options.check()
    run_lib.check_output_path(cli["out"].value)  # before the work, not after
    generator = load(cli["workdir"].value, dropless=cli["dropless"].value,
                     mesh=cli["mesh"].value, quantize=cli["quantize"].value,
                     batch_size=len(prompts))
    samples = generator.generate(prompts, options)
  except (ValueError, checkpoints.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if cli["out"].value:
    record = {"workdir": cli["workdir"].value, "step": generator.step,
              **dataclasses.asdict(options), "dropless": cli["dropless"].value,
              "quantize": cli["quantize"].value,
              "samples": [{"prompt": p, "continuation": s} for p, s in zip(prompts, samples)]}
    run_lib.write_json(cli["out"].value, record)
    return
  for prompt, sample in zip(prompts, samples):
    print(prompt + sample)
    print("-" * 40)


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
