"""`ddim-jax sample` against the library and the torch twin: the JAX-key and NumPy noise conventions,
a weight file's schedule/target metadata driving the sampler, the trajectory strip's step selection,
images split over CPU devices, and `info` of a weight file.

Expected images come from ``sampling.generate`` on noise built here as the README describes; the
models are the trained 16x16 fixtures of conftest.py, or the shared KID run for `--workdir`.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ddim_jax import cli
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import figures, grids
from ddim_jax.interop import weight_files
from ddim_torch_ref import sample as ref_sample
from cli_helpers import TILE, png, tile
from train_helpers import REPO, subprocess_env


def _denormalize(x, normalizer):
  """clip(mean + x sqrt(variance), 0, 1) in NumPy."""
  return np.clip(normalizer["mean"] + np.asarray(x, np.float64) * np.sqrt(normalizer["variance"]), 0.0, 1.0)


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
  assert re.search(r"variant\s+keras", capsys.readouterr().out)  # info's text


def test_bad_weight_file_is_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a weight file")
  assert cli.main(["sample", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
  assert "truncated or not a safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.slow
def test_sample_without_numpy_noise_uses_the_documented_jax_keys(trained_weights, trained_model, tmp_path, eta):
  """Batch noise from split(fold_in(key(seed), first index of the batch))[0], eta > 0 draws from [1]."""
  model, variables, normalizer = trained_model("keras")
  arrays = tmp_path / "images.npy"
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--num-images", "5", "--batch-size", "2",
                   "--steps", "3", "--eta", str(eta), "--seed", "3", "--out", str(tmp_path / "grid.png"),
                   "--array-out", str(arrays)]) == 0
  want = []
  for start in (0, 2, 4):  # three batches: 2, 2 and 1 images
    noise_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(3), start))
    noise = jax.random.normal(noise_key, (min(2, 5 - start), 16, 16, 3))
    want.append(np.asarray(sampling.generate(model, variables, noise, normalizer, key=step_key if eta else None,
                                             steps=3, eta=eta)["images"]))
  got, want = np.load(arrays), np.concatenate(want)
  assert got.shape == (5, 16, 16, 3)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.abs(got[0] - got[2]).mean() > 1e-2 and np.abs(got[0] - got[4]).mean() > 1e-2  # batches differ


@pytest.mark.slow
def test_weight_file_metadata_drives_the_sampler(trained_model, tmp_path):
  """An r-variant file with linear schedule, image target and its own signal rates samples with them."""
  model, variables, normalizer = trained_model("r")
  spec = schedules.DiffusionSpec("linear", min_signal_rate=0.03, max_signal_rate=0.8, target="image")
  # At 8 steps both clip bounds of linear's alpha_bar are reached (t = 1 and t = 1/8): each rate matters.
  linear = sampling.step_rates(8, spec)[1]
  assert linear[0] != sampling.step_rates(8, schedules.DiffusionSpec("linear", 0.02, 0.8))[1][0]
  assert linear[-1] != sampling.step_rates(8, schedules.DiffusionSpec("linear", 0.03, 0.95))[1][-1]
  weights = tmp_path / "r_linear_image.safetensors"
  weight_files.save_weights(str(weights), model, variables, normalizer, 16, spec, weights="ema")
  arrays = tmp_path / "images.npy"
  assert cli.main(["sample", "--weights", str(weights), "--num-images", "3", "--steps", "8", "--numpy-noise",
                   "--seed", "2", "--out", str(tmp_path / "grid.png"), "--array-out", str(arrays)]) == 0
  loaded, _, _, metadata = weight_files.load_weights(str(weights))
  assert loaded.variant == "r" and metadata["schedule"] == "linear" and metadata["target"] == "image"
  noise = np.random.default_rng(2).standard_normal((3, 16, 16, 3), dtype=np.float32)
  want = np.asarray(sampling.generate(model, variables, noise, normalizer, steps=8, spec=spec)["images"])
  default = np.asarray(sampling.generate(model, variables, noise, normalizer, steps=8)["images"])
  got = np.load(arrays)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.abs(got - default).mean() > 1e-2  # the metadata matters: the default kwargs give other images


def test_pick_columns_is_evenly_spaced_with_first_and_last():
  for steps, max_columns in [(12, 5), (23, 20), (50, 6), (100, 20), (7, 2)]:
    columns = grids.pick_columns(steps, max_columns)
    # Closed form: round(k (S - 1) / (K - 1)), k = 0..K-1 (no .5 ties for these sizes but (12, 5)'s 5.5 -> 6).
    want = [int(np.floor(k * (steps - 1) / (max_columns - 1) + 0.5)) for k in range(max_columns)]
    np.testing.assert_array_equal(columns, want)
    assert columns[0] == 0 and columns[-1] == steps - 1 and len(columns) == max_columns
    gaps = np.diff(columns)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1, (steps, columns)  # evenly spaced
  np.testing.assert_array_equal(grids.pick_columns(6, 20), np.arange(6))  # few steps: all of them


@pytest.mark.slow
def test_trajectory_rows_show_the_chosen_steps(trained_model):
  model, variables, normalizer = trained_model("keras")
  noise = np.random.default_rng(6).standard_normal((2, 16, 16, 3), dtype=np.float32)
  rows = figures.trajectory_rows(model, variables, normalizer, noise, 12, max_columns=5)
  out = sampling.generate(model, variables, noise, normalizer, steps=12, return_trajectory=True)
  noisy, preds = np.asarray(out["noisy_trajectory"]), np.asarray(out["pred_trajectory"])
  columns = [0, 3, 6, 8, 11]  # round(k * 11 / 4), k = 0..4
  assert len(rows) == 4 and all(r.shape == (5, 16, 16, 3) for r in rows)
  for b in range(2):
    # Row 2b: the state each chosen evaluation sees; row 2b + 1: its predicted image.
    np.testing.assert_allclose(rows[2 * b], _denormalize(noisy[columns, b], normalizer), atol=1e-6)
    np.testing.assert_allclose(rows[2 * b + 1], _denormalize(preds[columns, b], normalizer), atol=1e-6)


@pytest.mark.slow
def test_sample_trajectory_strip_of_many_steps(trained_weights, trained_model, tmp_path):
  """23 steps, 20 columns at most: the strip's panels are the trajectory at the chosen steps."""
  model, variables, normalizer = trained_model("keras")
  strip_path = tmp_path / "strip.png"
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--num-images", "1", "--steps", "23",
                   "--numpy-noise", "--seed", "5", "--out", str(tmp_path / "grid.png"), "--trajectory",
                   str(strip_path), "--trajectory-images", "1"]) == 0
  strip = np.asarray(Image.open(strip_path).convert("RGB")).astype(int)
  assert strip.shape == (2 * TILE + 2, 20 * TILE + 2, 3)
  noise = np.random.default_rng(5).standard_normal((1, 16, 16, 3), dtype=np.float32)
  out = sampling.generate(model, variables, noise, normalizer, steps=23, return_trajectory=True)
  shown = lambda x: grids.to_uint8(_denormalize(x, normalizer)).repeat(4, axis=0).repeat(4, axis=1)  # noqa: E731
  for col in range(20):
    step = int(np.floor(col * 22 / 19 + 0.5))
    assert np.abs(tile(strip, 0, col) - shown(out["noisy_trajectory"][step, 0])).max() <= 1, col
    assert np.abs(tile(strip, 1, col) - shown(out["pred_trajectory"][step, 0])).max() <= 1, col


def test_noise_conventions_agree_between_the_twins():
  """The torch twin's CLI keeps a JAX-free copy of the NumPy noise conventions: the same numbers."""
  from ddim_jax.inference import pipeline
  from ddim_torch_ref import sample as ref_sample
  shape = (3, 16, 16, 3)
  np.testing.assert_array_equal(pipeline.numpy_noise(5, shape), ref_sample.numpy_noise(5, shape))
  np.testing.assert_array_equal(pipeline.numpy_step_noise_generator(5).standard_normal(shape, dtype=np.float32),
                                ref_sample.numpy_step_noise_generator(5).standard_normal(shape, dtype=np.float32))
  assert np.abs(pipeline.numpy_noise(5, shape) - pipeline.numpy_noise(6, shape)).mean() > 0.5


@pytest.mark.slow
def test_sample_cpu_devices_splits_the_batches_and_keeps_the_images(trained_weights, tmp_path):
  """`sample --cpu-devices 2` (no XLA_FLAGS) runs on 2 JAX CPU devices, says so, and writes the images
  of `--cpu-devices 1`."""
  import subprocess
  import sys
  from train_helpers import subprocess_env
  env = subprocess_env(None)
  arrays = {}
  for devices in ("1", "2"):
    arrays[devices] = tmp_path / f"images_{devices}.npy"
    cmd = [sys.executable, "-m", "ddim_jax.cli", "sample", "--weights", trained_weights("keras"), "--num-images", "6",
           "--batch-size", "4", "--steps", "3", "--eta", "0.5", "--cpu-devices", devices,
           "--out", str(tmp_path / f"grid_{devices}.png"), "--array-out", str(arrays[devices])]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"batches split over {devices} device" in result.stdout, result.stdout
  # The same per-example math; the two processes' XLA:CPU thread pools (1 vs 2 devices) pick other
  # convolution loops: float32 round-off, measured up to 1.1e-6 in [0, 1] pixels.
  np.testing.assert_allclose(np.load(arrays["2"]), np.load(arrays["1"]), atol=1e-5)


@pytest.mark.slow
def test_sample_from_a_workdir_writes_grid_images_and_trajectory(kid_run, tmp_path):
  grid, traj, arrays = tmp_path / "grid.png", tmp_path / "traj.png", tmp_path / "images.npy"
  assert cli.main(["sample", "--workdir", kid_run, "--num-images", "5", "--steps", "3", "--rows", "1",
                   "--batch-size", "2", "--out", str(grid), "--out-dir", str(tmp_path / "each"),
                   "--array-out", str(arrays), "--trajectory", str(traj), "--trajectory-images", "2"]) == 0
  assert png(grid).shape == (TILE + 2, 5 * TILE + 2, 3)  # x4, as demo's grid; the --out-dir images at 16 px:
  files = sorted(os.listdir(tmp_path / "each"))
  assert files == [f"sample_{i:05d}.png" for i in range(5)]
  assert png(tmp_path / "each" / files[0]).shape == (16, 16, 3)
  strip = png(traj)
  assert strip.shape == (4 * TILE + 2, 3 * TILE + 2, 3)  # 2 samples x (noisy, predicted) rows, 3 steps
  # The strip starts from the grid's noise: its last prediction of sample 0 is grid image 0.
  images = np.load(arrays)
  want = grids.to_uint8(images[0]).repeat(4, axis=0).repeat(4, axis=1)
  assert np.abs(tile(strip, 1, 2, 64).astype(int) - want).max() <= 1
  assert np.abs(tile(strip, 0, 0, 64).astype(int) - want).mean() > 10  # the first column is noise


@pytest.mark.slow
def test_torch_twin_sample_command_matches_ddim_jax(trained_weights, tmp_path):
  weights = trained_weights("keras")
  jax_arr, torch_arr = tmp_path / "jax.npy", tmp_path / "torch.npy"
  assert cli.main(["sample", "--weights", weights, "--num-images", "6", "--steps", "10", "--seed", "7",
                   "--numpy-noise", "--out", str(tmp_path / "jax.png"), "--array-out", str(jax_arr)]) == 0
  # The twin in a fresh process, which must not import JAX.
  code = ("import sys; from ddim_torch_ref import sample; rc = sample.main(sys.argv[1:]); "
          "assert 'jax' not in sys.modules, 'ddim_torch_ref.sample imported jax'; sys.exit(rc)")
  result = subprocess.run([sys.executable, "-c", code, "--weights", weights, "--num-images", "6", "--steps", "10",
                           "--seed", "7", "--out", str(tmp_path / "torch.png"), "--array-out", str(torch_arr)],
                          env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  a, b = np.load(jax_arr), np.load(torch_arr)
  assert a.shape == b.shape == (6, 16, 16, 3) and a.std() > 0.05
  assert np.max(np.abs(a - b)) <= 1e-4
  pngs = png(tmp_path / "jax.png").astype(int), png(tmp_path / "torch.png").astype(int)
  assert np.abs(pngs[0] - pngs[1]).max() <= 1  # uint8 rounding of <= 1e-4 differences

  # --noise-file, eta > 0 (per-step draws from NumPy too), the twin in process this time.
  noise_file = tmp_path / "noise.npy"
  np.save(noise_file, np.random.default_rng(11).standard_normal((3, 16, 16, 3), dtype=np.float32))
  common = ["--weights", weights, "--num-images", "3", "--steps", "8", "--eta", "0.5", "--seed", "2",
            "--noise-file", str(noise_file)]
  assert cli.main(["sample", *common, "--out", str(tmp_path / "j2.png"), "--array-out", str(jax_arr)]) == 0
  assert ref_sample.main([*common, "--out", str(tmp_path / "t2.png"), "--array-out", str(torch_arr)]) == 0
  assert np.max(np.abs(np.load(jax_arr) - np.load(torch_arr))) <= 1e-4
  assert np.max(np.abs(np.load(jax_arr) - a[:3])) > 1e-2  # another noise: other images


@pytest.mark.slow  # its fixture trains a model
def test_noise_file_of_the_wrong_shape_is_a_clear_error(trained_weights, tmp_path, capsys):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((2, 8, 8, 3), np.float32))
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--noise-file", str(bad), "--num-images", "2",
                   "--out", str(tmp_path / "x.png")]) == 2
  assert "--noise-file" in capsys.readouterr().err
