r"""Peak memory of the data loaders as the corpus grows (config.data.loader).

    python -m experiments.bench_data                                  # 50, 200, 800 MB
    python -m experiments.bench_data --sizes_mb=50,200 --memory_max_mb=200 \
        --out=experiments/results/bench_data.json

For each size it generates a text corpus (Zipf-distributed words, one ~8 KB
document per line, written 1 MB at a time), builds it as a TFDS dataset
(`bench_text`, a GeneratorBasedBuilder defined here that reads the corpus
from the manual dir), deletes the text, and then runs each loader through
`moejax.data.make_dataset`, the trainer's own call, in two fresh processes:

  build: the first make_dataset, which tokenizes the train and eval splits
         into the loader's cache (memory: .npy; grain: ArrayRecord);
  read:  make_dataset again (cache present), --steps training batches through
         `train_iterator()` and --eval_batches eval batches.

Each phase reports VmHWM (the kernel's peak resident set, file-backed pages
of memory maps included) and the peaks of RssAnon (the process's own memory)
and RssFile (mapped file pages, reclaimable) sampled every 10 ms, in MiB, and
`anon_mb_trace`, RssAnon at 0%, 10%, ..., 100% of the phase's time after
its imports (TensorFlow, TFDS, Grain: a third of the baseline). The
memory loader runs only up to --memory_max_mb (its build holds the raw stream
and the .npy on disk at once: 4 bytes per text byte). `tfds_prepare` (TFDS's
own build, its shuffler buffers up to 1 GB) and `baseline` (the imports
alone) are reported apart. Prints one JSON object per line and writes them,
with a summary table, to --out. Generated data is deleted at the end.
"""

import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np

_SIZES = flags.DEFINE_list("sizes_mb", ["50", "200", "800"], "Corpus sizes in MB (1e6 B).")
_MEMORY_MAX = flags.DEFINE_integer("memory_max_mb", 200, "Largest size for loader=memory.")
_LOADERS = flags.DEFINE_list("loaders", ["grain", "memory"], "Loaders to measure.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training batches read per run.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Eval batches read per run.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row L.")
_ROOT = flags.DEFINE_string("root", None, "Where the scratch folders go (default: $TMPDIR).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_data.json", "Output JSON.")
_PHASE = flags.DEFINE_enum("phase", None, ["generate", "prepare", "build", "read", "baseline"],
                           "Internal: run one phase in this process.")
_SIZE = flags.DEFINE_integer("size_mb", 0, "Internal: the phase's corpus size.")
_LOADER = flags.DEFINE_string("loader", "grain", "Internal: the phase's loader.")

_NAME = "bench_text"
_EVAL_MB = 1
_DOC_BYTES = 8000


def _register_builder(root: str):
  """Defines (and so registers with TFDS) the `bench_text` builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  metadata_dir = os.path.join(root, "builder_metadata")  # empty: no README, no checksums
  os.makedirs(metadata_dir, exist_ok=True)

  class BenchText(tfds.core.GeneratorBasedBuilder):
    """Generated text, one document per line of manual_dir/{train,validation}.txt."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for metadata beside the builder's package; run as __main__ it has none.
    pkg_dir_path = tfds.core.Path(metadata_dir)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "experiments/bench_data.py writes the files."

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(dl_manager.manual_dir / f"{split}.txt")
              for split in ("train", "validation")}

    def _generate_examples(self, path):
      with open(path, "rb") as f:
        for i, line in enumerate(f):
          yield i, {"text": line.rstrip(b"\n").decode()}

  return BenchText


def _write_corpus(path: str, num_bytes: int, seed: int) -> None:
  """Zipf(1.1) words over 20k random lowercase words, lines of ~_DOC_BYTES bytes."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 10, 20_000)
  words = np.array([bytes(rng.integers(97, 123, n).astype(np.uint8)) for n in lengths])
  written = 0
  with open(path, "wb") as f:
    while written < num_bytes:
      ids = np.minimum(rng.zipf(1.1, 200_000), len(words)) - 1
      block = b" ".join(words[ids])[:min(1 << 20, num_bytes - written)]
      # Documents: a newline every ~_DOC_BYTES bytes (at a space).
      block = bytearray(block)
      for cut in range(_DOC_BYTES, len(block), _DOC_BYTES):
        space = block.find(b" ", cut)
        if space >= 0:
          block[space] = ord("\n")
      block[-1:] = b"\n"
      f.write(block)
      written += len(block)


class _PeakSampler:
  """Peaks of RssAnon and RssFile (MiB), sampled every 10 ms in a thread, and
  RssAnon at each sample (to show whether it climbs during the phase)."""

  def __init__(self):
    self.peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    self.anon = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _sample(self):
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in self.peaks:
          self.peaks[key] = max(self.peaks[key], int(value.split()[0]) / 1024)
          if key == "RssAnon":
            self.anon.append(int(value.split()[0]) / 1024)

  def _run(self):
    while not self._stop.wait(0.01):
      self._sample()

  def stop(self) -> dict[str, float]:
    self._stop.set()
    self._thread.join()
    self._sample()
    return self.peaks


def _data_config(root: str, loader: str):
  from moejax import data  # pylint: disable=g-import-not-at-top
  config = data.default_config()
  config.update(dict(name=_NAME, data_dir=os.path.join(root, "tfds"),
                     manual_dir=os.path.join(root, "text"), loader=loader))
  return config


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


def _phase(phase: str, root: str, loader: str) -> dict:
  """Runs one phase in this process; returns its measurements."""
  sampler = _PeakSampler()
  start = time.time()
  work_start = 0  # the first sample after the imports
  out = {}
  if phase == "generate":
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    _write_corpus(os.path.join(root, "text", "train.txt"), _SIZE.value * 10**6, seed=0)
    _write_corpus(os.path.join(root, "text", "validation.txt"), _EVAL_MB * 10**6, seed=1)
  else:
    from moejax import data  # pylint: disable=g-import-not-at-top
    from moejax.data import text  # pylint: disable=g-import-not-at-top
    text.import_tfds(with_tensorflow=True)
    _register_builder(root)
    if loader == "grain":
      importlib.import_module("grain")  # in the baseline too
    work_start = len(sampler.anon)
    if phase == "prepare":
      config = _data_config(root, loader)
      text.prepare_builder(config.name, config.data_dir, config.manual_dir)
      out["tfds_bytes"] = _folder_bytes(os.path.join(root, "tfds", _NAME))
    elif phase in ("build", "read"):
      dataset = data.make_dataset(_data_config(root, loader), seq_len=_SEQ_LEN.value,
                                  global_batch_size=_BATCH.value, seed=0)
      if phase == "read":
        iterator = dataset.train_iterator()
        checksum = 0
        for _ in range(_STEPS.value):
          checksum += int(next(iterator)["inputs"][:, 0].sum())
        dataset.eval_batches(_EVAL_BATCHES.value)
        out["checksum"] = checksum
      out["num_train_tokens"] = dataset.info["num_train_tokens"]
      out["num_train_windows"] = dataset.info["num_train_windows"]
      out["cache_bytes"] = _folder_bytes(os.path.join(root, "tfds", "moejax_cache"))
  peaks = sampler.stop()
  # RssAnon at 0%, 10%, ..., 100% of the phase's time after its imports.
  anon = sampler.anon[work_start:]
  trace = [round(anon[round(i * (len(anon) - 1) / 10)], 1) for i in range(11)]
  out.update({"seconds": round(time.time() - start, 1), "anon_mb_trace": trace,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_anon_mb": round(peaks["RssAnon"], 1),
              "peak_file_mb": round(peaks["RssFile"], 1)})
  return out


def _run_phase(phase: str, root: str, size_mb: int, loader: str = "grain") -> dict:
  """Runs `phase` in a fresh process (its own peak RSS); returns its JSON line."""
  command = [sys.executable, "-m", "experiments.bench_data", f"--phase={phase}",
             f"--root={root}", f"--size_mb={size_mb}", f"--loader={loader}",
             f"--steps={_STEPS.value}", f"--eval_batches={_EVAL_BATCHES.value}",
             f"--batch={_BATCH.value}", f"--seq_len={_SEQ_LEN.value}"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
  record = {"size_mb": size_mb, "loader": loader, "phase": phase,
            **json.loads(result.stdout.strip().splitlines()[-1])}
  print(json.dumps(record), flush=True)
  return record


def _table(records: list[dict]) -> list[str]:
  """Markdown rows: size, loader, peak RSS / anon of build and read."""
  rows = ["| corpus (MB of text) | loader | build: peak RSS / anon (MiB) | "
          "read: peak RSS / anon (MiB) | cache on disk (MB) |", "|---|---|---|---|---|"]
  by_key = {(r["size_mb"], r["loader"], r["phase"]): r for r in records}
  for size, loader, phase in sorted(by_key):
    if phase != "read":
      continue
    build, read = by_key.get((size, loader, "build"), {}), by_key[(size, loader, phase)]
    rows.append(f"| {size} | {loader} | {build.get('peak_rss_mb')} / "
                f"{build.get('peak_anon_mb')} | {read['peak_rss_mb']} / "
                f"{read['peak_anon_mb']} | {read['cache_bytes'] / 1e6:.0f} |")
  return rows


def main(argv):
  del argv
  if _PHASE.value:
    print(json.dumps(_phase(_PHASE.value, _ROOT.value, _LOADER.value)))
    return
  usage = shutil.disk_usage(tempfile.gettempdir())
  print(json.dumps({"free_disk_gb": round(usage.free / 1e9, 1)}), flush=True)
  records = [_run_phase("baseline", tempfile.gettempdir(), 0, loader)
             for loader in _LOADERS.value]
  for size_mb in map(int, _SIZES.value):
    root = tempfile.mkdtemp(prefix=f"bench_data_{size_mb}mb_", dir=_ROOT.value)
    try:
      records.append(_run_phase("generate", root, size_mb))
      records.append(_run_phase("prepare", root, size_mb))
      os.remove(os.path.join(root, "text", "train.txt"))  # TFDS has its copy
      for loader in _LOADERS.value:
        if loader == "memory" and size_mb > _MEMORY_MAX.value:
          continue
        records.append(_run_phase("build", root, size_mb, loader))
        records.append(_run_phase("read", root, size_mb, loader))
        shutil.rmtree(os.path.join(root, "tfds", "moejax_cache"))
    finally:
      shutil.rmtree(root, ignore_errors=True)
  config = {"steps": _STEPS.value, "eval_batches": _EVAL_BATCHES.value,
            "batch": _BATCH.value, "seq_len": _SEQ_LEN.value, "tokenizer": "byte",
            "command": "python -m experiments.bench_data " + " ".join(sys.argv[1:]),
            "cpus": os.cpu_count()}
  table = _table(records)
  print("\n".join(table))
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"config": config, "results": records, "table": table}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
