"""CPU device configuration (ddim_jax/infra/parallel.py): how many JAX devices the CPU backend gets."""

import os
import sys

import pytest

from ddim_jax.infra import parallel
from train_helpers import run, subprocess_env


def test_cpu_device_count_auto_divides_the_batch(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
  assert parallel.cpu_device_count("auto", 8) == 4
  assert parallel.cpu_device_count("auto", 6) == 3  # the largest count <= 4 cores dividing 6
  assert parallel.cpu_device_count("auto", 5) == 1
  assert parallel.cpu_device_count("auto", 2) == 2
  assert parallel.cpu_device_count("auto", 8, num_processes=4) == 2  # this process's share: 2 images
  assert parallel.cpu_device_count("3", 64) == parallel.cpu_device_count(3, 64) == 3
  for bad in ("0", "-1", "two", "1.5", None):
    with pytest.raises(ValueError, match="config.cpu_devices"):
      parallel.cpu_device_count(bad, 8)


@pytest.mark.parametrize("spec", ["auto", "3"])
@pytest.mark.slow
def test_configure_cpu_devices_sets_the_backend_device_count(spec):
  """Without XLA_FLAGS forcing a count, the CPU backend starts with the configured devices."""
  env = subprocess_env(None)
  code = ("import jax; from ddim_jax.infra import parallel; "
          f"n = parallel.configure_cpu_devices({spec!r}, 12); "
          f"print(n, jax.local_device_count(), parallel.cpu_device_count({spec!r}, 12)); "
          "import os; print(os.environ.get('XLA_FLAGS', ''))")
  result = run([sys.executable, "-c", code], env)
  assert result.returncode == 0, result.stderr[-2000:]
  counts, flags = result.stdout.split("\n")[:2]
  configured, devices, expected = map(int, counts.split())
  assert configured == devices == expected
  # With one device per core, XLA's concurrency-oriented scheduler is switched off (it only helps
  # one device spread over many cores).
  assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags) == (devices > 1)
  # XLA_FLAGS takes precedence (the tests' own virtual devices are left alone).
  result = run([sys.executable, "-c", code], subprocess_env(2))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[:2] == ["None", "2"]


# ------------------------------------------------------------------------------------------------
# Inference on every local device: the same numbers as on one.


@pytest.fixture(scope="module")
def small_model():
  import jax
  import numpy as np
  from ddim_jax.core import models
  model = models.create_model("keras", widths=(8, 16), block_depth=1)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 1, 1, 1), np.float32))
  # Non-trivial BatchNorm statistics and weights: the zero-initialised head would output zeros.
  variables = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), variables)
  normalizer = {"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.08, np.float32)}
  return model, variables, normalizer


def _one_device(monkeypatch):
  """Makes every batch-parallel inference call use one device (the reference)."""
  import jax
  monkeypatch.setattr(parallel, "rows_mesh", lambda num_rows, devices=None: parallel.create_mesh(jax.local_devices()[:1]))


@pytest.mark.slow
def test_sampling_kid_and_inversion_on_4_devices_equal_one_device(small_model, monkeypatch):
  """sample (JAX keys, eta 0 and 0.5; NumPy noise with eta 0.5), KID, reconstruction errors and
  inversion rows, batch-split over 4 (and 3) devices, equal the one-device numbers up to float32
  round-off."""
  import jax
  import numpy as np
  from ddim_jax.inference import evaluation, figures, inversion, pipeline
  assert jax.local_device_count() == 4
  model, variables, normalizer = small_model
  assert parallel.rows_mesh(8).size == 4 and parallel.rows_mesh(6).size == 3 and parallel.rows_mesh(7).size == 1
  images = np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)
  numpy_noise = pipeline.numpy_noise(3, (6, 16, 16, 3))
  feature_fn = jax.jit(lambda x: jnp_features(x))

  def compute():
    out = {f"sample_eta{eta}": pipeline.sample_images(model, variables, normalizer, 8, 16, 3, eta, 1, 4)
           for eta in (0.0, 0.5)}  # 2 batches of 4
    out["sample_numpy"] = pipeline.sample_images(model, variables, normalizer, 6, 16, 3, 0.5, 1, 6,
                                                  initial_noise=numpy_noise)  # 1 batch of 6: 3 devices
    out["kid"] = np.asarray(list(evaluation.kid_for_steps(model, variables, normalizer, images, feature_fn, [2, 3],
                                                          batch_size=4).values()))
    out["reconstruction"] = np.asarray(list(inversion.reconstruction_errors(model, variables, normalizer, images,
                                                                            [2], batch_size=8).values()))
    out["inversion"] = np.stack(figures.inversion_rows(model, variables, normalizer, images, [2, 3]))
    return out

  many = compute()
  _one_device(monkeypatch)
  one = compute()
  # Per-example math, but XLA picks convolution loops by batch shape (8 vs 2 per device), and how
  # they round depends on the processor: float32 round-off. Allowed: 64 float32 eps of [0, 1] pixel
  # round-off per network evaluation (measured, native and with XLA capped at AVX2 or SSE4.2: <= 1.3e-6
  # after 3 sampling steps, <= 2.8e-6 over inversion + sampling, i.e. ~3 eps per evaluation), so
  # d(n) = 64 n eps after n evaluations: sampling 3 steps, inversion_rows up to 3 + 3. Errors of the
  # batch split itself (rows of another example, another noise) are of order 0.1 to 1.
  per_evaluation = 64 * float(np.finfo(np.float32).eps)
  mse = float(one["reconstruction"][0])
  d = 2 * 2 * per_evaluation  # reconstruction_errors at 2 steps: 2 inversion + 2 sampling evaluations
  atol = {"sample_eta0.0": 3 * per_evaluation, "sample_eta0.5": 3 * per_evaluation,
          "sample_numpy": 3 * per_evaluation, "inversion": 6 * per_evaluation,
          # |MSE' - MSE| <= 2 sqrt(MSE) d + d^2 (Cauchy-Schwarz) for pixels within d.
          "reconstruction": 2 * np.sqrt(mse) * d + d * d}
  # KID: per batch of 4, float32 means of three 4x4 kernel matrices of values <= 8 (4 * 16 * 8 u =
  # 3e-5 absolute, 1e-4 of these KIDs ~0.3), and the samples' round-off through the stand-in features
  # (measured: KID moves by 0.2x the pixels' change, so 0.2 * 3 * 64 eps = 5e-6): within 1e-4
  # relative (measured: 8e-7).
  rtol = {"kid": 1e-4}
  assert set(atol) | set(rtol) == set(one)
  for name, want in one.items():
    assert np.all(np.isfinite(want)) and (np.ptp(want) > 0 if want.size > 1 else want.item() > 0), name
    np.testing.assert_allclose(many[name], want, rtol=rtol.get(name, 0.0), atol=atol.get(name, 0.0), err_msg=name)


def jnp_features(x):
  """A fixed nonlinear projection of images to 8 features (a stand-in for Inception)."""
  import jax
  import jax.numpy as jnp
  w = jax.random.normal(jax.random.key(7), (x[0].size, 8))
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w / 16.0)
