"""The repository speaks for itself: CI runs the README's commands, and no file points outside."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).parents[1]


def _readme_setup_commands() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"## Set-up: the two commands\s+```bash\n(.*?)```", readme, re.S)
  assert block, "README.md has no 'Set-up: the two commands' bash block"
  return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_commands_verbatim():
  commands = _readme_setup_commands()
  assert len(commands) == 2 and commands[0].startswith("python -m ocl_jax.main")
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  for command in commands:
    assert command in ci, f".ci/run does not run the README's line verbatim: {command}"
    assert f"'{command}'" in (ROOT / ".ci" / "run").read_text()  # and checks it against README


def _tracked_text_files():
  names = subprocess.run(
      ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  for name in names:
    path = ROOT / name
    if path.suffix in (".png", ".jpg", ".safetensors") or not path.is_file():
      continue
    try:
      yield name, path.read_text()
    except UnicodeDecodeError:
      continue


def test_no_file_refers_outside_the_repository_or_to_development_rounds():
  outside = re.compile(r"\.\./shared/|METHOD\.md|PERF_NOTES|SCENES\.md")
  rounds = re.compile(r"\bsession \d|\bround \d", re.I)
  bad = [
      f"{name}:{i + 1}: {line.strip()}"
      for name, text in _tracked_text_files()
      if name != "tests/test_repository.py"
      for i, line in enumerate(text.splitlines())
      if outside.search(line) or rounds.search(line)
  ]
  assert not bad, "\n".join(bad)
