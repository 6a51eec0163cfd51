"""DDIM sampling of both twins against the closed-form math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax.core import sampling, schedules, solvers
from ddim_torch_ref import sampling as torch_sampling

RNG = np.random.default_rng(0)


def rates(batch=3):
  """Current and next (noise, signal) rates at random times, next time < current time."""
  t = RNG.uniform(0.2, 1.0, (batch, 1, 1, 1)).astype(np.float32)
  t_next = (t - RNG.uniform(0.05, 0.2, t.shape)).astype(np.float32)
  return (*schedules.rate_table(t), *schedules.rate_table(t_next))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_paper_equations(eta):
  n, s, n2, s2 = (x.astype(np.float64) for x in rates())
  x0 = RNG.standard_normal((3, 4, 4, 2))
  eps = RNG.standard_normal(x0.shape)
  z = RNG.standard_normal(x0.shape)
  # DDIM eq. 12 and 16 with alpha = s^2 (the paper's alpha is DDPM's alpha-bar).
  a, a2 = s ** 2, s2 ** 2
  sigma = eta * np.sqrt((1 - a2) / (1 - a)) * np.sqrt(1 - a / a2)
  expected = np.sqrt(a2) * x0 + np.sqrt(1 - a2 - sigma ** 2) * eps + sigma * z
  args = [x.astype(np.float32) for x in (eps, x0, n, s, n2, s2)]
  got = sampling.ddim_step(*map(jnp.asarray, args), eta=eta, step_noises=jnp.asarray(z, jnp.float32))
  got_t = torch_sampling.ddim_step(*map(torch.from_numpy, args), eta=eta,
                                   step_noises=torch.from_numpy(z.astype(np.float32)))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
  np.testing.assert_allclose(got_t.numpy(), expected, atol=1e-5)


def test_eta_zero_is_the_keras_update_and_eta_one_uses_the_noise():
  n, s, n2, s2 = map(jnp.asarray, rates())
  x0, eps = jnp.ones((3, 4, 4, 2)), jnp.full((3, 4, 4, 2), 0.5)
  keras = s2 * x0 + n2 * eps
  np.testing.assert_array_equal(np.asarray(sampling.ddim_step(eps, x0, n, s, n2, s2, eta=0.0)), np.asarray(keras))
  z1, z2 = jax.random.normal(jax.random.key(1), x0.shape), jax.random.normal(jax.random.key(2), x0.shape)
  a = sampling.ddim_step(eps, x0, n, s, n2, s2, eta=1.0, step_noises=z1)
  b = sampling.ddim_step(eps, x0, n, s, n2, s2, eta=1.0, step_noises=z2)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  with pytest.raises(ValueError, match="step_noises"):
    sampling.ddim_step(eps, x0, n, s, n2, s2, eta=1.0)


def exact_denoiser(x0, channels_last=True):
  """The noise predictor that is exact when the data distribution is the single image x0."""
  def fn(noisy_images, noise_variances):
    n = jnp.sqrt(noise_variances) if channels_last else torch.sqrt(noise_variances)
    s = jnp.sqrt(1 - noise_variances) if channels_last else torch.sqrt(1 - noise_variances)
    return (noisy_images - s * x0) / n
  return fn


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.slow
def test_exact_denoiser_recovers_the_image_in_both_twins(eta):
  x0 = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  noise = RNG.standard_normal(x0.shape).astype(np.float32)
  out = sampling.reverse_diffusion(exact_denoiser(jnp.asarray(x0)), jnp.asarray(noise), 10, eta=eta,
                                   key=jax.random.key(0), return_trajectory=True)
  # Every x0 prediction equals the image (up to float32 rounding amplified by 1/s at t = 1).
  np.testing.assert_allclose(np.asarray(out["pred_trajectory"]), np.broadcast_to(x0, (10,) + x0.shape), atol=2e-4)
  assert out["noisy_trajectory"].shape == (11,) + x0.shape
  x0_t = torch.from_numpy(x0).permute(0, 3, 1, 2)
  ref = torch_sampling.reverse_diffusion(exact_denoiser(x0_t, False), torch.from_numpy(noise).permute(0, 3, 1, 2), 10,
                                         eta=eta, generator=torch.Generator().manual_seed(0))
  np.testing.assert_allclose(ref["pred_images"].permute(0, 2, 3, 1).numpy(), x0, atol=2e-4)


def test_trajectory_shapes_final_state_and_time_grid():
  times, next_times = solvers.sampling_times(4)
  np.testing.assert_allclose(times, [1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose(next_times, [0.75, 0.5, 0.25, 0.0])
  x0 = jnp.full((1, 4, 4, 3), 0.3)
  out = sampling.reverse_diffusion(exact_denoiser(x0), jnp.zeros((1, 4, 4, 3)), 4, return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(out["pred_images"]), np.asarray(out["pred_trajectory"][-1]))
  # The last state is the re-mix at t = 0 of the last evaluation (at t = 1/4): s(0) x0 + n(0) eps.
  (n_last,), (s_last,) = schedules.rate_table(np.full(1, 0.25))
  (n0,), (s0,) = schedules.rate_table(np.zeros(1))
  eps = (np.asarray(out["noisy_trajectory"][-2]) - s_last * 0.3) / n_last
  np.testing.assert_allclose(np.asarray(out["noisy_trajectory"][-1]), s0 * 0.3 + n0 * eps, atol=1e-5)
  with pytest.raises(ValueError, match="steps"):
    solvers.sampling_times(0)


def test_denormalize_inverts_normalize_and_clips():
  normalizer = {"mean": np.array([0.2, 0.5, 0.7], np.float32), "variance": np.array([0.01, 0.04, 0.09], np.float32)}
  images = RNG.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  back = sampling.denormalize(sampling.normalize(jnp.asarray(images), normalizer), normalizer)
  np.testing.assert_allclose(np.asarray(back), images, atol=1e-6)
  assert float(jnp.max(sampling.denormalize(jnp.full((1, 1, 1, 3), 100.0), normalizer))) == 1.0
  back_t = torch_sampling.denormalize(torch_sampling.normalize(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                               normalizer), normalizer)
  np.testing.assert_allclose(back_t.permute(0, 2, 3, 1).numpy(), images, atol=1e-6)


def test_normalize_and_denormalize_closed_forms_in_both_twins():
  # Distinct per-channel statistics (a channel mix-up or a variance used as a std shows), one
  # zero-variance channel (the 1e-7 floor of normalize), images beyond [0, 1] after denormalize.
  mean = np.array([0.2, 0.5, 0.7, 0.4], np.float32)
  variance = np.array([0.01, 0.25, 0.09, 0.0], np.float32)
  normalizer = {"mean": mean, "variance": variance}
  images = RNG.uniform(0, 1, (2, 3, 5, 4)).astype(np.float32)
  z = RNG.normal(0, 3, (2, 3, 5, 4)).astype(np.float32)
  m, v = mean.astype(np.float64), variance.astype(np.float64)
  want_norm = (images - m) / np.maximum(np.sqrt(v), 1e-7)
  want_denorm = np.clip(m + z * np.sqrt(v), 0.0, 1.0)
  assert 0 < (want_denorm == 0).mean() < 0.5 and 0 < (want_denorm == 1).mean() < 0.5  # both clips are hit
  to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # noqa: E731
  got = {
      "jax": (sampling.normalize(jnp.asarray(images), normalizer), sampling.denormalize(jnp.asarray(z), normalizer)),
      "torch": tuple(t.permute(0, 2, 3, 1).numpy() for t in (torch_sampling.normalize(to_nchw(images), normalizer),
                                                               torch_sampling.denormalize(to_nchw(z), normalizer))),
  }
  for twin, (norm, denorm) in got.items():
    np.testing.assert_allclose(np.asarray(norm)[..., :3], want_norm[..., :3], rtol=1e-6, atol=1e-6, err_msg=twin)
    np.testing.assert_allclose(np.asarray(norm)[..., 3], want_norm[..., 3], rtol=1e-6, err_msg=twin)  # / 1e-7
    np.testing.assert_allclose(np.asarray(denorm), want_denorm, rtol=1e-6, atol=1e-6, err_msg=twin)


def test_image_target_round_trip():
  n, s, _, _ = map(jnp.asarray, rates())
  x0, eps = jnp.asarray(RNG.standard_normal((3, 4, 4, 2)), jnp.float32), jnp.asarray(
      RNG.standard_normal((3, 4, 4, 2)), jnp.float32)
  noisy = s * x0 + n * eps
  pred_noises, pred_images = sampling.denoise(x0, noisy, n, s, target="image")
  np.testing.assert_allclose(np.asarray(pred_noises), np.asarray(eps), atol=1e-4)
  with pytest.raises(ValueError, match="target"):
    sampling.denoise(x0, noisy, n, s, target="velocity")
