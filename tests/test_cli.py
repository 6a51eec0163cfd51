"""The ``ddim-jax`` command end to end (small models)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ddim_jax import cli


def test_sample_and_info_from_a_weight_file(tmp_path, capsys, trained_weights):
  weights = trained_weights("keras")
  out = str(tmp_path / "grid.png")
  assert cli.main(["sample", "--weights", weights, "--out", out, "--num-images", "6", "--steps", "5",
                   "--rows", "2"]) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # 2 rows x 3 cols of 16px tiles, 2px padding
  assert grid.std() > 10  # not a blank image
  assert cli.main(["info", "--weights", weights]) == 0
  assert '"variant": "keras"' in capsys.readouterr().out


def test_bad_weight_file_is_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a weight file")
  assert cli.main(["sample", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
  assert "truncated or not a safetensors" in capsys.readouterr().err


def test_demo_console_script(tmp_path):
  workdir = tmp_path / "demo"
  result = subprocess.run([sys.executable, "-m", "ddim_jax.cli", "demo", "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  image = Image.open(workdir / "samples.png")
  assert image.size[0] > 100 and image.size[1] > 100
  assert os.path.exists(workdir / "init.safetensors")
