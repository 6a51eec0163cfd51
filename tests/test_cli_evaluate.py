"""`ddim-jax evaluate --metric kid` on the shared KID run (conftest.py) against the library's KID and FID
of the same samples and real images. (The digits metric's `evaluate`: test_digits_metric.py; the
standard FID against pytorch-fid: test_fid_standard.py.)
"""

import json

import jax
import numpy as np
import pytest

from ddim_jax import cli, data
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import evaluation
from ddim_jax.quality import inception_weights, metrics
from cli_helpers import run_model
from inception_helpers import random_torch_inception


@pytest.mark.slow
def test_evaluate_writes_a_kid_table_and_json(kid_run, inception_file, tmp_path, capsys, monkeypatch):
  import torch
  # A random FID Inception (pytorch-fid's flavour, 1008 classes) as --fid-weights: FID at 299 px.
  fid_file = str(tmp_path / "random_fid_inception.pth")
  torch.save(random_torch_inception("fid", seed=22, image_size=299, num_images=2).state_dict(), fid_file)
  out = tmp_path / "kid.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2,3", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--fid-weights", fid_file,
                   "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert set(record["kid"]) == {"2", "3"} and all(np.isfinite(v) for v in record["kid"].values())
  assert record["kid"]["2"] != record["kid"]["3"]  # the step count changes the samples
  assert (record["num_images"], record["batch_size"], record["checkpoint_step"]) == (8, 4, 8)
  kid_settings = {k: v for k, v in record["kid_settings"].items() if k != "weights_sha256"}
  assert kid_settings == {"inception_weights": inception_file, "flavour": "torchvision", "image_size": 75,
                          "batch_size": 4}
  fid_settings = {k: v for k, v in record["fid_settings"].items() if k != "weights_sha256"}
  assert fid_settings == {"inception_weights": fid_file, "flavour": "fid", "image_size": 299, "name": "fid",
                          "published_weights": False}
  printed = capsys.readouterr()
  assert "steps" in printed.out and "FID: random_fid_inception.pth at 299 px" in printed.out
  assert "not pytorch-fid's published" in printed.err  # random weights: said in one line
  # The same KID from the library: features of the run's first 8 validation images and of the
  # samples of batch i's noise fold_in(key(seed), i), whatever the step count, in batches of 4.
  model, variables, normalizer, config = run_model(kid_run)
  reals = data.load_split(config.data, "validation", 16)[:8].astype(np.float32) / 255.0
  feature_fn = evaluation.kid_feature_fn(inception_file, 75)
  fid_fn = evaluation.kid_feature_fn(fid_file, 299)
  # The real images' features were kept in the data cache entry for the next evaluation.
  cached = np.load(evaluation.reference_features_file(config.data, 16, inception_file, 75, 8))
  direct = np.asarray(feature_fn(reals))  # one call of 8 images, not 2 of 4 over 4 devices: float32 round-off
  np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
  cached_fid = np.load(evaluation.reference_features_file(config.data, 16, fid_file, 299, 8))  # FID's own
  np.testing.assert_allclose(cached_fid, np.asarray(fid_fn(reals)), rtol=1e-5, atol=1e-5 * np.abs(cached_fid).max())
  noises = [jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (4, 16, 16, 3)) for i in range(2)]
  want, want_kid_fid = {}, {}
  for steps in (2, 3):
    generated = np.concatenate([sampling.generate(model, variables, noise, normalizer, steps=steps,
                                                  spec=schedules.DiffusionSpec.from_config(config))["images"]
                                for noise in noises])
    want[str(steps)] = metrics.kid(reals, generated, feature_fn, batch_size=4)
    # FID: the FID Inception at 299 px (the standard settings), not KID's network.
    want_fid = metrics.fid_from_features(np.asarray(fid_fn(reals)), np.asarray(fid_fn(generated)))
    assert record["fid"][str(steps)] == pytest.approx(want_fid, rel=1e-4), steps
    want_kid_fid[str(steps)] = metrics.fid_from_features(np.asarray(feature_fn(reals)),
                                                         np.asarray(feature_fn(generated)))
    # The CLI splits each batch over 4 devices, this reference runs on one: float32 round-off in the
    # (random-weight, so huge) Inception features, measured 2.2e-6 relative.
    assert record["kid"][str(steps)] == pytest.approx(want[str(steps)], rel=1e-5, abs=1e-9), steps
  # A step count evaluated twice gives the same value (same noises and real batches every time; the
  # real features read back from the cache). FID at KID's settings is named by them, and shares
  # KID's features.
  again = tmp_path / "again.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2,2", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--fid-weights", inception_file,
                   "--fid-image-size", "75", "--json", str(again)]) == 0
  repeated = json.loads(again.read_text())
  assert repeated["steps"] == [2, 2] and repeated["kid"] == {"2": record["kid"]["2"]}
  assert "fid" not in repeated and repeated["fid_settings"]["name"] == "fid_torchvision_75px"
  assert repeated["fid_torchvision_75px"]["2"] == pytest.approx(want_kid_fid["2"], rel=1e-4)
  assert "fid_torchvision_75px" in capsys.readouterr().out
  # Without the FID weights file (none given, none in the torch hub cache): KID alone, and one line
  # that says where to get the file.
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
  alone = tmp_path / "alone.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--json", str(alone)]) == 0
  kid_alone = json.loads(alone.read_text())
  assert kid_alone["kid"] == {"2": record["kid"]["2"]} and "fid" not in kid_alone and "fid_settings" not in kid_alone
  err = capsys.readouterr().err
  notes = [line for line in err.splitlines() if "FID not computed" in line]
  assert len(notes) == 1 and inception_weights.FID_WEIGHTS_URL in notes[0] and "--fid-weights" in notes[0], err
  # The bundled digits get the digits metric by default (--metric auto); --metric kid asks for KID.
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--inception-weights",
                   str(tmp_path / "none.pth")]) == 2
  assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


def test_reference_features_are_computed_once_then_read_from_the_cache(tmp_path):
  calls = []

  def feature_fn(x):
    calls.append(len(x))
    return x.mean(axis=(1, 2))  # (B, C)

  images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  want = (images[:8].astype(np.float32) / 255.0).mean(axis=(1, 2))  # whole batches of 4: 8 images
  cache = tmp_path / "entry" / "features" / "validation-8.npy"
  first = evaluation.reference_features(images, feature_fn, 4, cache_file=str(cache))
  np.testing.assert_allclose(first, want, rtol=1e-6)
  assert calls == [4, 4] and cache.exists()
  np.testing.assert_array_equal(evaluation.reference_features(images, feature_fn, 4, cache_file=str(cache)), first)
  assert calls == [4, 4]  # read back, not computed
  cache.write_bytes(b"damaged")
  np.testing.assert_array_equal(evaluation.reference_features(images, feature_fn, 4, cache_file=str(cache)), first)
  assert calls == [4, 4, 4, 4] and np.load(cache).shape == (8, 3)  # computed again and rewritten
  (tmp_path / "a_file").write_text("")
  with pytest.warns(UserWarning, match="not cached in"):
    again = evaluation.reference_features(images, feature_fn, 4, cache_file=str(tmp_path / "a_file" / "x.npy"))
  np.testing.assert_array_equal(again, first)
