"""How the commands that read a workdir choose and open a checkpoint when some of its steps are damaged.

A junk folder named like a step, an edited or invalid ``meta`` item in the newest step, a truncated
array file: readers (export, sample, evaluate) fall back to the newest step that restores, with ONE
warning line naming the skipped step; a step the user names that does not restore is ONE error line
(exit 2) naming its folder and the steps that read. The trainer's resume falls back quietly too. The
commands run as subprocesses: what counts is every line a user sees (orbax's abandoned reads once
printed thousands).
"""

import json
import pathlib
import shutil
import sys

import pytest

from train_helpers import run, subprocess_env, train_command

CLI = [sys.executable, "-m", "ddim_jax.cli"]


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the trained run, to damage."""
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return copy


def _lines(result) -> list[str]:
  """Every non-empty line the command printed, stdout and stderr."""
  return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def _export(workdir, out, *extra):
  return run(CLI + ["export", "--workdir", str(workdir), "--out", str(out), *extra], subprocess_env(1))


def _assert_one_error_line(result, *needles):
  lines = _lines(result)
  assert result.returncode == 2, (result.returncode, lines[-20:])
  assert len(lines) == 1 and lines[0].startswith("ddim-jax export: error: "), lines[-20:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _assert_fell_back(result, skipped: int, used: int):
  """Success from step ``used``, with one warning line naming step ``skipped`` and nothing else."""
  lines = _lines(result)
  assert result.returncode == 0, lines[-20:]
  out, err = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("wrote ") and f"weights of step {used}," in out[0], lines[-20:]
  assert len(err) == 1, err[:20]
  assert "CheckpointRestoreWarning" in err[0] and f"checkpoint step {skipped} " in err[0], err[0]


# ------------------------------------------------------------------------------------------------
# 1. A folder that is no checkpoint.


@pytest.mark.slow  # its fixture trains a model
def test_a_junk_folder_named_like_a_step_is_one_line_naming_it_and_the_steps(workdir, tmp_path):
  junk = workdir / "checkpoints" / "12"
  junk.mkdir()
  (junk / "notes.txt").write_text("not a checkpoint")
  _assert_one_error_line(_export(workdir, tmp_path / "w.safetensors", "--checkpoint", "12"),
                         str(junk), "[4, 6, 8]")
  # The same folder with orbax's step mark copied into it: it is a step, and does not restore.
  shutil.copy(workdir / "checkpoints" / "8" / "_CHECKPOINT_METADATA", junk)
  _assert_one_error_line(_export(workdir, tmp_path / "w.safetensors", "--checkpoint", "12"),
                         f"checkpoint step 12 ({junk})", "4, 6, 8")
  # Latest: step 12 is skipped with one warning, step 8 exported.
  _assert_fell_back(_export(workdir, tmp_path / "w.safetensors"), skipped=12, used=8)


# ------------------------------------------------------------------------------------------------
# 2. An edited or damaged meta item in the newest step.


def _edit_meta(workdir: pathlib.Path, how: str) -> None:
  path = workdir / "checkpoints" / "8" / "meta" / "metadata"
  if how == "invalid-json":
    path.write_text(path.read_text()[:-5] + "xx")
    return
  meta = json.loads(path.read_text())
  if how == "widths":  # another model: the older steps do not fit it (every reader failed)
    meta["config"]["model"]["widths"] = [8, 32]
  elif how == "normalizer":
    meta["normalizer"]["mean"][0] += 0.25
  path.write_text(json.dumps(meta))


@pytest.mark.slow  # its fixture trains a model
@pytest.mark.parametrize("how", ["widths", "invalid-json", "normalizer"])
def test_an_edited_newest_meta_falls_back_in_one_warning_line(workdir, tmp_path, how):
  _edit_meta(workdir, how)
  _assert_fell_back(_export(workdir, tmp_path / "w.safetensors"), skipped=8, used=6)
  # Named explicitly, the broken step is one error line.
  line = _assert_one_error_line(_export(workdir, tmp_path / "w8.safetensors", "--checkpoint", "8"),
                                f"checkpoint step 8 ({workdir / 'checkpoints' / '8'})", "4, 6")
  assert "8" not in line.split("metadata reads:")[1].split(";")[0], line


@pytest.mark.slow  # its fixture trains a model
def test_sample_and_evaluate_fall_back_past_an_edited_newest_config(workdir, tmp_path):
  """Every reader gets its model from the step it restores, not from the damaged newest step."""
  _edit_meta(workdir, "widths")
  for command in (["sample", "--out", str(tmp_path / "g.png"), "--num-images", "2", "--steps", "1"],
                  ["evaluate", "--steps", "1", "--num-images", "8"]):
    result = run(CLI + [command[0], "--workdir", str(workdir), *command[1:], "--cpu-devices", "1"],
                 subprocess_env(1))
    lines = _lines(result)
    assert result.returncode == 0, lines[-20:]
    warned = [line for line in lines if "CheckpointRestoreWarning" in line]
    assert len(warned) == 1 and "checkpoint step 8 " in warned[0], lines[:20]
    assert "step 6" in "\n".join(lines), lines
    assert not any("Traceback" in line or "Event loop is closed" in line for line in lines), lines[:20]


# ------------------------------------------------------------------------------------------------
# 3. A truncated array file: orbax's abandoned reads once printed thousands of lines.


def _truncate_array_files(step_dir: pathlib.Path) -> None:
  """Every OCDBT data file of the step's state, cut to half its size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, "no OCDBT data file found: did orbax's layout change?"
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.slow  # its fixture trains a model
def test_a_truncated_newest_step_is_one_warning_line_for_readers_and_the_trainer(workdir, tmp_path, cache_dir):
  _truncate_array_files(workdir / "checkpoints" / "8")
  _assert_fell_back(_export(workdir, tmp_path / "w.safetensors"), skipped=8, used=6)
  line = _assert_one_error_line(_export(workdir, tmp_path / "w8.safetensors", "--checkpoint", "8"),
                                f"checkpoint step 8 ({workdir / 'checkpoints' / '8'})")
  assert len(line) < 1000, line

  # The trainer resumes from step 6, saying so, with one warning line about step 8 (and where it moved it).
  result = run(train_command(workdir, cache_dir, **{"train.num_steps": "10"}), subprocess_env(1))
  lines = _lines(result)
  assert result.returncode == 0, lines[-30:]
  assert "resuming from step 6" in result.stdout, lines[-30:]
  warned = [line for line in lines if "CheckpointRestoreWarning" in line]
  assert len(warned) == 1 and "checkpoint step 8 " in warned[0], lines[:30]
  noise = [i for i, line in enumerate(lines)
           if "Traceback" in line or "Event loop is closed" in line or "Exception ignored" in line]
  assert not noise, lines[max(0, noise[0] - 5):noise[0] + 25] if noise else None
  assert len(lines) < 40, lines  # the banner, the progress lines, the fallback's two lines
