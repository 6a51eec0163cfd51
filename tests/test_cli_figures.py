"""`ddim-jax figures`, `invert` and `interpolate` on the shared KID run (conftest.py), each against the
library's own computation of what the figure shows.
"""

import json

import numpy as np
import pytest

from ddim_jax import cli, data
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import grids
from cli_helpers import TILE, png, run_model, tile


@pytest.mark.slow
def test_figures_forward_reverse_and_samples(kid_run, tmp_path):
  assert cli.main(["figures", "--workdir", kid_run, "--out-dir", str(tmp_path), "--steps", "3"]) == 0
  forward, reverse, samples = (png(tmp_path / f) for f in ("forward.png", "reverse.png", "samples.png"))
  assert forward.shape == reverse.shape == (2 * TILE + 2, 11 * TILE + 2, 3)
  assert samples.shape == (6 * TILE + 2, 6 * TILE + 2, 3)
  # t = 0 is (nearly: linear's first beta is 1e-4) the clean image under both unclipped schedules;
  # t = 0.5 differs between them.
  assert np.abs(tile(forward, 0, 0, 64).astype(int) - tile(forward, 1, 0, 64)).max() <= 4
  assert np.abs(tile(forward, 0, 5, 64).astype(int) - tile(forward, 1, 5, 64)).mean() > 5
  assert np.abs(tile(forward, 0, 0, 64).astype(int) - tile(forward, 0, 10, 64)).mean() > 20

  # The reverse figure: top row the first training image noised at t = 0, 0.1, ..., 1 with the
  # run's schedule and NumPy noise of seed + 1 (one draw per column); bottom row the sampler's 10
  # deterministic steps from the top row's t = 1 image: its states, the last one the re-mix at t = 0.
  model, variables, normalizer, config = run_model(kid_run)
  spec = schedules.DiffusionSpec.from_config(config)
  mean, std = normalizer["mean"].astype(np.float64), np.sqrt(normalizer["variance"].astype(np.float64))
  image = (data.load_split(config.data, "train", 16)[0].astype(np.float64) / 255.0 - mean) / std
  noise_rates, signal_rates = spec.rate_table(np.linspace(0.0, 1.0, 11))
  column_noises = np.random.default_rng(1).standard_normal((11, 16, 16, 3), dtype=np.float32)
  top = (signal_rates.reshape(-1, 1, 1, 1) * image
         + noise_rates.reshape(-1, 1, 1, 1) * column_noises).astype(np.float32)
  bottom = np.asarray(sampling.generate(model, variables, top[-1:], normalizer, steps=10, return_trajectory=True,
                                        spec=spec)["noisy_trajectory"])[:, 0]
  for row, states in enumerate((top, bottom)):
    for col in range(11):
      want = grids.to_uint8(np.clip(mean + states[col] * std, 0.0, 1.0)).repeat(4, axis=0).repeat(4, axis=1)
      assert np.abs(tile(reverse, row, col, 64).astype(int) - want).max() <= 1, (row, col)


@pytest.mark.slow
def test_invert_reports_errors_and_writes_a_figure(kid_run, tmp_path, capsys):
  out, record = tmp_path / "inv.png", tmp_path / "inv.json"
  assert cli.main(["invert", "--workdir", kid_run, "--steps", "2,10", "--num-images", "4", "--json", str(record),
                   "--out", str(out)]) == 0
  errors = json.loads(record.read_text())["reconstruction_mse"]
  assert set(errors) == {"2", "10"} and all(0 <= v < 1 for v in errors.values())
  assert png(out).shape == (4 * TILE + 2, 4 * TILE + 2, 3)  # originals, recon@2, noise@10, recon@10
  assert "0.014" in capsys.readouterr().out  # the DDIM paper's 10-step value printed beside ours
  # The same numbers from the library: the run's first 4 validation images -> invert -> generate.
  model, variables, normalizer, config = run_model(kid_run)
  images = data.load_split(config.data, "validation", 16)[:4].astype(np.float32) / 255.0
  spec = schedules.DiffusionSpec.from_config(config)
  for steps in (2, 10):
    noises = sampling.invert(model, variables, images, normalizer, steps=steps, spec=spec)["noises"]
    recon = np.asarray(sampling.generate(model, variables, noises, normalizer, steps=steps, spec=spec)["images"])
    want = float(np.mean(np.square(recon.astype(np.float64) - images)))
    # The command splits the 4 images over the 4 devices, this runs them on one: the same float32
    # math in other XLA:CPU programs, whose convolution loops may round differently (bit-identical on
    # some processors; 7e-9 relative on an AVX2-only EPYC). Each of the 2 * steps network evaluations
    # (inversion, then sampling) is allowed 64 float32 eps of pixel round-off (measured: ~3 eps per
    # evaluation between 1- and 2-device programs, test_cli_sample), so |recon' - recon| <= d per
    # pixel and, by Cauchy-Schwarz, |MSE' - MSE| <= 2 sqrt(MSE) d + d^2: 5e-4 relative at 2 steps,
    # 8e-3 at 10, far below what other images, step counts or weights change (errors[2] / errors[10]
    # is ~9).
    d = 2 * steps * 64 * float(np.finfo(np.float32).eps)
    assert errors[str(steps)] == pytest.approx(want, rel=0, abs=2 * np.sqrt(want) * d + d * d), steps
  assert errors["10"] < errors["2"], errors  # more steps, a closer reconstruction


@pytest.mark.slow  # its fixture trains a model
def test_interpolate_endpoints_are_the_samples_of_the_same_noise(kid_run, tmp_path):
  strip, grid, arrays = tmp_path / "strip.png", tmp_path / "grid.png", tmp_path / "a.npy"
  assert cli.main(["interpolate", "--workdir", kid_run, "--num-frames", "5", "--pairs", "2", "--steps", "3",
                   "--numpy-noise", "--seed", "4", "--out", str(strip)]) == 0
  image = png(strip)
  assert image.shape == (2 * TILE + 2, 5 * TILE + 2, 3)
  assert cli.main(["sample", "--workdir", kid_run, "--num-images", "4", "--steps", "3", "--numpy-noise", "--seed", "4",
                   "--out", str(grid), "--array-out", str(arrays)]) == 0
  direct = grids.to_uint8(np.load(arrays)).repeat(4, axis=1).repeat(4, axis=2)
  for row, (first, last) in enumerate([(0, 1), (2, 3)]):
    assert np.abs(tile(image, row, 0, 64).astype(int) - direct[first]).max() <= 1
    assert np.abs(tile(image, row, 4, 64).astype(int) - direct[last]).max() <= 1
