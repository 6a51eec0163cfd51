"""The sampler options (issue 33) through the commands: `sample`, `figures`, `evaluate`, the torch
twin's `python -m ddim_torch_ref.sample`, the weight file's record of its run's sampler, and the
in-training KID's.

Expected images come from ``sampling.generate`` with the named ``solvers.Sampler``; the model is the
trained 16x16 Keras-variant fixture of conftest.py.
"""

import json

import numpy as np
import pytest

from ddim_jax import cli, configs
from ddim_jax.core import sampling, schedules, solvers
from ddim_jax.inference import evaluation, pipeline
from ddim_jax.interop import weight_files
from ddim_jax.quality import digits_metric
from ddim_torch_ref import sample as ref_sample
from ddim_torch_ref import solvers as torch_solvers
from train_helpers import tiny_config

DPMPP_LOGSNR = solvers.Sampler("dpmpp_2m", "logsnr")


def test_the_commands_offer_the_solvers_choices():
  assert cli.SAMPLERS == solvers.SAMPLERS == torch_solvers.SAMPLERS
  assert cli.TIME_GRIDS == solvers.TIME_GRIDS == torch_solvers.TIME_GRIDS


def noise(num, seed):
  return np.random.default_rng(seed).standard_normal((num, 16, 16, 3), dtype=np.float32)


@pytest.fixture
def dpmpp_weights(trained_model, tmp_path):
  """The trained Keras-variant model in a weight file that records DPM-Solver++(2M) on the log-SNR grid."""
  model, variables, normalizer = trained_model("keras")
  path = str(tmp_path / "dpmpp.safetensors")
  weight_files.save_weights(path, model, variables, normalizer, 16, schedules.DiffusionSpec(),
                            data=configs.load_config("demo").data, weights="ema", **DPMPP_LOGSNR.record())
  return path


@pytest.mark.slow
def test_sample_takes_the_weight_files_sampler_unless_told_and_the_twin_agrees(trained_model, dpmpp_weights,
                                                                              tmp_path, capsys):
  model, variables, normalizer = trained_model("keras")
  x = noise(4, 5)
  common = ["--weights", dpmpp_weights, "--num-images", "4", "--steps", "6", "--seed", "5", "--numpy-noise"]
  arrays = {}
  for name, extra in (("default", []), ("ddim", ["--sampler", "ddim", "--time-grid", "uniform"]),
                      ("uniform", ["--time-grid", "uniform"])):
    arrays[name] = str(tmp_path / f"{name}.npy")
    assert cli.main(["sample", *common, *extra, "--out", str(tmp_path / f"{name}.png"),
                     "--array-out", arrays[name]]) == 0
  out = capsys.readouterr().out
  assert "dpmpp_2m (logsnr grid), 6 steps" in out and "ddim, 6 steps" in out and "dpmpp_2m, 6 steps" in out

  def want(sampler):
    return np.asarray(sampling.generate(model, variables, x, normalizer, steps=6, sampler=sampler)["images"])

  for name, sampler in (("default", DPMPP_LOGSNR), ("ddim", solvers.DDIM), ("uniform", solvers.Sampler("dpmpp_2m"))):
    np.testing.assert_allclose(np.load(arrays[name]), want(sampler), atol=1e-6, err_msg=name)
  assert np.abs(np.load(arrays["default"]) - np.load(arrays["ddim"])).mean() > 1e-3  # the sampler matters
  # The torch twin's command reads the same default from the file: the same images.
  torch_arrays = str(tmp_path / "torch.npy")
  assert ref_sample.main([*common, "--out", str(tmp_path / "torch.png"), "--array-out", torch_arrays]) == 0
  assert "dpmpp_2m (logsnr grid), 6 steps" in capsys.readouterr().out
  assert np.max(np.abs(np.load(torch_arrays) - np.load(arrays["default"]))) <= 1e-4
  # The trajectory strip follows the sampler too (its first rows are the grid's first noises).
  strip = tmp_path / "strip.png"
  assert cli.main(["sample", *common, "--out", str(tmp_path / "g.png"), "--trajectory", str(strip),
                   "--trajectory-images", "1"]) == 0
  assert strip.exists()


@pytest.mark.slow
def test_sampler_errors_name_the_fix(dpmpp_weights, trained_model, tmp_path, capsys):
  out = str(tmp_path / "x.png")
  # eta is DDIM's: the file's default sampler is deterministic.
  assert cli.main(["sample", "--weights", dpmpp_weights, "--eta", "0.5", "--out", out]) == 2
  assert "eta=0.5 is DDIM's: sampler dpmpp_2m is deterministic; give eta 0 or --sampler ddim" in capsys.readouterr().err
  assert ref_sample.main(["--weights", dpmpp_weights, "--eta", "0.5", "--out", out]) == 2
  assert "eta=0.5 is DDIM's" in capsys.readouterr().err
  # The log-SNR grid needs the cosine schedule.
  model, variables, normalizer = trained_model("keras")
  linear = str(tmp_path / "linear.safetensors")
  weight_files.save_weights(linear, model, variables, normalizer, 16, schedules.DiffusionSpec("linear"))
  assert cli.main(["sample", "--weights", linear, "--time-grid", "logsnr", "--out", out]) == 2
  assert "logsnr time grid needs the cosine schedule" in capsys.readouterr().err
  # A weight file that records an unknown sampler is refused, naming the key.
  bad = str(tmp_path / "bad.safetensors")
  weight_files.save_weights(bad, model, variables, normalizer, 16, sampler="euler")
  assert cli.main(["info", "--weights", bad]) == 2
  assert "metadata unknown sampler 'euler'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["sample", "--weights", dpmpp_weights, "--sampler", "euler", "--out", out])
  assert exit_info.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_and_figures_take_the_sampler(dpmpp_weights, tmp_path, capsys):
  assert cli.main(["evaluate", "--weights", dpmpp_weights, "--steps", "3", "--num-images", "32",
                   "--sampler", "dpmpp_2m", "--json", "-"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert (record["sampler"], record["time_grid"]) == ("dpmpp_2m", "logsnr")  # the file's grid, the given sampler
  source = pipeline.load_model(weights=dpmpp_weights)
  metric = digits_metric.DigitsMetric.for_data(source.data_config, source.image_size)
  want = metric.score(source.sample(32, 3, 0.0, 0, 64, sampler=DPMPP_LOGSNR))
  assert record["frechet_distance"]["3"] == pytest.approx(want.frechet_distance, rel=1e-9)
  ddim = metric.score(source.sample(32, 3, 0.0, 0, 64))
  assert ddim.frechet_distance != want.frechet_distance
  assert cli.main(["figures", "--weights", dpmpp_weights, "--out-dir", str(tmp_path / "figs"), "--steps", "3",
                   "--sampler", "ddim"]) == 0
  assert "(6x6 samples, ddim (logsnr grid), 3 steps)" in capsys.readouterr().out  # the file's grid kept


def test_training_kid_and_grids_use_config_sample(tmp_path, inception_file, monkeypatch):
  """config.sample.sampler/time_grid reach the in-training KID (and the export records them)."""
  config = tiny_config(tmp_path / "cache", **{"train.kid_every": 2, "eval.inception_weights": inception_file,
                                              "eval.fid": False, "sample.sampler": "dpmpp_2m",
                                              "sample.time_grid": "logsnr"})
  seen = {}

  def quality(*args, sampler=None, **_):
    seen["sampler"] = sampler
    return {args[5][0]: {"kid": 0.0}}  # {steps: values} of steps_list = [eval.kid_steps]

  monkeypatch.setattr(evaluation, "quality_for_steps", quality)
  images = np.zeros((8, 16, 16, 3), np.uint8)
  kid = evaluation.make_training_kid(config, None, images)
  kid(None, None)
  assert seen["sampler"] == DPMPP_LOGSNR
  # A command's --time-grid alone keeps the run's sampler.
  source = pipeline.InferenceModel(None, None, {}, 16, schedules.DiffusionSpec(), config.data, "a run", 0,
                                   solvers.Sampler.from_config(config.sample))
  assert source.choose_sampler(time_grid="uniform") == solvers.Sampler("dpmpp_2m")
