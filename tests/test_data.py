"""moejax.data: deterministic resumable batches, exact synthetic entropy, offline TFDS."""

import json
import pathlib
import re
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pytest

from moejax import data
from moejax.data import cache as cache_lib
from moejax.data import corpora
from moejax.data import text as text_lib
from moejax.data import tokenizers

from shared_data import SHAKESPEARE_DIR, needs_shakespeare  # tests/shared_data.py



def _config(**overrides) -> ml_collections.ConfigDict:
  config = data.default_config()
  config.update(overrides)
  return config


def _synthetic(*, batch=8, seq_len=32, seed=0, process_index=0, process_count=1,
               **overrides):
  return data.make_dataset(_config(**overrides), seq_len=seq_len, global_batch_size=batch,
                           seed=seed, process_index=process_index,
                           process_count=process_count)


@pytest.fixture(scope="module")
def shakespeare_config(tmp_path_factory):
  """tiny_shakespeare built once, offline, into a temporary data_dir."""
  if not (SHAKESPEARE_DIR / "input.txt").exists():
    pytest.skip(f"no {SHAKESPEARE_DIR}/input.txt (the ../shared data folder beside the clone)")
  data_dir = tmp_path_factory.mktemp("tfds")
  return _config(name="tiny_shakespeare", data_dir=str(data_dir),
                 manual_dir=str(SHAKESPEARE_DIR))


def _shakespeare(config, *, batch=8, seq_len=64, seed=0, process_index=0,
                 process_count=1, **overrides):
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(overrides)
  return data.make_dataset(config, seq_len=seq_len, global_batch_size=batch, seed=seed,
                           process_index=process_index, process_count=process_count)


def _shakespeare_splits() -> dict[str, bytes]:
  """The train/validation text exactly as TFDS's builder splits it (90/5/5 by chars)."""
  text = (SHAKESPEARE_DIR / "input.txt").read_text()
  cut = int(len(text) * 0.9)
  train, rest = text[:cut], text[cut:]
  return {"train": train.encode(), "validation": rest[:int(len(rest) * 0.5)].encode()}


def _make(kind, shakespeare_config=None, **kwargs):
  if kind == "synthetic":
    return _synthetic(**kwargs)
  return _shakespeare(shakespeare_config, **kwargs)


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _concat(batches):
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


DATASETS = ["synthetic", pytest.param("shakespeare", marks=needs_shakespeare)]


@pytest.fixture(params=DATASETS)
def make(request):
  if request.param == "synthetic":
    return lambda **kwargs: _make("synthetic", **kwargs)
  config = request.getfixturevalue("shakespeare_config")
  return lambda **kwargs: _make("shakespeare", config, **kwargs)


# -- the iterator contract, for every dataset ---------------------------------------------


def test_batch_format_and_shifted_targets(make):
  ds = make(batch=8, seq_len=48)
  batch = next(ds.train_iterator())
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 48)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32
  np.testing.assert_array_equal(batch["weights"], 1.0)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert 0 <= batch["inputs"].min() and batch["targets"].max() < ds.vocab_size
  json.dumps(ds.info)


def test_batches_depend_only_on_seed_and_step(make):
  iterator = make(seed=3).train_iterator()
  first = [next(iterator) for _ in range(4)]
  again = make(seed=3).train_iterator()
  for expected in first:
    _assert_batches_equal(next(again), expected)
  other_seed = next(make(seed=4).train_iterator())
  assert not np.array_equal(other_seed["inputs"], first[0]["inputs"])
  assert not np.array_equal(first[1]["inputs"], first[0]["inputs"])


def test_set_state_resumes_exactly(make):
  ds = make()
  iterator = ds.train_iterator()
  uninterrupted = [next(iterator) for _ in range(7)]
  assert iterator.get_state() == {"step": 7}
  restored = make().train_iterator()
  restored.set_state(json.loads(json.dumps({"step": 4})))
  for expected in uninterrupted[4:]:
    _assert_batches_equal(next(restored), expected)
  assert restored.get_state() == {"step": 7}
  with pytest.raises(ValueError, match="step"):
    restored.set_state({"step": -1})


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_union_is_the_single_process_batch(make, process_count):
  single = make(batch=8)
  shards = [make(batch=8, process_index=p, process_count=process_count)
            for p in range(process_count)]
  assert all(s.train_batch(0)["inputs"].shape == (8 // process_count, single.seq_len)
             for s in shards)
  for step in (0, 5):
    _assert_batches_equal(_concat([s.train_batch(step) for s in shards]),
                          single.train_batch(step))
  for i, expected in enumerate(single.eval_batches(2)):
    _assert_batches_equal(_concat([s.eval_batches(2)[i] for s in shards]), expected)


def test_eval_batches_are_fixed_and_held_out(make):
  ds = make(batch=8)
  eval_batches = ds.eval_batches(2)
  assert len(eval_batches) == 2
  for a, b in zip(eval_batches, make(batch=8).eval_batches(2)):
    _assert_batches_equal(a, b)
  for a, b in zip(eval_batches, ds.eval_batches(2)):
    _assert_batches_equal(a, b)
  train_rows = {row.tobytes() for step in range(20) for row in ds.train_batch(step)["inputs"]}
  assert not train_rows & {row.tobytes() for b in eval_batches for row in b["inputs"]}


# -- synthetic_mixture ---------------------------------------------------------------------


def _dense_transitions(source) -> np.ndarray:
  """<float64>[D, V, V] from the sparse successor lists."""
  num_domains, vocab_size, _ = source.successors.shape
  dense = np.zeros((num_domains, vocab_size, vocab_size))
  for d in range(num_domains):
    for s in range(vocab_size):
      for succ, p in zip(source.successors[d, s], source.probs[d, s]):
        dense[d, s, succ] += p
  return dense


def test_synthetic_entropy_floor_matches_brute_force():
  ds = _synthetic(vocab_size=6, branching=3, num_domains=2, batch=512, seq_len=8, seed=7)
  dense = _dense_transitions(ds.source)
  np.testing.assert_allclose(dense.sum(-1), 1.0)
  floor, stationary = 0.0, []
  for matrix in dense:
    assert np.count_nonzero(matrix, axis=-1).tolist() == [3] * 6  # distinct successors
    pi = np.full(6, 1 / 6)
    for _ in range(5000):  # power iteration; the self-loop makes the chain aperiodic
      pi = pi @ matrix
    np.testing.assert_allclose(pi @ matrix, pi, atol=1e-12)
    assert pi.min() > 0  # irreducible (the ring)
    row_entropy = -np.sum(np.where(matrix > 0, matrix * np.log(np.where(matrix > 0, matrix, 1)),
                                   0), axis=-1)
    floor += 0.5 * pi @ row_entropy  # uniform domain prior
    stationary.append(pi)
  assert ds.entropy_floor == pytest.approx(floor, abs=1e-10)
  mixture = np.mean(stationary, axis=0)
  assert ds.unigram_entropy == pytest.approx(-np.sum(mixture * np.log(mixture)), abs=1e-10)

  # Sequences start in the stationary distribution of their domain (4096 rows).
  rows = _concat([ds.train_batch(step) for step in range(8)])
  for d in range(2):
    first = rows["inputs"][rows["domain"] == d, 0]
    empirical = np.bincount(first, minlength=6) / len(first)
    assert 0.5 * np.abs(empirical - stationary[d]).sum() < 0.06  # total variation


def test_synthetic_nll_under_true_chain_approaches_floor():
  ds = _synthetic(vocab_size=64, branching=4, num_domains=4, batch=128, seq_len=256, seed=1)
  batch = _concat([ds.train_batch(step) for step in range(4)])
  tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  nll = -ds.source.log_prob_transitions(tokens, batch["domain"]).mean()
  # 131k transitions: the standard error is ~0.003 nats; a wrong sampler (e.g. a
  # uniform choice among the 4 successors) would be off by > 0.1.
  assert nll == pytest.approx(ds.entropy_floor, abs=0.02)
  assert ds.entropy_floor < ds.unigram_entropy < np.log(64)


def test_synthetic_domain_ids_identify_the_chain():
  ds = _synthetic(vocab_size=512, branching=4, num_domains=4, batch=64, seq_len=128)
  batch = ds.train_batch(0)
  tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  assert set(batch["domain"].tolist()) == {0, 1, 2, 3}
  for d in range(4):
    log_prob = ds.source.log_prob_transitions(tokens, np.full(64, d, np.int32))
    valid = np.all(np.isfinite(log_prob), axis=1)
    # Every row is a path of its own domain's chain and of no other's.
    np.testing.assert_array_equal(valid, batch["domain"] == d)


def test_synthetic_domains_select_the_rows_and_keep_the_sources():
  def make(domains):
    return data.make_dataset({"name": "synthetic_mixture", "vocab_size": 64,
                              "domains": domains}, seq_len=32, global_batch_size=64, seed=3)
  every, listed, held_out = make(""), make("0,1,2,3"), make("3")
  # "" and every domain listed draw the same rows.
  for key in ("inputs", "domain"):
    np.testing.assert_array_equal(every.train_batch(5)[key], listed.train_batch(5)[key])
  batch = held_out.train_batch(0)
  assert set(batch["domain"].tolist()) == {3}
  assert set(make("0,2").eval_batches(1)[0]["domain"].tolist()) == {0, 2}
  # The same sources whatever the subset: the held-out rows are paths of
  # the full mixture's chain 3, and the floor is that chain's rate.
  tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  assert np.all(np.isfinite(every.source.log_prob_transitions(tokens, batch["domain"])))
  assert held_out.entropy_floor == pytest.approx(every.source.domain_entropy_rates[3])
  assert every.entropy_floor == pytest.approx(np.mean(every.source.domain_entropy_rates))
  for bad, message in (("4", "is not a domain"), ("0,0", "twice"), ("a", "comma-separated")):
    with pytest.raises(ValueError, match=message):
      make(bad)
  with pytest.raises(ValueError, match="has none"):
    data.validate_data_config({"name": "tiny_shakespeare", "domains": "1"})


def test_synthetic_batches_are_fast():
  ds = _synthetic(batch=32, seq_len=256)
  ds.train_batch(0)
  start = time.perf_counter()
  for step in range(10):
    ds.train_batch(step)
  assert (time.perf_counter() - start) / 10 < 0.05  # ~3 ms here; generous for busy CI


# -- TFDS text -----------------------------------------------------------------------------


@needs_shakespeare
def test_tiny_shakespeare_builds_offline_and_packs_the_text(shakespeare_config, monkeypatch):
  ds = _shakespeare(shakespeare_config, batch=35, seq_len=4096)
  splits = _shakespeare_splits()
  assert ds.vocab_size == 257 and ds.entropy_floor is None
  assert ds.info["num_train_tokens"] == len(splits["train"]) + 1  # + one separator
  # Unigram entropy of the bytes of tiny_shakespeare (the known ~3.31 nats).
  assert ds.unigram_entropy == pytest.approx(3.31, abs=0.01)

  # One epoch = the 245 windows of 4097 tokens at stride 4096, each exactly once.
  stream = np.append(np.frombuffer(splits["train"], np.uint8), 256)
  assert ds.num_train_windows == (len(stream) - 1) // 4096 == 245
  window_index = {stream[w * 4096:w * 4096 + 4097].tobytes(): w for w in range(245)}

  def epoch_order(first_step):  # window indices of 7 steps of 35 rows
    batches = [ds.train_batch(step) for step in range(first_step, first_step + 7)]
    return [window_index.get(row.astype(stream.dtype).tobytes()) for b in batches
            for row in np.append(b["inputs"], b["targets"][:, -1:], axis=1)]
  first_epoch, second_epoch = epoch_order(0), epoch_order(7)
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(245))
  assert first_epoch != sorted(first_epoch)    # shuffled, not in file order
  assert first_epoch != second_epoch           # a new order every epoch

  # Eval: the validation windows in order; 13 windows -> one padded batch of 35.
  val = np.append(np.frombuffer(splits["validation"], np.uint8), 256)
  (only,) = ds.eval_batches(3)
  count = (len(val) - 1) // 4096
  np.testing.assert_array_equal(only["weights"][:, 0], np.arange(35) < count)
  for w in range(count):
    np.testing.assert_array_equal(only["inputs"][w], val[w * 4096:(w + 1) * 4096])

  # The tokenized splits are cached: a second dataset does not tokenize again.

  def fail(*args, **kwargs):
    raise AssertionError("re-tokenized a cached split")
  monkeypatch.setattr(text_lib, "_write_token_cache", fail)
  again = _shakespeare(shakespeare_config, batch=35, seq_len=4096)
  _assert_batches_equal(again.train_batch(3), ds.train_batch(3))
  assert list(pathlib.Path(shakespeare_config.data_dir).glob("moejax_cache/**/*.npy"))


@needs_shakespeare
def test_sentencepiece_on_tiny_shakespeare(shakespeare_config, monkeypatch):
  ds = _shakespeare(shakespeare_config, batch=4, seq_len=128, tokenizer="sentencepiece",
                    vocab_size=256)
  assert ds.vocab_size == 256
  splits = _shakespeare_splits()
  # Pieces are longer than bytes (~0.55 tokens per byte at 256 pieces) ...
  assert ds.info["num_train_tokens"] < 0.7 * len(splits["train"])
  # ... and the first eval window decodes to the start of the validation text.
  first = ds.eval_batches(1)[0]["inputs"][0]
  decoded = ds.tokenizer.decode(first)
  assert len(decoded) > 128 and splits["validation"].decode().startswith(decoded)

  def fail(*args, **kwargs):
    raise AssertionError("retrained a cached SentencePiece model")
  monkeypatch.setattr(tokenizers, "train_sentencepiece", fail)
  again = _shakespeare(shakespeare_config, batch=4, seq_len=128, tokenizer="sentencepiece",
                       vocab_size=256)
  _assert_batches_equal(again.train_batch(2), ds.train_batch(2))


def test_tokenizers_round_trip_and_separate_documents():
  documents = ["héllo world\n", "", "to be or not\tto be"] + [
      f"line {i}: the quick brown fox jumps over {7 * i} lazy dogs\n" for i in range(300)]
  byte = tokenizers.ByteTokenizer()
  ids = byte.encode_documents(documents[:3])
  assert ids.tolist() == list("héllo world\n".encode()) + [256, 256] + list(
      b"to be or not\tto be") + [256]
  model = tokenizers.train_sentencepiece(documents, vocab_size=64)
  sp = tokenizers.SentencePieceTokenizer(model)
  assert sp.vocab_size == 64 and sp.eos_id == 1
  ids = sp.encode_documents(documents[:3])
  assert ids.tolist().count(sp.eos_id) == 3 and ids[-1] == sp.eos_id
  pieces = np.split(ids, np.flatnonzero(ids == sp.eos_id) + 1)[:3]
  assert [sp.decode(p[:-1]) for p in pieces] == documents[:3]
  assert sp.fingerprint != tokenizers.SentencePieceTokenizer(
      tokenizers.train_sentencepiece(documents, vocab_size=65)).fingerprint


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(name="foo"), "config.data.name='foo' is not a known dataset; valid: "
                       "synthetic_mixture, python_stdlib or a TFDS text dataset"),
    (dict(manual_dir="/nonexistent/x"), "config.data.manual_dir='/nonexistent/x' does not exist"),
    (dict(tokenizer="wordpiece"), "config.data.tokenizer='wordpiece' is not a known tokenizer"),
    (dict(vocab_size=0), "config.data.vocab_size must be an integer >= "),
    (dict(num_domains=0), "config.data.num_domains must be an integer >= 1"),
    (dict(branching=-1), "config.data.branching must be an integer >= 1"),
    (dict(vocab_size=8, branching=9), "config.data.branching=9 exceeds config.data.vocab_size=8"),
    (dict(name="tiny_shakespeare", text_key="body"),
     "config.data.text_key='body' is not a feature of tiny_shakespeare/1.0.0; "
     "features: ['text']"),
    (dict(name="tiny_shakespeare", train_split=""), "config.data.train_split must be"),
])
def test_validate_data_config_names_the_key(overrides, message, tmp_path):
  config = _config(data_dir=str(tmp_path), **overrides)
  with pytest.raises(ValueError, match=re.escape(message)):
    data.validate_data_config(config)
  assert not list(tmp_path.iterdir())  # validation builds nothing


def test_validate_rejects_unknown_keys_and_accepts_defaults():
  data.validate_data_config(data.default_config())
  data.validate_data_config({"name": "synthetic_mixture"})  # absent keys take defaults
  with pytest.raises(ValueError, match=r"unknown config.data key\(s\) \['nmae'\]"):
    data.validate_data_config({"nmae": "lm1b"})


def test_make_dataset_argument_errors():
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    _synthetic(batch=6, process_count=4)
  with pytest.raises(ValueError, match="process_index must be in"):
    _synthetic(batch=8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="num_batches"):
    _synthetic().eval_batches(0)


@needs_shakespeare
def test_tfds_errors(shakespeare_config, tmp_path):
  with pytest.raises(ValueError, match=r"config.data.train_split='nope' is not a split .*"
                                       r"\['test', 'train', 'validation'\]"):
    _shakespeare(shakespeare_config, train_split="nope")
  with pytest.raises(ValueError, match=r"config.data.train_split='train' .* too small: "
                                       r"1003855 tokens make 10 windows"):
    _shakespeare(shakespeare_config, seq_len=100_000, batch=32)
  empty = tmp_path / "manual"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"config.data.manual_dir=.* lacks \['input.txt'\]"):
    _shakespeare(shakespeare_config, data_dir=str(tmp_path / "tfds"), manual_dir=str(empty))


@needs_shakespeare
def test_tiny_shakespeare_reads_the_tfds_splits_without_tfds(shakespeare_config, tmp_path):
  # TFDS's own build (the dataset prepared in data_dir), then read with no
  # manual_dir: TFDS; with a manual_dir: corpora.py. The same tokens.
  tfds = text_lib.import_tfds(with_tensorflow=True)
  tfds.builder("tiny_shakespeare", data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(SHAKESPEARE_DIR)))
  for split in ("train", "validation", "test"):
    built = text_lib.prepare_builder("tiny_shakespeare", str(tmp_path), None)
    read = text_lib.prepare_builder("tiny_shakespeare", None, str(SHAKESPEARE_DIR))
    assert isinstance(read, corpora.Corpus) and not isinstance(built, corpora.Corpus)
    assert read.info.full_name == built.info.full_name == "tiny_shakespeare/1.0.0"
    assert ([d for b in text_lib.iter_documents(built, split, "text") for d in b]
            == [d for b in text_lib.iter_documents(read, split, "text") for d in b])
  via_tfds = _shakespeare(shakespeare_config, data_dir=str(tmp_path), manual_dir=None)
  direct = _shakespeare(shakespeare_config)
  assert via_tfds.info == {**direct.info, "cache_dir": via_tfds.info["cache_dir"]}
  _assert_batches_equal(via_tfds.train_batch(5), direct.train_batch(5))
  _assert_batches_equal(via_tfds.eval_batches(1)[0], direct.eval_batches(1)[0])


@needs_shakespeare
def test_tiny_shakespeare_with_a_manual_dir_imports_no_tensorflow(tmp_path):
  code = ("import sys; from moejax import data; c = data.default_config(); "
          f"c.update(name='tiny_shakespeare', manual_dir={str(SHAKESPEARE_DIR)!r}); "
          "ds = data.make_dataset(c, seq_len=64, global_batch_size=4, seed=0, "
          f"cache_dir={str(tmp_path)!r}); ds.train_batch(0); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == "[]"


def test_python_stdlib_is_this_interpreters_source_split_by_path(tmp_path):
  import platform
  import sysconfig
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  corpus = corpora.open_corpus("python_stdlib", None)
  version = corpus.info.full_name.split("/")[1]
  assert corpus.info.full_name.startswith(f"python_stdlib/{platform.python_version()}-")
  assert corpora.open_corpus("python_stdlib", None).info == corpus.info  # deterministic
  documents = {split: [d for b in corpus.documents(split, "text") for d in b]
               for split in ("train", "validation", "test")}
  assert all(documents.values())
  assert sum(map(len, documents.values())) == len(corpora._stdlib_files(str(root)))
  # a file's split is its path's hash bucket; tests and installed packages are out
  assert (root / "json" / "decoder.py").read_bytes() in documents[
      corpora._stdlib_split("json/decoder.py")]
  files = corpora._stdlib_files(str(root))
  assert "ast.py" in files and not any(
      f.startswith(("test/", "site-packages/")) or "/tests/" in f for f in files)
  assert 0.02 < len(documents["validation"]) / len(files) < 0.1
  # a config names it like any dataset; a version of another Python is refused
  stdlib = data.make_dataset(_config(name="python_stdlib", tokenizer="byte"), seq_len=32,
                             global_batch_size=4, seed=0, cache_dir=str(tmp_path))
  assert stdlib.train_batch(0)["inputs"].shape == (4, 32)
  assert (tmp_path / "python_stdlib" / version).is_dir()
  with pytest.raises(ValueError, match="this machine's corpus is python_stdlib/"):
    corpora.open_corpus("python_stdlib:2.7.18-00000000", None)
  with pytest.raises(ValueError, match="leave manual_dir unset"):
    data.validate_data_config(_config(name="python_stdlib", manual_dir=str(tmp_path)))


def test_tfds_datasets_without_tfds_are_one_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  with pytest.raises(ValueError, match=re.escape("pip install -e '.[tfds]'")):
    data.validate_data_config(_config(name="lm1b"))
  with pytest.raises(ValueError, match="is not the expected file"):
    corpora._read_checked(__file__, 1115394, "0" * 64)


# -- a damaged token cache (memory loader) -------------------------------------------------

_FAKE_BUILDER = types.SimpleNamespace(info=types.SimpleNamespace(full_name="fake/1.0.0"))


def _cache_a_split(folder, monkeypatch) -> pathlib.Path:
  """A split tokenized into `folder` as a run does it: the .npy and its sidecar."""
  documents = [b"to be or not to be", b"that is the question"] * 50
  monkeypatch.setattr(text_lib, "iter_documents", lambda *args: iter([documents]))
  tokens, meta = text_lib.load_tokens(str(folder), _FAKE_BUILDER, "train", "text",
                                      tokenizers.ByteTokenizer())
  # 50 x (18 bytes + a separator) + 50 x (20 bytes + a separator).
  assert len(tokens) == meta["num_tokens"] == 50 * 19 + 50 * 21
  (path,) = pathlib.Path(folder).glob("*.npy")
  return path


def _assert_rebuild_message(error, path):
  message = str(error.value)
  assert isinstance(error.value, ValueError) and "\n" not in message
  assert f"the token cache file {path} " in message
  assert f"delete the folder {path.parent} to rebuild it" in message
  return message


@pytest.mark.parametrize("cut", [50, 0.5])  # inside the .npy header, inside the tokens
def test_a_truncated_npy_cache_is_one_message_naming_the_folder(tmp_path, monkeypatch, cut):
  path = _cache_a_split(tmp_path, monkeypatch)
  data = path.read_bytes()
  path.write_bytes(data[:cut if isinstance(cut, int) else int(len(data) * cut)])
  with pytest.raises(cache_lib.CacheError) as error:
    text_lib.load_tokens(str(tmp_path), _FAKE_BUILDER, "train", "text",
                         tokenizers.ByteTokenizer())
  assert "cannot be read" in _assert_rebuild_message(error, path)


@pytest.mark.parametrize("content, problem", [
    (b"\xb9\x00 not json", "is not valid JSON"),
    (b'{"num_tokens": 2000}', "lacks num_documents, unigram_entropy"),
])
def test_a_garbage_npy_sidecar_is_one_message_naming_it(tmp_path, monkeypatch, content,
                                                        problem):
  path = _cache_a_split(tmp_path, monkeypatch)
  sidecar = path.with_suffix(".json")
  sidecar.write_bytes(content)
  with pytest.raises(cache_lib.CacheError) as error:
    text_lib.load_tokens(str(tmp_path), _FAKE_BUILDER, "train", "text",
                         tokenizers.ByteTokenizer())
  assert problem in _assert_rebuild_message(error, sidecar)


def test_a_garbage_sentencepiece_model_is_one_message_naming_it(tmp_path):
  path = tmp_path / "sentencepiece.text.train.v256.model"
  path.write_bytes(b"\xb9\x00 not a model")
  with pytest.raises(cache_lib.CacheError) as error:
    text_lib.load_tokenizer("sentencepiece", 256, str(tmp_path), _FAKE_BUILDER, "train",
                            "text")
  assert "is not a usable SentencePiece model" in _assert_rebuild_message(error, path)
