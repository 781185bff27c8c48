"""config.data.loader="grain": ArrayRecord tokens read by a Grain pipeline, exact resume."""

import json
import pathlib
import shutil
import subprocess
import types

import numpy as np
import pytest

from moejax import data
from moejax.data import cache as cache_lib
from moejax.data import streaming
from moejax.data import tokenizers
from moejax import train as trainer
import shared_data  # tests/shared_data.py
from shared_data import SHAKESPEARE_DIR, needs_shakespeare
from test_train import REPO, checkpoint_steps, cli, read_metrics, small_config, train_losses



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """tiny_shakespeare built once, offline, into a temporary TFDS data_dir."""
  shared_data.skip_without_shakespeare()
  return str(tmp_path_factory.mktemp("tfds"))


def _dataset(data_dir, *, loader="grain", batch=8, seq_len=64, seed=0, process_index=0,
             process_count=1):
  config = data.default_config()
  config.update(dict(name="tiny_shakespeare", data_dir=data_dir,
                     manual_dir=str(SHAKESPEARE_DIR), loader=loader))
  return data.make_dataset(config, seq_len=seq_len, global_batch_size=batch, seed=seed,
                           process_index=process_index, process_count=process_count)


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
  return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("seq_len", [3, 10, 7 * 4 + 5])
def test_token_windows_read_the_stream_across_records(tmp_path, monkeypatch, seq_len):
  # 7-token records: windows of 4, 11 and 34 tokens start inside one record
  # and end in the same, the next or the fifth one.
  monkeypatch.setattr(streaming, "CHUNK_TOKENS", 7)
  rng = np.random.default_rng(0)
  documents = [rng.integers(0, 256, rng.integers(0, 30)).astype(np.uint8).tobytes()
               for _ in range(40)]
  tokenizer = tokenizers.ByteTokenizer()
  path = str(tmp_path / "tokens.array_record")
  meta = streaming.write_token_records(path, [documents[:15], documents[15:]], tokenizer)
  stream = tokenizer.encode_documents(documents)
  assert meta["num_tokens"] == len(stream) and meta["num_documents"] == 40
  assert meta["num_records"] == -(-len(stream) // 7)  # ceil
  windows = streaming.TokenWindows(path, meta, seq_len)
  assert len(windows) == (len(stream) - 1) // seq_len
  for w in range(len(windows)):
    np.testing.assert_array_equal(windows[w], stream[w * seq_len:(w + 1) * seq_len + 1])
  with pytest.raises(IndexError):
    windows[len(windows)]


@needs_shakespeare
def test_windows_and_eval_batches_are_the_memory_loaders(data_dir):
  # seq_len 1024: 1003855 train tokens make 980 windows, 49 steps of 20 rows.
  grain_ds = _dataset(data_dir, batch=20, seq_len=1024)
  memory_ds = _dataset(data_dir, loader="memory", batch=20, seq_len=1024)
  assert grain_ds.num_train_windows == memory_ds.num_train_windows == 980
  assert grain_ds.info["loader"] == "grain" and "loader" not in memory_ds.info
  tokens = np.asarray(memory_ds._train_tokens)  # pylint: disable=protected-access
  windows = np.stack([tokens[w * 1024:w * 1024 + 1025] for w in range(980)])
  for eval_grain, eval_memory in zip(grain_ds.eval_batches(4), memory_ds.eval_batches(4)):
    _assert_batches_equal(eval_grain, eval_memory)

  def epoch(first_step):  # the 980 windows of 49 steps, as rows of inputs + last target
    batches = [grain_ds.train_batch(first_step + s) for s in range(49)]
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                           for b in batches])

  first, second = epoch(0), epoch(49)
  # Each epoch is a permutation of the memory loader's windows, a different one.
  np.testing.assert_array_equal(_sorted_rows(first), _sorted_rows(windows))
  np.testing.assert_array_equal(_sorted_rows(second), _sorted_rows(windows))
  assert not np.array_equal(first, windows) and not np.array_equal(first, second)


@needs_shakespeare
def test_batches_depend_only_on_seed_and_step(data_dir):
  ds = _dataset(data_dir)
  forward = [ds.train_batch(s) for s in range(6)]
  again = _dataset(data_dir)
  for s in reversed(range(6)):  # another object, another access order
    _assert_batches_equal(again.train_batch(s), forward[s])
  iterator = again.train_iterator()
  for s in range(6):
    _assert_batches_equal(next(iterator), forward[s])
  other_seed = _dataset(data_dir, seed=1).train_batch(0)
  assert not np.array_equal(other_seed["inputs"], forward[0]["inputs"])


@needs_shakespeare
def test_set_state_resumes_exactly(data_dir):
  iterator = _dataset(data_dir).train_iterator()
  for _ in range(5):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
  assert state == {"step": 5}
  expected = [next(iterator) for _ in range(3)]
  restored = _dataset(data_dir).train_iterator()
  restored.set_state(state)
  for batch in expected:
    _assert_batches_equal(next(restored), batch)


@needs_shakespeare
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_union_is_the_single_process_batch(data_dir, process_count):
  single = _dataset(data_dir)
  shards = [_dataset(data_dir, process_index=p, process_count=process_count)
            for p in range(process_count)]
  for step in (0, 7, 3000):  # 3000 * 8 rows: past the first epoch of 15685 windows
    parts = [shard.train_batch(step) for shard in shards]
    assert all(len(part["inputs"]) == 8 // process_count for part in parts)
    _assert_batches_equal(
        {key: np.concatenate([part[key] for part in parts]) for key in parts[0]},
        single.train_batch(step))
  evals = [shard.eval_batches(2) for shard in shards]
  for i, batch in enumerate(single.eval_batches(2)):
    _assert_batches_equal(
        {key: np.concatenate([e[i][key] for e in evals]) for key in batch}, batch)


@needs_shakespeare
def test_token_cache_is_written_once(data_dir, monkeypatch):
  _dataset(data_dir)
  def fail(*args, **kwargs):
    raise AssertionError("tokenized again")
  monkeypatch.setattr(streaming, "write_token_records", fail)
  _dataset(data_dir, seq_len=32)  # another window length reads the same records
  assert len(list(pathlib.Path(data_dir).glob("moejax_cache/**/*.array_record"))) == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(loader="disk"), "config.data.loader='disk' is not a known loader; valid: "
                          "memory, grain"),
    (dict(loader="grain"), "config.data.loader='grain' streams TFDS text datasets; "
                           "synthetic_mixture is generated per step"),
])
def test_loader_errors_name_the_key(overrides, message):
  config = data.default_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    data.validate_data_config(config)


@needs_shakespeare
def test_train_resume_with_grain_matches_uninterrupted_run(tmp_path, data_dir):
  shakespeare = {"data.name": "tiny_shakespeare", "data.loader": "grain",
                 "data.data_dir": data_dir, "data.manual_dir": str(SHAKESPEARE_DIR)}
  full = tmp_path / "full"
  trainer.train_and_evaluate(small_config(**shakespeare), str(full))
  # Stopped at its step-8 checkpoint (the first 8 of 12 steps), then resumed.
  part = tmp_path / "part"
  trainer.train_and_evaluate(
      small_config(**shakespeare, **{"train.steps": 8, "train.schedule_steps": 12}),
      str(part))
  assert max(checkpoint_steps(part)) == 8
  trainer.train_and_evaluate(small_config(**shakespeare), str(part))
  summary = json.loads((part / "summary.json").read_text())
  assert summary["data"]["loader"] == "grain"
  assert [r["step"] for r in read_metrics(part)] == [r["step"] for r in read_metrics(full)]
  full_losses, part_losses = train_losses(full), train_losses(part)
  assert sorted(part_losses) == sorted(full_losses) == [2, 4, 6, 8, 10, 12]
  for step in full_losses:
    np.testing.assert_allclose(part_losses[step], full_losses[step], rtol=1e-6)


# --- a damaged cache -----------------------------------------------------------------------

_FAKE_BUILDER = types.SimpleNamespace(info=types.SimpleNamespace(full_name="fake/1.0.0"))


def _cache_a_split(folder, monkeypatch) -> tuple[pathlib.Path, dict]:
  """A split tokenized into `folder` as a run does it: 40 records and a sidecar."""
  monkeypatch.setattr(streaming, "CHUNK_TOKENS", 7)
  rng = np.random.default_rng(0)
  documents = [rng.integers(0, 256, 6).astype(np.uint8).tobytes() for _ in range(40)]
  monkeypatch.setattr(streaming.text, "iter_documents", lambda *args: iter([documents]))
  path, meta = streaming.load_token_records(str(folder), _FAKE_BUILDER, "train", "text",
                                            tokenizers.ByteTokenizer())
  assert meta["num_records"] == 40  # 40 * 7 tokens (6 bytes and a separator each)
  return pathlib.Path(path), meta


def _assert_rebuild_message(error, path):
  message = str(error.value)
  assert isinstance(error.value, ValueError) and "\n" not in message
  assert f"the token cache file {path} " in message
  assert f"delete the folder {path.parent} to rebuild it" in message
  return message


def test_a_truncated_array_record_file_is_one_message_naming_the_folder(tmp_path,
                                                                       monkeypatch):
  path, meta = _cache_a_split(tmp_path, monkeypatch)
  windows = streaming.TokenWindows(str(path), meta, seq_len=10)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(cache_lib.CacheError) as error:  # when the split is opened
    streaming.load_token_records(str(tmp_path), _FAKE_BUILDER, "train", "text",
                                 tokenizers.ByteTokenizer())
  _assert_rebuild_message(error, path)
  with pytest.raises(cache_lib.CacheError) as error:  # cut short after it was checked
    streaming.TokenWindows(str(path), meta, seq_len=10)[len(windows) - 1]
  _assert_rebuild_message(error, path)


@pytest.mark.parametrize("content, problem", [
    (b"\xb9\x00 not json", "is not valid JSON"),
    (b'{"num_tokens": 280}', "lacks num_documents, num_records"),
    (b"[1, 2]", "does not hold a JSON object"),
])
def test_a_garbage_sidecar_is_one_message_naming_it(tmp_path, monkeypatch, content, problem):
  path, _ = _cache_a_split(tmp_path, monkeypatch)
  sidecar = path.with_suffix(".json")
  sidecar.write_bytes(content)
  with pytest.raises(cache_lib.CacheError) as error:
    streaming.load_token_records(str(tmp_path), _FAKE_BUILDER, "train", "text",
                                 tokenizers.ByteTokenizer())
  assert problem in _assert_rebuild_message(error, sidecar)


@needs_shakespeare
@pytest.mark.slow
def test_cli_names_a_damaged_grain_cache_in_one_line(tmp_path, data_dir):
  copy = tmp_path / "data"
  # The token cache this test damages is the run's own (no other one is copied).
  shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("moejax_cache"))
  flags = ["--config.data.name=tiny_shakespeare", "--config.data.loader=grain",
           f"--config.data.data_dir={copy}", f"--config.data.manual_dir={SHAKESPEARE_DIR}"]
  def run(steps):
    return subprocess.run(cli(tmp_path / "run", *flags, f"--config.train.steps={steps}"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  first = run(2)
  assert first.returncode == 0, first.stderr[-3000:]
  (train,) = tmp_path.glob("**/text.train.*.array_record")  # where the run cached it
  train.write_bytes(train.read_bytes()[:train.stat().st_size // 2])
  result = run(4)  # the resume opens the cache again
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert f"the token cache file {train} cannot be read" in line
  assert f"delete the folder {train.parent} to rebuild it" in line
