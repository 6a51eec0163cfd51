"""The ``ddim-jax`` commands end to end: sample, figures, invert, interpolate, evaluate, KID during training,
and the torch twin's sample command against ``ddim-jax sample`` on the same weights and noise.

One tiny in-process training run (KID every 2 steps with random InceptionV3 weights saved to a
.pth file) serves every command test; the twin comparison uses the trained 16x16 fixture.
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ddim_jax import cli, data
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import evaluation, grids, pipeline
from ddim_jax.infra import checkpointing
from ddim_jax.interop import weight_files
from ddim_jax.quality import metrics
from ddim_jax.training import trainer
from ddim_torch_ref import sample as ref_sample
from inception_helpers import random_torch_inception
from train_helpers import REPO, subprocess_env, tiny_config

TILE = 16 * 4 + 2  # a 16 px image upscaled x4 (the default for 16 px figures) plus 2 px padding


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def _tile(grid: np.ndarray, row: int, col: int, size: int, pad: int = 2) -> np.ndarray:
  top, left = pad + row * (size + pad), pad + col * (size + pad)
  return grid[top:top + size, left:left + size]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  """Random torchvision-flavour InceptionV3 weights as a .pth file: KID mechanics only.

  Calibrated as in test_metrics (torch's default init gives constant features, so KID 0).
  """
  path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
  torch.save(random_torch_inception("torchvision", seed=3).state_dict(), path)
  return str(path)


@pytest.fixture(scope="module")
def kid_run(tmp_path_factory, inception_file):
  """A tiny 8-step run with KID on 8 validation images every 2 steps, keeping 1 checkpoint + the best."""
  root = tmp_path_factory.mktemp("kid_run")
  config = tiny_config(root / "cache", **{
      "train.kid_every": 2, "train.checkpoint_every": 8, "train.keep_checkpoints": 1,
      "eval.inception_weights": inception_file, "eval.num_kid_images": 8, "eval.kid_batch_size": 4,
      "eval.kid_steps": 2})
  trainer.train_and_evaluate(config, str(root / "run"), progress=False)
  return str(root / "run")


def _run_model(workdir):
  """(model, EMA variables, normalizer, config) of a run's newest checkpoint, as the commands load it."""
  model, variables, normalizer, config, _ = pipeline.restore_checkpoint(workdir)
  return model, variables, normalizer, config


@pytest.mark.slow
def test_kid_during_training_logs_val_kid_and_keeps_the_best_checkpoint(kid_run):
  records = [json.loads(line) for line in open(os.path.join(kid_run, "metrics.jsonl"), encoding="utf-8")]
  kids = {r["step"]: r["val_kid"] for r in records if "val_kid" in r}
  assert sorted(kids) == [2, 4, 6, 8]
  assert all(np.isfinite(v) for v in kids.values()) and len(set(kids.values())) == 4
  best = min(kids, key=kids.get)
  with checkpointing.Checkpointer(os.path.join(kid_run, "checkpoints"), max_to_keep=1, best_metric="val_kid",
                                  async_save=False) as ckpt:
    assert ckpt.best_step() == best
    assert ckpt.all_steps() == sorted({8, best})  # the newest one plus the best-KID one
    assert ckpt.metrics(best)["val_kid"] == pytest.approx(kids[best])


@pytest.mark.slow
def test_step_chooses_the_best_latest_or_a_numbered_checkpoint(kid_run, tmp_path, capsys):
  """--step best loads the lowest-KID checkpoint that training kept, and says which step it used."""
  with checkpointing.Checkpointer(os.path.join(kid_run, "checkpoints"), async_save=False) as ckpt:
    steps = ckpt.all_steps()
    kids = {s: ckpt.metrics(s)["val_kid"] for s in steps}
  best = min(kids, key=kids.get)
  for which, want in (("best", best), ("latest", 8), (str(steps[0]), steps[0])):
    out = tmp_path / f"{which}.safetensors"
    assert cli.main(["export", "--workdir", kid_run, "--out", str(out), "--step", which]) == 0
    assert f"of step {want}," in capsys.readouterr().out
    _, variables, _, config, step = pipeline.restore_checkpoint(kid_run, step=want)
    written, metadata = weight_files.read_weight_file(str(out))
    assert step == want and int(metadata["step"]) == want
    expected = weight_files.flax_to_torch_state_dict(variables)
    for name, value in expected.items():
      np.testing.assert_array_equal(written[name], value, err_msg=f"{which}: {name}")
  if best != 8:  # the two checkpoints differ: best really is not the newest
    best_weights = weight_files.read_weight_file(str(tmp_path / "best.safetensors"))[0]
    latest_weights = weight_files.read_weight_file(str(tmp_path / "latest.safetensors"))[0]
    assert any(np.any(best_weights[k] != latest_weights[k]) for k in best_weights)
  assert cli.main(["sample", "--workdir", kid_run, "--step", "best", "--num-images", "2", "--steps", "2",
                   "--out", str(tmp_path / "s.png")]) == 0
  assert f"step {best} (EMA, best: val_kid" in capsys.readouterr().out
  assert cli.main(["export", "--workdir", kid_run, "--out", str(tmp_path / "x.safetensors"), "--step", "5"]) == 2
  assert f"no checkpoint of step 5 in {kid_run}" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", kid_run, "--out", str(tmp_path / "x.safetensors"), "--step", "good"]) == 2
  assert "use latest, best or a step number" in capsys.readouterr().err


@pytest.mark.slow
def test_step_best_without_kid_is_a_clear_error(tmp_path, trained_weights, capsys):
  config = tiny_config(tmp_path / "cache", **{"train.num_steps": 2})
  trainer.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--step", "best", "--out",
                   str(tmp_path / "s.png")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "has a KID" in err and "--step latest" in err, err
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--step", "best"]) == 2
  assert "a weight file holds one step" in capsys.readouterr().err


def test_training_kid_without_inception_weights_warns_once_and_is_off(tmp_path):
  config = tiny_config(tmp_path / "cache", **{"train.kid_every": 2,
                                               "eval.inception_weights": str(tmp_path / "missing.pth")})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert evaluation.make_training_kid(config, None, np.zeros((4, 16, 16, 3), np.uint8)) is None
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and "KID during training is OFF" in messages[0], messages
  assert "inception_v3_google-0cc3c7bd.pth" in messages[0]  # says which file to get
  off = tiny_config(tmp_path / "cache")  # kid_every = 0 in the demo preset: no warning at all
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert evaluation.make_training_kid(off, None, None) is None
  assert not caught


@pytest.mark.slow
def test_evaluate_writes_a_kid_table_and_json(kid_run, inception_file, tmp_path, capsys):
  out = tmp_path / "kid.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2,3", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert set(record["kid"]) == {"2", "3"} and all(np.isfinite(v) for v in record["kid"].values())
  assert record["kid"]["2"] != record["kid"]["3"]  # the step count changes the samples
  assert (record["num_images"], record["batch_size"], record["image_size"], record["checkpoint_step"]) == (8, 4, 75, 8)
  assert "steps" in capsys.readouterr().out
  # The same KID from the library: features of the run's first 8 validation images and of the
  # samples of batch i's noise fold_in(key(seed), i), whatever the step count, in batches of 4.
  model, variables, normalizer, config = _run_model(kid_run)
  reals = data.load_split(config.data, "validation", 16)[:8].astype(np.float32) / 255.0
  feature_fn = evaluation.kid_feature_fn(inception_file, 75)
  noises = [jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (4, 16, 16, 3)) for i in range(2)]
  want = {}
  for steps in (2, 3):
    generated = np.concatenate([sampling.generate(model, variables, noise, normalizer, steps=steps,
                                                  spec=schedules.DiffusionSpec.from_config(config))["images"]
                                for noise in noises])
    want[str(steps)] = metrics.kid(reals, generated, feature_fn, batch_size=4)
    # The CLI splits each batch over 4 devices, this reference runs on one: float32 round-off in the
    # (random-weight, so huge) Inception features, measured 2.2e-6 relative.
    assert record["kid"][str(steps)] == pytest.approx(want[str(steps)], rel=1e-5, abs=1e-9), steps
  # A step count evaluated twice gives the same value (same noises and real batches every time).
  again = tmp_path / "again.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2,2", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--json", str(again)]) == 0
  repeated = json.loads(again.read_text())
  assert repeated["steps"] == [2, 2] and repeated["kid"] == {"2": record["kid"]["2"]}
  # The bundled digits get the digits metric by default (--metric auto); --metric kid asks for KID.
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--inception-weights",
                   str(tmp_path / "none.pth")]) == 2
  assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_from_a_workdir_writes_grid_images_and_trajectory(kid_run, tmp_path):
  grid, traj, arrays = tmp_path / "grid.png", tmp_path / "traj.png", tmp_path / "images.npy"
  assert cli.main(["sample", "--workdir", kid_run, "--num-images", "5", "--steps", "3", "--rows", "1",
                   "--batch-size", "2", "--out", str(grid), "--out-dir", str(tmp_path / "each"),
                   "--array-out", str(arrays), "--trajectory", str(traj), "--trajectory-images", "2"]) == 0
  assert _png(grid).shape == (TILE + 2, 5 * TILE + 2, 3)  # x4, as demo's grid; the --out-dir images at 16 px:
  files = sorted(os.listdir(tmp_path / "each"))
  assert files == [f"sample_{i:05d}.png" for i in range(5)]
  assert _png(tmp_path / "each" / files[0]).shape == (16, 16, 3)
  strip = _png(traj)
  assert strip.shape == (4 * TILE + 2, 3 * TILE + 2, 3)  # 2 samples x (noisy, predicted) rows, 3 steps
  # The strip starts from the grid's noise: its last prediction of sample 0 is grid image 0.
  images = np.load(arrays)
  want = grids.to_uint8(images[0]).repeat(4, axis=0).repeat(4, axis=1)
  assert np.abs(_tile(strip, 1, 2, 64).astype(int) - want).max() <= 1
  assert np.abs(_tile(strip, 0, 0, 64).astype(int) - want).mean() > 10  # the first column is noise


@pytest.mark.slow
def test_figures_forward_reverse_and_samples(kid_run, tmp_path):
  assert cli.main(["figures", "--workdir", kid_run, "--out-dir", str(tmp_path), "--steps", "3"]) == 0
  forward, reverse, samples = (_png(tmp_path / f) for f in ("forward.png", "reverse.png", "samples.png"))
  assert forward.shape == reverse.shape == (2 * TILE + 2, 11 * TILE + 2, 3)
  assert samples.shape == (6 * TILE + 2, 6 * TILE + 2, 3)
  # t = 0 is (nearly: linear's first beta is 1e-4) the clean image under both unclipped schedules;
  # t = 0.5 differs between them.
  assert np.abs(_tile(forward, 0, 0, 64).astype(int) - _tile(forward, 1, 0, 64)).max() <= 4
  assert np.abs(_tile(forward, 0, 5, 64).astype(int) - _tile(forward, 1, 5, 64)).mean() > 5
  assert np.abs(_tile(forward, 0, 0, 64).astype(int) - _tile(forward, 0, 10, 64)).mean() > 20

  # The reverse figure: top row the first training image noised at t = 0, 0.1, ..., 1 with the
  # run's schedule and NumPy noise of seed + 1 (one draw per column); bottom row the sampler's 10
  # deterministic steps from the top row's t = 1 image: its states, the last one the re-mix at t = 0.
  model, variables, normalizer, config = _run_model(kid_run)
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
      assert np.abs(_tile(reverse, row, col, 64).astype(int) - want).max() <= 1, (row, col)


@pytest.mark.slow
def test_invert_reports_errors_and_writes_a_figure(kid_run, tmp_path, capsys):
  out, record = tmp_path / "inv.png", tmp_path / "inv.json"
  assert cli.main(["invert", "--workdir", kid_run, "--steps", "2,10", "--num-images", "4", "--json", str(record),
                   "--out", str(out)]) == 0
  errors = json.loads(record.read_text())["reconstruction_mse"]
  assert set(errors) == {"2", "10"} and all(0 <= v < 1 for v in errors.values())
  assert _png(out).shape == (4 * TILE + 2, 4 * TILE + 2, 3)  # originals, recon@2, noise@10, recon@10
  assert "0.014" in capsys.readouterr().out  # the DDIM paper's 10-step value printed beside ours
  # The same numbers from the library: the run's first 4 validation images -> invert -> generate.
  model, variables, normalizer, config = _run_model(kid_run)
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
    # evaluation between 1- and 2-device programs, test_sample_cli), so |recon' - recon| <= d per
    # pixel and, by Cauchy-Schwarz, |MSE' - MSE| <= 2 sqrt(MSE) d + d^2: 5e-4 relative at 2 steps,
    # 8e-3 at 10, far below what other images, step counts or weights change (errors[2] / errors[10]
    # is ~9).
    d = 2 * steps * 64 * float(np.finfo(np.float32).eps)
    assert errors[str(steps)] == pytest.approx(want, rel=0, abs=2 * np.sqrt(want) * d + d * d), steps
  assert errors["10"] < errors["2"], errors  # more steps, a closer reconstruction


def test_interpolate_endpoints_are_the_samples_of_the_same_noise(kid_run, tmp_path):
  strip, grid, arrays = tmp_path / "strip.png", tmp_path / "grid.png", tmp_path / "a.npy"
  assert cli.main(["interpolate", "--workdir", kid_run, "--num-frames", "5", "--pairs", "2", "--steps", "3",
                   "--numpy-noise", "--seed", "4", "--out", str(strip)]) == 0
  image = _png(strip)
  assert image.shape == (2 * TILE + 2, 5 * TILE + 2, 3)
  assert cli.main(["sample", "--workdir", kid_run, "--num-images", "4", "--steps", "3", "--numpy-noise", "--seed", "4",
                   "--out", str(grid), "--array-out", str(arrays)]) == 0
  direct = grids.to_uint8(np.load(arrays)).repeat(4, axis=1).repeat(4, axis=2)
  for row, (first, last) in enumerate([(0, 1), (2, 3)]):
    assert np.abs(_tile(image, row, 0, 64).astype(int) - direct[first]).max() <= 1
    assert np.abs(_tile(image, row, 4, 64).astype(int) - direct[last]).max() <= 1


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
  pngs = _png(tmp_path / "jax.png").astype(int), _png(tmp_path / "torch.png").astype(int)
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


def test_noise_file_of_the_wrong_shape_is_a_clear_error(trained_weights, tmp_path, capsys):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((2, 8, 8, 3), np.float32))
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--noise-file", str(bad), "--num-images", "2",
                   "--out", str(tmp_path / "x.png")]) == 2
  assert "--noise-file" in capsys.readouterr().err
