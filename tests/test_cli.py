"""The ``ddim-jax`` command end to end (small models)."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from ddim_jax import cli
from ddim_jax.interop import weight_files
from train_helpers import run, subprocess_env, tiny_overrides


@pytest.mark.slow
def test_sample_and_info_from_a_weight_file(tmp_path, capsys, trained_weights):
  weights = trained_weights("keras")
  out = str(tmp_path / "grid.png")
  assert cli.main(["sample", "--weights", weights, "--out", out, "--num-images", "6", "--steps", "5",
                   "--rows", "2"]) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # 2 rows x 3 cols of 16px tiles upscaled x4 (the default), 2px pads
  assert grid.std() > 10  # not a blank image
  assert cli.main(["info", "--weights", weights]) == 0
  assert '"variant": "keras"' in capsys.readouterr().out


def test_bad_weight_file_is_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a weight file")
  assert cli.main(["sample", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
  assert "truncated or not a safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_train_export_sample_end_to_end(tmp_path):
  """`ddim-jax demo` (shortened), then `export` (EMA and raw) and `sample` from the exported file."""
  workdir = tmp_path / "demo"
  overrides = tiny_overrides(tmp_path / "cache", **{"train.num_steps": 4, "train.sample_every": 2})
  result = run([sys.executable, "-m", "ddim_jax.cli", "demo", "--workdir", str(workdir), *overrides],
               subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert Image.open(workdir / "samples.png").size == (2 + 2 * 66, 2 + 2 * 66)  # 4 images, 16px x4, 2px pads
  assert (workdir / "samples" / "step_0000002.png").exists()
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl", encoding="utf-8")]
  assert [r["step"] for r in records] == [2, 4] and all(r["loss"] > 0 for r in records)
  assert os.listdir(workdir / "tensorboard")
  for extra in ([], ["--raw"]):
    out = tmp_path / f"w{len(extra)}.safetensors"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), *extra]) == 0
  ema = weight_files.read_weight_file(str(tmp_path / "w0.safetensors"))
  raw = weight_files.read_weight_file(str(tmp_path / "w1.safetensors"))
  assert ema[1]["weights"] == "ema" and raw[1]["weights"] == "raw" and ema[1]["step"] == "4"
  assert any(np.any(ema[0][k] != raw[0][k]) for k in ema[0])  # the EMA is not the raw weights
  # `sample` of the exported file, with demo's numbers (4 images, 3 steps, seed 0), writes demo's grid: the
  # same images at the same default upscale (x4 for 16 px).
  assert cli.main(["sample", "--weights", str(tmp_path / "w0.safetensors"), "--out", str(tmp_path / "s.png"),
                   "--num-images", "4", "--steps", "3", "--seed", "0"]) == 0
  sampled, demo = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (tmp_path / "s.png",
                                                                                 workdir / "samples.png"))
  assert sampled.shape == demo.shape and np.abs(sampled - demo).max() <= 1


def test_export_without_checkpoints_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
  assert "no checkpoints" in capsys.readouterr().err
