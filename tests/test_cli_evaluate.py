"""`ddim-jax evaluate --metric kid` on the shared KID run (conftest.py) against the library's KID of the
same samples and real images. (The digits metric's `evaluate`: test_digits_metric.py.)
"""

import json

import jax
import numpy as np
import pytest

from ddim_jax import cli, data
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import evaluation
from ddim_jax.quality import metrics
from cli_helpers import run_model


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
  model, variables, normalizer, config = run_model(kid_run)
  reals = data.load_split(config.data, "validation", 16)[:8].astype(np.float32) / 255.0
  feature_fn = evaluation.kid_feature_fn(inception_file, 75)
  # The real images' features were kept in the data cache entry for the next evaluation.
  cached = np.load(evaluation.reference_features_file(config.data, 16, inception_file, 75, 8))
  direct = np.asarray(feature_fn(reals))  # one call of 8 images, not 2 of 4 over 4 devices: float32 round-off
  np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
  noises = [jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (4, 16, 16, 3)) for i in range(2)]
  want = {}
  for steps in (2, 3):
    generated = np.concatenate([sampling.generate(model, variables, noise, normalizer, steps=steps,
                                                  spec=schedules.DiffusionSpec.from_config(config))["images"]
                                for noise in noises])
    want[str(steps)] = metrics.kid(reals, generated, feature_fn, batch_size=4)
    want_fid = metrics.fid_from_features(np.asarray(feature_fn(reals)), np.asarray(feature_fn(generated)))
    assert record["fid"][str(steps)] == pytest.approx(want_fid, rel=1e-4), steps
    # The CLI splits each batch over 4 devices, this reference runs on one: float32 round-off in the
    # (random-weight, so huge) Inception features, measured 2.2e-6 relative.
    assert record["kid"][str(steps)] == pytest.approx(want[str(steps)], rel=1e-5, abs=1e-9), steps
  # A step count evaluated twice gives the same value (same noises and real batches every time; the
  # real features read back from the cache).
  again = tmp_path / "again.json"
  assert cli.main(["evaluate", "--workdir", kid_run, "--metric", "kid", "--steps", "2,2", "--num-images", "8",
                   "--batch-size", "4", "--inception-weights", inception_file, "--json", str(again)]) == 0
  repeated = json.loads(again.read_text())
  assert repeated["steps"] == [2, 2] and repeated["kid"] == {"2": record["kid"]["2"]}
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
