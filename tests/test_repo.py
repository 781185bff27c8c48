"""The README tells the truth about how CI installs and tests."""

import pathlib
import re

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
