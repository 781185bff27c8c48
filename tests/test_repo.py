"""The README tells the truth about how CI installs and tests."""

import importlib.util
import pathlib
import re

import pytest

from moejax import model as model_lib
from moejax.nn import transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands_after(marker: str, text: str) -> str:
  match = re.search(rf"# README: {marker}\n(.+)\n", text)
  assert match, f".ci/run has no '# README: {marker}' line"
  return match.group(1).strip()


def test_ci_runs_the_readme_commands():
  ci = (ROOT / ".ci" / "run").read_text()
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
  readme_lines = {line.strip() for block in blocks for line in block.splitlines()}
  for marker in ("install", "test"):
    command = _commands_after(marker, ci)
    assert command in readme_lines, f"README has no bash line {command!r}"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The moejax modules `path` imports, at module or function level (`from
  package import name` counts as the submodule when `name` is one)."""
  import ast  # pylint: disable=import-outside-toplevel
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        name = f"{node.module}.{alias.name}"
        found.add(name if name in known else node.module)
  return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
  paths = {_module_name(p): p for p in (ROOT / "moejax").rglob("*.py")}
  return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_no_import_cycle_in_moejax():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(name: str, path: list[str]) -> None:
    state[name] = 1
    for other in sorted(graph[name]):
      assert state.get(other) != 1, "import cycle: " + " -> ".join(
          path[path.index(other):] + [other] if other in path else path + [other])
      if other not in state:
        visit(other, path + [other])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_only_the_training_package_imports_the_trainer():
  users = [p for p in ROOT.rglob("*.py")
           if ".venv" not in p.parts and "moejax/train" not in p.as_posix()
           and p.name != "test_repo.py"
           and re.search(r"moejax\.train\.trainer|from moejax\.train import[^\n]*\btrainer\b",
                         p.read_text())]
  assert not users, f"import moejax.train.trainer outside moejax/train/: {users}"
  assert (ROOT / "moejax" / "run.py").exists()


def test_no_function_in_moejax_over_60_lines():
  import ast  # pylint: disable=import-outside-toplevel
  long = []
  for path in (ROOT / "moejax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 60:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, "functions over 60 lines:\n" + "\n".join(sorted(long))


def _shipped_configs():
  return sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: p.stem)
def test_shipped_configs_route_causally_or_say_why(path, tmp_path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if path.stem == "hf":  # configs/hf.py:WORKDIR, the config a workdir records
    from moejax.hf import workdirs  # pylint: disable=import-outside-toplevel
    workdirs.import_checkpoint(str(ROOT / "tests" / "hf_fixtures" / "mixtral"),
                               str(tmp_path / "run"))
    config = module.get_config(str(tmp_path / "run"))
  else:
    config = module.get_config()
  reason = transformer.noncausal_routing_reason(config.model.moe.to_dict(),
                                                model_lib.tokens_per_group(config))
  if reason is not None:  # allowed only with the reason in the config's docstring
    assert "non-causal" in module.__doc__ and "NonCausalRoutingWarning" in module.__doc__, (
        path.name, reason)
  assert path.stem != "shakespeare" or reason is None


def test_readme_contents_lists_every_section():
  readme = (ROOT / "README.md").read_text()
  contents = readme[readme.index("## Contents"):readme.index("## Install")]
  listed = re.findall(r"^\s*- \[(.+?)\]\(#", contents, flags=re.M)
  headings = re.findall(r"^#{2,3} (.+)$", readme[readme.index("## Install"):], flags=re.M)
  assert listed == headings
