"""The README's examples: every shell command in its code blocks is valid shell as written (a
copy-pasted `--config.model.widths=(32,64,96,128)` is a bash syntax error unless quoted).
"""

import os
import re
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = [README] + sorted(os.path.join(REPO, "docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                         if f.endswith(".md"))
COMMANDS = {"ddim-jax", "make", "python", "python3", "pip", "srun"}
# Usage notation of the command synopsis, `(--weights FILE | --workdir DIR)`: one of the alternatives.
ALTERNATIVES = re.compile(r"\((--[^()|]*?)\s*\|[^()]*\)")


def code_blocks(text: str) -> list[tuple[str, str, list[tuple[int, str]]]]:
  """(language, heading, [(line number, line)]) of every fenced (```lang) and indented code block."""
  lines = text.splitlines()
  blocks, heading, i, prev_blank = [], "", 0, True
  while i < len(lines):
    line = lines[i]
    fence = re.match(r"^(`{3,})(\w*)", line)
    if fence:
      body, i = [], i + 1
      while i < len(lines) and not lines[i].startswith(fence.group(1)):
        body.append((i + 1, lines[i]))
        i += 1
      blocks.append((fence.group(2), heading, body))
      i, prev_blank = i + 1, False
      continue
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
    if line.startswith("    ") and prev_blank:  # an indented block (not a list item's continuation)
      body = []
      while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        body.append((i + 1, lines[i][4:]))
        i += 1
      blocks.append(("indented", heading, body))
      continue
    prev_blank = not line.strip()
    i += 1
  return blocks


def shell_commands(path: str) -> list[tuple[str, str]]:
  """("file:line", command) of every shell command in a Markdown file's code blocks: lines (joined
  over trailing backslashes) whose command, after VAR=value assignments, is one of COMMANDS; and
  inline `--config.a.b=value` overrides, as arguments of `ddim-jax train`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  name = os.path.relpath(path, REPO)
  out = []
  for language, _, body in code_blocks(text):
    if language not in ("indented", "", "sh", "bash", "shell", "console"):
      continue
    joined, start = "", None
    for number, line in body:
      start = number if start is None else start
      if line.rstrip().endswith("\\"):
        joined += line.rstrip()[:-1] + " "
        continue
      command, joined, where = joined + line, "", f"{name}:{start}"
      start = None
      words = command.split()
      while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
      if words and words[0] in COMMANDS:
        out.append((where, ALTERNATIVES.sub(r"\1", command.strip())))
  for match in re.finditer(r"`(['\"]?--config\.[^`]*)`", text):
    out.append((f"{name}:{text.count(chr(10), 0, match.start()) + 1}", f"ddim-jax train {match.group(1)}"))
  return out


def test_the_extraction_finds_the_commands():
  commands = dict((c, w) for w, c in shell_commands(README))
  assert "make test" in " ".join(commands)
  assert any(c.startswith("ddim-jax sample --weights FILE.safetensors --out grid.png") for c in commands)  # synopsis
  assert any(c.startswith("ddim-jax sample --workdir outputs/demo") and "--trajectory-images 3" in c
             for c in commands)  # three lines joined
  assert any("--config.model.widths=" in c for c in commands)  # the inline override
  bad = "    ddim-jax train --config.model.widths=(32,64)\n"
  assert not _bash_ok(bad.strip())


def _bash_ok(command: str) -> bool:
  return subprocess.run(["bash", "-n", "-c", command], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_shell_commands_in_the_docs_are_valid_shell(path):
  commands = shell_commands(path)
  if path == README:
    assert len(commands) >= 20
  for where, command in commands:
    try:
      shlex.split(command, comments=True)
    except ValueError as e:
      pytest.fail(f"{where}: {command!r} does not split as shell words: {e}")
    result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{where}: {command!r} is not valid bash (quote it): {result.stderr.strip()}"
