"""The README's examples: every shell command in its code blocks is valid shell as written (a
copy-pasted `--config.model.widths=(32,64,96,128)` is a bash syntax error unless quoted), and the
"Python API" section's code runs and produces what it says.
"""

import os
import re
import shlex
import subprocess

import numpy as np
import pytest
from PIL import Image

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


def python_api_code() -> str:
  """The ```python blocks under the README's "Python API" heading, in order."""
  with open(README, encoding="utf-8") as f:
    blocks = [body for language, heading, body in code_blocks(f.read())
              if language == "python" and heading == "Python API"]
  assert blocks, "no ```python block under '## Python API'"
  return "\n".join(line for body in blocks for _, line in body)


@pytest.mark.slow
def test_python_api_example_runs(trained_weights, tmp_path, monkeypatch):
  """The section's code, with the demo weight file replaced by the small trained 16x16 model."""
  code = python_api_code()
  code, count = re.subn(r'^weights = "[^"]*"', f"weights = {trained_weights('keras')!r}", code, flags=re.M)
  assert count == 1, "the example's first line names the weight file: weights = \"...\""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("DDIM_JAX_CACHE_DIR", str(tmp_path / "cache"))  # the digits cache of real_images
  namespace = {}
  exec(compile(code, "README.md (Python API)", "exec"), namespace)  # pylint: disable=exec-used

  images, real, recon, strip = (np.asarray(namespace[k]) for k in ("images", "real", "recon", "strip"))
  assert namespace["upscale"] == 4  # 16 px tiles -> 64 px
  assert images.shape == (16, 16, 16, 3) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
  tile = 16 * 4 + 2
  assert Image.open("grid.png").size == (4 * tile + 2, 4 * tile + 2)
  assert real.shape == recon.shape == (8, 16, 16, 3) and 0.0 <= recon.min() and recon.max() <= 1.0
  assert Image.open("inversion.png").size == (8 * tile + 2, 2 * tile + 2)
  errors = namespace["errors"]
  assert sorted(errors) == [10, 20] and 0 < errors[20] < errors[10] < 0.1
  np.testing.assert_allclose(errors[20], np.mean(np.square(recon.astype(np.float64) - real)), rtol=1e-3)
  assert strip.shape == (9, 16, 16, 3) and Image.open("interpolation.png").size == (9 * tile + 2, tile + 2)
  # slerp returns its endpoints exactly, so the first and last frames are the samples of the two noises.
  source, frames = namespace["source"], np.asarray(namespace["frames"])
  np.testing.assert_array_equal(frames[[0, -1]], np.stack([namespace["start"], namespace["end"]]))
  ends = source.sample(2, steps=20, initial_noise=frames[[0, -1]])
  np.testing.assert_allclose(strip[[0, -1]], ends, atol=1e-5)
