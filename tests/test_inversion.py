"""DDIM inversion and spherical interpolation (ddim_jax/core/sampling.py and its torch twin).

Analytic models give exact noise predictions: for a one-image data set the reconstruction must be
exact at any step count, for Gaussian data the ODE is non-trivial and the error must fall as the
steps grow. The trained 16x16 fixture checks the same trend on a real network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax import data
from ddim_jax.core import sampling, schedules
from ddim_jax.interop import parity
from ddim_torch_ref import schedules as ref_schedules
from ddim_torch_ref import weight_files as ref_weight_files
from ddim_torch_ref import sampling as ref_sampling

SHAPE = (3, 8, 8, 1)


def _single_image_network(x0):
  """eps(x, v) = (x - sqrt(1 - v) x0) / sqrt(v): the exact noise when the data is the one image x0."""
  return lambda x, v: (x - jnp.sqrt(1.0 - v) * x0) / jnp.sqrt(v)


def _gaussian_network(mean, std):
  """The exact E[eps | x_t] for data x0 ~ N(mean, std^2) per pixel: n (x - s mean) / (s^2 std^2 + n^2)."""
  def fn(x, v):
    n, s = jnp.sqrt(v), jnp.sqrt(1.0 - v)
    return n * (x - s * mean) / (s * s * std * std + v)
  return fn


def _round_trip(network_fn, images, steps):
  noises = sampling.ddim_inversion(network_fn, images, steps)["noises"]
  return noises, sampling.reverse_diffusion(network_fn, noises, steps)["pred_images"]


def test_inversion_rates_mirror_the_sampler():
  noise_rates, signal_rates, next_noise_rates, next_signal_rates = sampling.inversion_rates(4)
  assert (noise_rates[0], signal_rates[0]) == (0.0, 1.0)  # starts from the clean image
  sampler = sampling.step_rates(4)
  # Inversion step j lands where sampler step S-1-j starts: the same float32 rates, reversed.
  np.testing.assert_array_equal(next_noise_rates, sampler[0][::-1])
  np.testing.assert_array_equal(next_signal_rates, sampler[1][::-1])
  np.testing.assert_array_equal(noise_rates[1:], sampler[2][::-1][1:])
  for got, want in zip(sampling.inversion_rates(7, schedules.DiffusionSpec("linear")),
                       ref_sampling.inversion_rates(7, ref_schedules.DiffusionSpec("linear"))):
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_inversion_of_a_single_image_model_is_exact():
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  for steps in (1, 5, 20):
    noises, recon = _round_trip(_single_image_network(x0), x0, steps)
    assert float(jnp.max(jnp.abs(recon - x0))) < 1e-4, steps
    assert bool(jnp.all(jnp.isfinite(noises)))


def _time_only_network(seed, channels_last=True):
  """eps(x, v) = sin(a v + b), a fixed field per pixel that depends on the time only, not on x.

  For such a network DDIM inversion is exact at any step count: inversion step j (t_j -> t_j+1)
  predicts eps at the time of the sampler step it undoes, which the sampler, run from the
  inversion's noise, predicts again. So the sampler must visit the inversion's states in reverse;
  conditioning the inversion on any other time gives other states.
  """
  rng = np.random.default_rng(seed)
  a = rng.uniform(4.0, 9.0, SHAPE).astype(np.float32)
  b = rng.uniform(-3.0, 3.0, SHAPE).astype(np.float32)
  if channels_last:
    return lambda x, v: jnp.sin(a * v + b) + 0.0 * x
  a_t, b_t = (torch.from_numpy(z).permute(0, 3, 1, 2) for z in (a, b))
  return lambda x, v: torch.sin(a_t * v + b_t) + 0.0 * x


@pytest.mark.parametrize("steps,schedule", [(4, "cosine"), (10, "cosine"), (6, "linear")])
@pytest.mark.slow
def test_inversion_visits_the_sampler_states_in_reverse(steps, schedule):
  images = np.random.default_rng(4).normal(size=SHAPE).astype(np.float32)
  network_fn = _time_only_network(5)
  spec = schedules.DiffusionSpec(schedule)
  inv = np.asarray(sampling.ddim_inversion(network_fn, jnp.asarray(images), steps, spec=spec,
                                           return_trajectory=True)["noisy_trajectory"])
  assert inv.shape == (steps + 1,) + SHAPE
  out = sampling.reverse_diffusion(network_fn, jnp.asarray(inv[-1]), steps, spec=spec, return_trajectory=True)
  sampler = np.asarray(out["noisy_trajectory"])
  # Sampler state k (time 1 - k/S, k < S) is inversion state S - k (time (S - k)/S); the sampler's
  # output is the clean start of the inversion. (Its last state is the re-mix at t = 0, no inversion state.)
  np.testing.assert_allclose(sampler[:steps], inv[::-1][:steps], atol=2e-4)
  np.testing.assert_allclose(np.asarray(out["pred_images"]), images, atol=2e-4)
  moved = np.abs(np.diff(inv, axis=0)).mean(axis=(1, 2, 3, 4))
  # Not vacuous: the steps move the state (all of them under cosine; linear's clipped alpha_bar
  # makes its last steps' rates equal).
  assert np.all(moved[:steps // 2] > 0.05), moved

  # The torch twin's inversion visits the same states.
  twin = ref_sampling.ddim_inversion(_time_only_network(5, channels_last=False),
                                     torch.from_numpy(images).permute(0, 3, 1, 2), steps,
                                     spec=ref_schedules.DiffusionSpec(schedule),
                                     return_trajectory=True)["noisy_trajectory"].permute(0, 1, 3, 4, 2).numpy()
  np.testing.assert_allclose(twin, inv, atol=1e-5)


@pytest.mark.slow
def test_inversion_error_of_gaussian_data_falls_with_steps():
  rng = np.random.default_rng(1)
  mean, std = 0.3, 0.5
  images = jnp.asarray(mean + std * rng.normal(size=SHAPE), jnp.float32)
  network_fn = _gaussian_network(mean, std)
  errors = []
  for steps in (2, 5, 10, 20, 50):
    _, recon = _round_trip(network_fn, images, steps)
    errors.append(float(jnp.mean(jnp.square(recon - images))))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.1 * errors[0], errors


@pytest.mark.slow
def test_inversion_of_the_trained_model_improves_with_steps_and_matches_torch(trained_model, trained_weights):
  model, variables, normalizer = trained_model("keras")
  images = data.load_digits_images(16)[:8].astype(np.float32) / 255.0
  errors = {}
  for steps in (10, 50):
    noises = sampling.invert(model, variables, images, normalizer, steps=steps)["noises"]
    recon = sampling.generate(model, variables, noises, normalizer, steps=steps)["images"]
    errors[steps] = float(jnp.mean(jnp.square(recon - images)))
  assert errors[50] < errors[10], errors
  assert errors[50] < 0.02, errors  # a reconstruction, not an unrelated sample (~0.1 apart)

  # The torch twin computes the same latent noise (a float32 bound: full float32 on GPUs/TPUs too).
  torch_model, torch_normalizer, _ = ref_weight_files.load_weights(trained_weights("keras"))
  with parity.precision("highest"):
    want = ref_sampling.invert(torch_model, torch.from_numpy(images).permute(0, 3, 1, 2), torch_normalizer,
                               steps=10)["noises"].permute(0, 2, 3, 1).numpy()
    got = np.asarray(sampling.invert(model, variables, images, normalizer, steps=10)["noises"])
  assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_inversion_rejects_an_image_target():
  with pytest.raises(ValueError, match="noise-predicting"):
    sampling.ddim_inversion(lambda x, v: x, jnp.zeros(SHAPE), 3, spec=schedules.DiffusionSpec(target="image"))


def test_slerp_endpoints_are_exact_and_norm_is_kept():
  rng = np.random.default_rng(2)
  a, b = (rng.standard_normal((16, 16, 3), dtype=np.float32) for _ in range(2))
  weights = np.linspace(0.0, 1.0, 7, dtype=np.float32)
  with parity.precision("highest"):  # the angle's vdot: TF32 on GPUs by default
    frames = np.asarray(sampling.slerp(a, b, weights))
  assert frames.shape == (7, 16, 16, 3)
  np.testing.assert_array_equal(frames[0], a)
  np.testing.assert_array_equal(frames[-1], b)
  # Two independent draws are nearly orthogonal and of equal norm: the arc keeps the norm, the
  # straight line would shrink the middle one by ~sqrt(2).
  norms = np.linalg.norm(frames.reshape(7, -1), axis=1)
  assert np.all(np.abs(norms / np.linalg.norm(a) - 1.0) < 0.05), norms
  twin = ref_sampling.slerp(torch.from_numpy(a), torch.from_numpy(b), weights).numpy()
  np.testing.assert_array_equal(twin[0], a)
  np.testing.assert_array_equal(twin[-1], b)
  np.testing.assert_allclose(twin, frames, atol=1e-5)
  parallel = np.asarray(sampling.slerp(a, 2.0 * a, np.array([0.5], np.float32)))
  np.testing.assert_allclose(parallel[0], 1.5 * a, rtol=1e-5)  # the straight-line fallback, no NaN


@pytest.mark.slow
def test_interpolation_endpoints_are_the_direct_samples(trained_model):
  model, variables, normalizer = trained_model("keras")
  noise = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  # Batches of 5 and 2: on a GPU they may run other convolution algorithms, within float32 rounding
  # only at full precision.
  with parity.precision("highest"):
    frames = sampling.slerp(noise[0], noise[1], np.linspace(0.0, 1.0, 5, dtype=np.float32))
    along = np.asarray(sampling.generate(model, variables, frames, normalizer, steps=5)["images"])
    direct = np.asarray(sampling.generate(model, variables, noise, normalizer, steps=5)["images"])
  np.testing.assert_allclose(along[[0, -1]], direct, atol=1e-5)
  assert np.abs(along[2] - direct[0]).mean() > 1e-3  # the middle frame is neither endpoint
