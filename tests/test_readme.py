"""Every Python block of the README (and docs/) runs as written, each in a fresh process.

A block may read the run of a README command above it (`/tmp/shakespeare`,
trained by the shakespeare command); the test trains a 4-step miniature of
that config and puts its folder in the path's place.
"""

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from moejax.train import config as config_lib

from experiments import sweep
from moejax import train as train_lib

import host_devices  # tests/host_devices.py: the environment of N host devices
import shared_data  # tests/shared_data.py
from shared_data import SHAKESPEARE_DIR

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = {"/tmp/shakespeare": "shakespeare"}  # a README path -> the config that writes it


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks() -> list[str]:
  """Every ```python block of the README and of docs/*.md, in order."""
  return [block for path in DOCUMENTS
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The README's runs, in miniature: {README path: a trained workdir}."""
  shared_data.skip_without_shakespeare()
  base = tmp_path_factory.mktemp("readme_runs")
  sys.path.insert(0, str(REPO / "configs"))
  try:
    import shakespeare  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = shakespeare.get_config()
  config.data.manual_dir = str(SHAKESPEARE_DIR)
  config.model.update(d_model=32, num_layers=2, num_heads=4)
  config.model.moe.expert_hidden = 32
  config.train.update(steps=4, batch_size=8, seq_len=32, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=1, checkpoint_every=4)
  train_lib.train_and_evaluate(config, str(base / "shakespeare"))
  return {path: str(base / name) for path, name in RUNS.items()}


def test_the_readme_has_python_blocks():
  assert len(python_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, runs):
  block = python_blocks()[index]
  for path, workdir in runs.items():
    block = block.replace(f'"{path}"', repr(workdir))
  done = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=host_devices.subprocess_env(1))
  assert done.returncode == 0, f"README python block {index}:\n{block}\n{done.stderr[-3000:]}"


def test_readme_states_the_measured_numbers():
  # experiments/readme_numbers.py's output, committed: the README states each
  # number as that script renders it (a number changed in one place fails).
  from experiments import readme_numbers  # pylint: disable=import-outside-toplevel
  numbers = json.loads((REPO / "experiments" / "results" / "readme_numbers.json").read_text())
  readme = (REPO / "README.md").read_text()
  sentences = readme_numbers.render(numbers)
  missing = {name: sentences[name] for name in readme_numbers.unstated(readme, sentences)}
  assert not missing, missing
  assert all(timing["idle"] for timing in numbers["timings"].values())


def test_readme_router_table_is_the_measured_one():
  from experiments import compare_routers  # pylint: disable=import-outside-toplevel
  rows = json.loads((REPO / "experiments" / "results" / "routers" / "router_table.json"
                     ).read_text())
  readme = (REPO / "README.md").read_text()
  assert compare_routers.loss_table(rows) in readme
  assert compare_routers.corpus_table(rows, "tiny_shakespeare") in readme
  longer = json.loads((REPO / "experiments" / "results" / "routers_1500_steps"
                       / "router_table.json").read_text())
  assert compare_routers.corpus_table(longer, "tiny_shakespeare") in readme
  assert {row["seeds"] for row in rows} == {3}
  assert {row["corpus"] for row in rows} == {"tiny_shakespeare", "python_stdlib",
                                             "synthetic_mixture"}


# -- shell blocks --------------------------------------------------------------------------

_FLAG_NAMES = """
import json, runpy, sys
from absl import app, flags
def _report(*args, **kwargs):
  print(json.dumps(sorted(flags.FLAGS)))
  sys.exit(0)
app.run = _report
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


def shell_commands() -> list[list[str]]:
  """Every `python -m` command of the bash blocks (continuations joined,
  optional `[...]` parts dropped), as argv from the module on."""
  commands = []
  for path in DOCUMENTS:
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
      text = re.sub(r"\[[^\]]*\]", " ", block.replace("\\\n", " "))
      pending = ""
      for line in text.splitlines():
        pending += line + "\n"
        try:  # a quoted argument may span lines (gcloud's --command='...')
          words = shlex.split(pending, comments=True)
        except ValueError:
          continue
        pending = ""
        for start in [i for i, w in enumerate(words[:-1]) if w == "python"
                      and words[i + 1] == "-m"]:
          rest = words[start + 2:]
          end = rest.index("&&") if "&&" in rest else len(rest)
          commands.append(rest[:end])
  return commands


def _config_has(config, dotted: str) -> bool:
  node = config
  for key in dotted.split("."):
    if key not in node:
      return False
    node = node[key]
  return True


def test_readme_shell_commands_name_real_modules_flags_and_config_keys():
  commands = [c for c in shell_commands() if c[0] != "pytest"]
  assert len(commands) >= 20
  known = {}
  for module in sorted({c[0] for c in commands}):
    done = subprocess.run([sys.executable, "-c", _FLAG_NAMES, module], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=host_devices.subprocess_env(1))
    assert done.returncode == 0, f"python -m {module}: {done.stderr[-2000:]}"
    known[module] = set(json.loads(done.stdout.strip().splitlines()[-1]))
  for module, *args in commands:
    config = None
    for arg in args:
      name, _, value = arg.lstrip("-").partition("=")
      if not arg.startswith("--"):
        continue
      if name == "config" and ":" in value:
        # A config file with an argument (configs/hf.py:WORKDIR, a recorded
        # run config): its keys are the default config's.
        assert (REPO / value.partition(":")[0]).exists(), (module, arg)
        config = config_lib.default_config()
      elif name == "config":
        config = sweep.load_config_file(str(REPO / value))
      elif name.startswith("config."):
        assert config is not None and _config_has(config, name[len("config."):]), (module, arg)
      else:
        assert name in known[module], (module, arg)


# Commands that read only committed results: the test runs them as written,
# their outputs (under /tmp/) in a temporary folder.
QUICK_MODULES = ("experiments.compare_runs", "experiments.router_table")


@pytest.mark.parametrize("module", QUICK_MODULES)
def test_readme_quick_shell_commands_run(module, tmp_path):
  commands = [c for c in shell_commands() if c[0] == module]
  assert commands, f"the README has no {module} command"
  for command in commands:
    argv = [arg.replace("/tmp/", f"{tmp_path}/") for arg in command]
    done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=host_devices.subprocess_env(1))
    assert done.returncode == 0, f"python -m {' '.join(command)}:\n{done.stderr[-3000:]}"
    assert "| " in done.stdout  # each prints a Markdown table


def test_readme_numbers_times_a_command_and_reports_a_failure():
  from experiments import readme_numbers  # pylint: disable=import-outside-toplevel
  timing = readme_numbers.run_command("sleep", ["-c", "import time; time.sleep(0.3)"])
  assert timing["wall_seconds"] >= 0.3 and timing["peak_rss_mb"] > 0
  assert timing["cpus"] >= 1 and isinstance(timing["idle"], bool)
  with pytest.raises(SystemExit, match="fails failed"):
    readme_numbers.run_command("fails", ["-c", "raise SystemExit(3)"])
