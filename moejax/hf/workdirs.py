"""Hugging Face checkpoints <-> moejax workdirs (`python -m moejax.hf`).

`import_checkpoint` writes an ordinary moejax workdir: a step-0 checkpoint
(the checkpoint's weights, a fresh optimizer state, the data iterator at its
start) recording its run config (the given config's data/train/mesh
sections, default `default_config()`; the model section is the
checkpoint's), config.json, `hf_import.json` (the source folder and its
config.json), and the checkpoint's tokenizer in `tokenizer/`
(config.data.tokenizer="hf", so text datasets, evaluation and generation use
it). `moejax.evaluate`, `moejax.generate`, training (resume), LoRA
(`config.finetune.base`), quantization and sparse upcycling
(`config.init.upcycle_from`) read it as any run. `export_run` writes a
workdir's checkpoint as a folder transformers loads; the family is the
imported one, else the one given, else the one the model's options match.
What cannot be mapped is refused (ValueError, one line) before anything is
written.
"""

import os
import shutil

import jax
from flax import nnx

from moejax import data as data_lib
from moejax import hf
from moejax import model as model_lib
from moejax import parallel
from moejax import run as run_lib
from moejax.train import checkpoints
from moejax.train import lora
from moejax.train import optim
from moejax.train import resume
from moejax.train import steps

RECORD_FILE = "hf_import.json"
TOKENIZER_DIR = "tokenizer"
# A checkpoint's tokenizer files, copied into WORKDIR/tokenizer/ on import and
# back out on export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def import_checkpoint(hf_dir: str, workdir: str, config=None, dtype=None) -> dict:
  """Writes `workdir` from the checkpoint folder `hf_dir` (see the module
  docstring); returns a summary."""
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ValueError(f"--workdir={workdir} exists and is not empty; import into a new folder")
  checkpoint = hf.Checkpoint(hf_dir)
  run_config = hf.hf_run_config(checkpoint.config, config, dtype)
  has_tokenizer = os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
  if has_tokenizer:
    with run_config.unlocked():
      run_config.data.tokenizer = "hf"
      run_config.data.tokenizer_path = os.path.abspath(os.path.join(workdir, TOKENIZER_DIR))
  vocab = run_config.data.vocab_size
  mesh = model_lib.make_mesh(run_config, training=False)
  with parallel.activate(mesh):
    model, run_config = hf.from_pretrained(hf_dir, mesh=mesh, config=run_config,
                                           dtype=run_config.model.dtype)
    params = nnx.state(model)
    tx = optim.make_optimizer(run_config.train)
    opt_state = jax.jit(lambda p: tx.init(steps.trainable(p)))(params)
  os.makedirs(workdir, exist_ok=True)
  if has_tokenizer:
    _copy_tokenizer(hf_dir, os.path.join(workdir, TOKENIZER_DIR))
  checkpointer = checkpoints.Checkpointer(workdir, keep=run_config.train.keep_checkpoints)
  try:
    checkpointer.save(0, {"params": params, "opt_state": opt_state}, {"step": 0},
                      resume.to_json(run_config))
    checkpointer.wait()
  finally:
    checkpointer.close()
  run = run_lib.Run(workdir)
  run.write_json(run_lib.CONFIG_FILE, resume.to_json(run_config))
  run.write_json(RECORD_FILE, {"hf_dir": os.path.abspath(hf_dir),
                               "model_type": checkpoint.config.get("model_type"),
                               "config": checkpoint.config})
  count = sum(int(x.size) for x in jax.tree.leaves(params))
  return {"workdir": os.path.abspath(workdir), "model_type": checkpoint.config["model_type"],
          "parameters": count, "vocab_size": vocab, "step": 0}


def _copy_tokenizer(source: str, target: str) -> list[str]:
  """Copies the tokenizer files of folder `source` into `target`."""
  os.makedirs(target, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(source, name)):
      shutil.copy(os.path.join(source, name), os.path.join(target, name))
      copied.append(name)
  return copied


def export_run(workdir: str, out: str, family=None, step=None) -> list[str]:
  """Writes checkpoint `step` (default: newest) of `workdir` as a Hugging
  Face folder `out`; returns the files written."""
  run = run_lib.Run(workdir)
  _, config = run.newest()
  if step is not None:
    config = run.config(step)
  if lora.enabled(config):
    raise ValueError(f"{workdir} is a LoRA run: its adapters have no place in a Hugging Face "
                     f"checkpoint; export its base ({config.finetune.base})")
  record = run.read_json(RECORD_FILE) or {}
  family = family or record.get("model_type")
  vocab = data_lib.vocab_size(config.data)
  max_positions = (record.get("config") or {}).get("max_position_embeddings")
  with config.unlocked():
    config.data.vocab_size = vocab
  hf.export_plan(config, family)  # refusals before anything is read or written
  hf.check_out_folder(out)
  mesh = model_lib.reader_mesh(config, 1)
  with parallel.activate(mesh):
    _, _, params = run.restore_params(config, vocab, mesh, step=step)
  files = hf.save_pretrained(params, config, out, family=family, vocab_size=vocab,
                             max_positions=max_positions)
  if config.data.tokenizer == "hf" and config.data.tokenizer_path:
    tokenizer = config.data.tokenizer_path
    files += _copy_tokenizer(tokenizer if os.path.isdir(tokenizer)
                             else os.path.dirname(tokenizer), out)
  return files
