"""`config.data` -> dataset: one validation pass, one factory.

Keys of `config.data` (defaults in `DEFAULTS`):
  name          "synthetic_mixture", "python_stdlib" (this interpreter's standard
                library source, corpora.py) or a TFDS text dataset
                ("tiny_shakespeare", "lm1b", "c4/en", ...; a config and version
                may follow the name). TFDS is the optional `tfds` install;
                tiny_shakespeare with a manual_dir is read without it
                (corpora.py, the same splits)
  data_dir      TFDS data_dir (None = TFDS's default)
  manual_dir    folder holding the files TFDS would download (offline builds)
  text_key      the TFDS feature holding the text
  train_split   TFDS split to train on (slices such as "train[:90%]" work)
  eval_split    TFDS split held out for evaluation
  tokenizer     "byte" (vocab 257), "sentencepiece" (trained on train_split) or
                "hf" (a Hugging Face tokenizer.json at tokenizer_path)
  tokenizer_path  "hf": the tokenizer.json, or the checkpoint folder holding it
  vocab_size    synthetic_mixture vocabulary / SentencePiece size (byte: ignored;
                hf: the model's embedding rows if larger than the tokenizer's)
  num_domains   synthetic_mixture: number of Markov sources
  branching     synthetic_mixture: successors per state of each source
  domains       synthetic_mixture: the domains rows are drawn from, as
                comma-separated indices ("0,1,2"); "" = all num_domains. The
                sources are the same whatever the subset (they depend on seed
                and num_domains only), so a run on "0,1,2" and one on "3" see
                held-out domains of one mixture (the LoRA study, moejax/train/lora.py).
  loader        TFDS datasets: "memory" (one .npy token stream per split, an
                in-memory permutation of all windows per epoch) or "grain"
                (tokens in ArrayRecord chunks read at random by a Grain
                pipeline with an O(1)-memory shuffle: memory stays flat as the
                corpus grows; see streaming.py). Both give batches that depend
                only on (seed, step) and resume exactly; the orders differ.
                synthetic_mixture is generated per step and takes "memory".
"""

import importlib.util
import os
from typing import Any, Mapping, Optional, Union

import ml_collections

from moejax.data import base
from moejax.data import corpora
from moejax.data import synthetic
from moejax.data import text
from moejax.data import tokenizers

SYNTHETIC = "synthetic_mixture"

DEFAULTS: dict[str, Any] = {
    "name": SYNTHETIC,
    "data_dir": None,
    "manual_dir": None,
    "text_key": "text",
    "train_split": "train",
    "eval_split": "validation",
    "tokenizer": "byte",
    "tokenizer_path": None,
    "vocab_size": 512,
    "num_domains": 4,
    "branching": 4,
    "domains": "",
    "loader": "memory",
}

LOADERS = ("memory", "grain")

DataConfig = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def default_config() -> ml_collections.ConfigDict:
  """`config.data` with every key at its default."""
  config = ml_collections.ConfigDict(DEFAULTS)
  for key in ("data_dir", "manual_dir", "tokenizer_path"):
    config[key] = ml_collections.config_dict.placeholder(str)
  return config


def _resolved(data_config: DataConfig) -> dict[str, Any]:
  """Plain dict of the config with defaults for absent keys; rejects unknown keys."""
  if isinstance(data_config, ml_collections.ConfigDict):
    given = data_config.to_dict()
  elif isinstance(data_config, Mapping):
    given = dict(data_config)
  else:
    raise ValueError(f"config.data must be a ConfigDict or a mapping, got "
                     f"{type(data_config).__name__}")
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.data key(s) {unknown}; valid keys: {sorted(DEFAULTS)}")
  config = {**DEFAULTS, **given}
  for key in ("data_dir", "manual_dir", "tokenizer_path"):  # "~/data" works as on the CLI
    if isinstance(config[key], str) and text.is_local_path(config[key]):
      config[key] = os.path.expanduser(config[key])
  return config


def _check_positive_int(config: dict[str, Any], key: str, minimum: int = 1) -> None:
  value = config[key]
  if not base.is_int(value) or value < minimum:
    raise ValueError(f"config.data.{key} must be an integer >= {minimum}, got {value!r}")


def _check_optional_str(config: dict[str, Any], key: str) -> None:
  if config[key] is not None and not (isinstance(config[key], str) and config[key]):
    raise ValueError(f"config.data.{key} must be a non-empty string or None, "
                     f"got {config[key]!r}")


def parse_domains(domains: Any, num_domains: int) -> Optional[tuple[int, ...]]:
  """`config.data.domains` -> the selected domain indices (None: all)."""
  if not isinstance(domains, str):
    raise ValueError(f"config.data.domains must be a string of comma-separated domain "
                     f"indices ('0,1,2') or '' for all, got {domains!r}")
  if not domains.strip():
    return None
  try:
    indices = tuple(int(part) for part in domains.split(","))
  except ValueError:
    raise ValueError(f"config.data.domains={domains!r} is not a comma-separated list of "
                     f"domain indices such as '0,1,2'") from None
  bad = [i for i in indices if not 0 <= i < num_domains]
  if bad:
    raise ValueError(f"config.data.domains={domains!r}: {bad[0]} is not a domain of "
                     f"config.data.num_domains={num_domains} (indices 0..{num_domains - 1})")
  if len(set(indices)) != len(indices):
    raise ValueError(f"config.data.domains={domains!r} names a domain twice")
  return indices


def _validate_tfds(config: dict[str, Any]) -> None:
  """TFDS names and features; constructs the builder (no download, no build).
  A corpus read without TFDS (`corpora`) is opened (its file checked) instead."""
  name = config["name"]
  if corpora.reads(name, config["manual_dir"]):
    text.check_text_key(corpora.open_corpus(name, config["manual_dir"]), config["text_key"])
    return
  if text.base_name(name) not in text.known_tfds_names():
    raise ValueError(f"config.data.name={name!r} is not a known dataset; valid: "
                     f"{SYNTHETIC}, python_stdlib or a TFDS text dataset such as "
                     "tiny_shakespeare, lm1b, c4")
  tfds = text.import_tfds()
  try:
    builder = tfds.builder(name, data_dir=config["data_dir"])
  except Exception as e:  # pylint: disable=broad-except
    # Unknown config or version of a known dataset ("c4/xx"), unreadable data_dir.
    raise ValueError(f"config.data.name={name!r}: TFDS cannot load this builder "
                     f"(config.data.data_dir={config['data_dir']!r}): {e}") from e
  text.check_text_key(builder, config["text_key"])


def validate_data_config(data_config: DataConfig) -> None:
  """Raises ValueError naming the key if `config.data` cannot work.

  Cheap: builds no dataset and compiles nothing. For TFDS names it imports
  TFDS and constructs the builder to check the name and `text_key`; splits
  are checked by `make_dataset` (TFDS knows them only once the dataset is built).
  """
  config = _resolved(data_config)
  name = config["name"]
  if not isinstance(name, str) or not name:
    raise ValueError(f"config.data.name must be a non-empty string, got {name!r}")
  if config["tokenizer"] not in tokenizers.TOKENIZERS:
    raise ValueError(f"config.data.tokenizer={config['tokenizer']!r} is not a known "
                     f"tokenizer; valid: {', '.join(tokenizers.TOKENIZERS)}")
  _check_positive_int(config, "vocab_size")
  _check_positive_int(config, "num_domains")
  _check_positive_int(config, "branching")
  for key in ("data_dir", "manual_dir", "tokenizer_path"):
    _check_optional_str(config, key)
  if config["tokenizer"] == "hf":
    _check_hf_tokenizer(config)
  for key in ("text_key", "train_split", "eval_split"):
    if not isinstance(config[key], str) or not config[key]:
      raise ValueError(f"config.data.{key} must be a non-empty string, got {config[key]!r}")
  manual_dir = config["manual_dir"]
  if (manual_dir is not None and text.is_local_path(manual_dir)
      and not os.path.isdir(manual_dir)):
    raise ValueError(f"config.data.manual_dir={manual_dir!r} does not exist")

  if config["loader"] not in LOADERS:
    raise ValueError(f"config.data.loader={config['loader']!r} is not a known loader; "
                     f"valid: {', '.join(LOADERS)}")
  if config["loader"] == "grain":
    if name == SYNTHETIC:
      raise ValueError(f"config.data.loader='grain' streams TFDS text datasets; {SYNTHETIC} "
                       "is generated per step in constant memory: use "
                       "config.data.loader='memory'")
    missing = [m for m in ("grain", "array_record") if importlib.util.find_spec(m) is None]
    if missing:
      raise ValueError(f"config.data.loader='grain' needs the {' and '.join(missing)} "
                       f"package(s): pip install grain")

  if name != SYNTHETIC and config["domains"] != "":
    raise ValueError(f"config.data.domains={config['domains']!r} selects synthetic_mixture "
                     f"domains; {name!r} has none: leave it ''")
  if name == SYNTHETIC:
    parse_domains(config["domains"], config["num_domains"])
    _check_positive_int(config, "vocab_size", minimum=2)
    if config["branching"] > config["vocab_size"]:
      raise ValueError(f"config.data.branching={config['branching']} exceeds "
                       f"config.data.vocab_size={config['vocab_size']} (successors are "
                       "distinct tokens)")
    return
  if config["tokenizer"] == "sentencepiece":
    # unk + eos + at least one piece per character (byte level: 256 at most).
    _check_positive_int(config, "vocab_size", minimum=3)
  _validate_tfds(config)


def _check_hf_tokenizer(config: dict[str, Any]) -> None:
  """tokenizer="hf" has a tokenizer.json and the package that reads it."""
  tokenizers.tokenizer_file(config["tokenizer_path"])
  if importlib.util.find_spec("tokenizers") is None:
    raise ValueError("config.data.tokenizer='hf' needs the tokenizers package: "
                     "pip install -e '.[hf]'")


def vocab_size(data_config: DataConfig) -> int:
  """The model's vocabulary size for `config.data`, without reading or
  tokenizing anything: the byte tokenizer's 257, else `vocab_size` (the
  synthetic vocabulary, or the SentencePiece model's size)."""
  validate_data_config(data_config)
  config = _resolved(data_config)
  if config["name"] != SYNTHETIC and config["tokenizer"] == "byte":
    return tokenizers.ByteTokenizer.vocab_size
  if config["name"] != SYNTHETIC and config["tokenizer"] == "hf":
    return tokenizers.HFTokenizer(config["tokenizer_path"], config["vocab_size"]).vocab_size
  return int(config["vocab_size"])


def batch_spec(data_config: DataConfig, *, seq_len: int, global_batch_size: int,
               sharding: Any = None) -> dict[str, Any]:
  """The global training batch of `config.data` as `jax.ShapeDtypeStruct`s
  (`base.batch_spec`, plus synthetic_mixture's "domain" <int32>[B]): what
  `make_dataset(...).train_iterator()` yields, with nothing read."""
  spec = base.batch_spec(global_batch_size, seq_len, sharding)
  if _resolved(data_config)["name"] == SYNTHETIC:
    import jax  # pylint: disable=import-outside-toplevel (batches are numpy)
    spec["domain"] = jax.ShapeDtypeStruct((global_batch_size,), "int32", sharding=sharding)
  return spec


def make_dataset(data_config: DataConfig, *, seq_len: int, global_batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 cache_dir: Optional[str] = None) -> base.Dataset:
  """The dataset of `config.data` for this process.

  Args:
    data_config: `config.data` (see the module docstring for the keys).
    seq_len: L, tokens per training row (windows hold L + 1 tokens).
    global_batch_size: B, rows per step over all processes.
    seed: selects the synthetic sources, the sampled rows and the shuffle order.
    process_index: p; this process gets rows [p * B / P, (p + 1) * B / P).
    process_count: P, which must divide B.
    cache_dir: local folder for tokenized splits and SentencePiece models
      (TFDS datasets; default: `<data_dir>/moejax_cache`, or a temp folder).

  Returns:
    A `base.Dataset`: `vocab_size`, `entropy_floor`, `unigram_entropy`, `info`,
    `train_iterator()` and `eval_batches(n)`.
  """
  validate_data_config(data_config)
  config = _resolved(data_config)
  batch_args = dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                    process_index=process_index, process_count=process_count)
  if config["name"] == SYNTHETIC:
    return synthetic.SyntheticMixtureDataset(
        vocab_size=config["vocab_size"], num_domains=config["num_domains"],
        branching=config["branching"],
        domains=parse_domains(config["domains"], config["num_domains"]), **batch_args)
  dataset_class = text.TextDataset
  if config["loader"] == "grain":
    from moejax.data import streaming  # pylint: disable=g-import-not-at-top
    dataset_class = streaming.StreamingTextDataset
  return dataset_class(
      name=config["name"], data_dir=config["data_dir"], manual_dir=config["manual_dir"],
      text_key=config["text_key"], train_split=config["train_split"],
      eval_split=config["eval_split"], tokenizer=config["tokenizer"],
      vocab_size=config["vocab_size"], cache_dir=cache_dir,
      tokenizer_path=config["tokenizer_path"], **batch_args)

