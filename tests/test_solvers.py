"""DPM-Solver++(2M) and the time grids (issue 33): closed form, the twins, and k-diffusion's solver.

The reference is k-diffusion 0.1.1.post1's ``sample_dpmpp_2m`` (the Makefile installs it with
``--no-deps``: its declared dependencies pull a CUDA torchvision, CLIP, wandb and more that the
sampler never uses). It works on the variance-exploding form of a model: x_ve = x / s with
sigma = n / s and a denoiser D(x_ve, sigma) -> x0; our variance-preserving sampler maps to it
exactly (``k_denoiser``), and its last step, to sigma = 0, returns the last denoised image, which is
our output (the pred_images of the last evaluation).
"""

import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax import errors
from ddim_jax.core import sampling, schedules, solvers
from ddim_jax.interop import parity
from ddim_torch_ref import sampling as torch_sampling
from ddim_torch_ref import solvers as torch_solvers

KDIFFUSION = "k-diffusion==0.1.1.post1"
INSTALL = f"pip install --no-deps '{KDIFFUSION}' (make setup installs it)"
DPMPP = solvers.Sampler("dpmpp_2m")
DPMPP_LOGSNR = solvers.Sampler("dpmpp_2m", "logsnr")
DATA_STD = 0.5  # the Gaussian data of the closed-form model


def load_k_diffusion_sampling():
  """k-diffusion's ``sampling`` module, without its package ``__init__`` and the imports it never uses here.

  ``k_diffusion/__init__`` imports every submodule (models, CLIP evaluation, torchvision augmentation);
  ``sampling.py`` itself imports ``torchdiffeq``, ``torchsde`` (its ODE and SDE samplers) and
  ``k_diffusion.utils`` (torchvision, which cannot load beside the CPU torch: see
  tests/test_fid_standard.py). ``sample_dpmpp_2m`` uses none of them (only torch and tqdm), so they
  are empty modules while ``sampling.py`` runs, and ``sys.modules`` is restored afterwards.

  Raises:
    pytest.fail (not a skip): k-diffusion is not installed, with what to install.
  """
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None or not spec.submodule_search_locations:
    pytest.fail(f"k-diffusion is not installed: {INSTALL}")
  path = spec.submodule_search_locations[0] + "/sampling.py"
  package = types.ModuleType("k_diffusion")
  package.__path__ = list(spec.submodule_search_locations)
  stubs = {"k_diffusion": package, "k_diffusion.utils": types.ModuleType("k_diffusion.utils"),
           "torchdiffeq": types.ModuleType("torchdiffeq"), "torchsde": types.ModuleType("torchsde")}
  stubs["torchdiffeq"].odeint = None
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  try:
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  finally:
    for name, module_before in saved.items():
      if module_before is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module_before
  return module


@pytest.fixture(scope="module")
def k_sampling():
  return load_k_diffusion_sampling()


# ------------------------------------------------------------------------------------------------
# The closed-form model: data N(0, DATA_STD^2) per pixel. Its ideal denoiser is linear,
# x0 = s d^2 / (s^2 d^2 + n^2) x, and the probability-flow ODE keeps x / sqrt(s^2 d^2 + n^2)
# constant: the exact state at every time is known.


def gaussian_noise_prediction(x, variances, xp=jnp):
  """The ideal noise prediction (eps = (x - s x0) / n) for N(0, DATA_STD^2) data, from the variance n^2."""
  noise_rates, signal_rates = xp.sqrt(variances), xp.sqrt(1.0 - variances)
  pred_images = signal_rates * DATA_STD ** 2 / (signal_rates ** 2 * DATA_STD ** 2 + variances) * x
  return (x - signal_rates * pred_images) / noise_rates


def exact_states(initial_noise, times, spec=schedules.DiffusionSpec()):
  """The probability-flow ODE's state at ``times`` (float64), from ``initial_noise`` at t = 1."""
  noise_rates, signal_rates = spec.schedule_fn(np)(np.asarray(times, np.float64))
  (n1,), (s1,) = spec.schedule_fn(np)(np.ones(1))
  scale = np.sqrt(signal_rates ** 2 * DATA_STD ** 2 + noise_rates ** 2) / np.sqrt(s1 ** 2 * DATA_STD ** 2 + n1 ** 2)
  return scale.reshape((-1,) + (1,) * initial_noise.ndim) * initial_noise[None].astype(np.float64)


def noise(shape=(2, 4, 4, 3), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def jax_trajectory(steps, sampler, initial_noise):
  out = sampling.reverse_diffusion(gaussian_noise_prediction, jnp.asarray(initial_noise), steps, sampler=sampler,
                                   return_trajectory=True)
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------


def test_sampler_choices_are_checked_with_the_fix():
  with pytest.raises(errors.ConfigError, match="unknown sampler 'dpm'; choose one of ddim, dpmpp_2m"):
    solvers.Sampler("dpm")
  with pytest.raises(errors.ConfigError, match="unknown time grid 'karras'"):
    solvers.Sampler("ddim", "karras")
  with pytest.raises(errors.ConfigError, match="eta=1 is DDIM's: sampler dpmpp_2m is deterministic"):
    sampling.reverse_diffusion(gaussian_noise_prediction, jnp.zeros((1, 4, 4, 3)), 3, sampler=DPMPP, eta=1.0,
                               key=None, step_noises=jnp.zeros((3, 1, 4, 4, 3)))
  with pytest.raises(errors.ConfigError, match="logsnr time grid needs the cosine schedule"):
    solvers.sampling_times(4, DPMPP_LOGSNR, schedules.DiffusionSpec("linear"))
  with pytest.raises(ValueError, match="deterministic"):
    torch_solvers.Sampler("dpmpp_2m").check(torch_sampling.DEFAULT_SPEC, eta=0.5)


def test_time_grids():
  times, next_times = solvers.sampling_times(4, DPMPP)
  np.testing.assert_array_equal(times, np.float32([1.0, 0.75, 0.5, 0.25]))
  np.testing.assert_array_equal(next_times, np.float32([0.75, 0.5, 0.25, 0.0]))
  spec = schedules.DiffusionSpec()
  exact = solvers.logsnr_times(8, spec)
  assert exact[0] == 1.0 and exact[-1] == 0.0 and np.all(np.diff(exact) < 0)
  lambdas = solvers.half_log_snr(*spec.schedule_fn(np)(exact))
  np.testing.assert_allclose(np.diff(lambdas), (lambdas[-1] - lambdas[0]) / 8, rtol=1e-9)  # uniform in lambda
  times, next_times = solvers.sampling_times(8, DPMPP_LOGSNR)
  np.testing.assert_array_equal(times, exact[:-1].astype(np.float32))
  np.testing.assert_array_equal(next_times, exact[1:].astype(np.float32))
  for steps in (1, 5, 20):  # the twins' grids and coefficients are the same numbers
    for sampler in (DPMPP, DPMPP_LOGSNR):
      twin = torch_solvers.Sampler(sampler.name, sampler.time_grid)
      rates = sampling.step_rates(steps, spec, sampler)
      for ours, theirs in zip(rates, torch_sampling.step_rates(steps, sampler=twin)):
        np.testing.assert_array_equal(ours, theirs)
      for ours, theirs in zip(solvers.dpmpp_2m_coefficients(*rates), torch_solvers.dpmpp_2m_coefficients(*rates)):
        np.testing.assert_array_equal(ours, theirs)


def test_dpmpp_2m_is_ddim_at_first_order_and_exact_for_a_perfect_denoiser():
  x = noise()
  # Two steps: the first and the last are first order, i.e. DDIM (eta 0) on the same grid.
  ddim, dpm = jax_trajectory(2, solvers.DDIM, x), jax_trajectory(2, DPMPP, x)
  np.testing.assert_allclose(dpm["noisy_trajectory"], ddim["noisy_trajectory"], rtol=1e-6, atol=1e-6)
  # A network that knows the clean image: every sampler returns it, on either grid.
  x0 = jnp.full((1, 4, 4, 3), 0.3)

  def perfect(noisy, variances):
    return (noisy - jnp.sqrt(1.0 - variances) * x0) / jnp.sqrt(variances)

  for sampler in (DPMPP, DPMPP_LOGSNR, solvers.Sampler("ddim", "logsnr")):
    out = sampling.reverse_diffusion(perfect, jnp.asarray(noise((1, 4, 4, 3))), 7, sampler=sampler)
    np.testing.assert_allclose(np.asarray(out["pred_images"]), 0.3, atol=1e-6)


@pytest.mark.parametrize("grid", solvers.TIME_GRIDS)
def test_dpmpp_2m_is_second_order_on_the_closed_form_ode(grid):
  """Against the exact ODE solution: halving the step divides DDIM's error by ~2, DPM-Solver++(2M)'s by ~4.

  The error is that of the state before the last step (at t_{S-1}), whose step is first order in both.
  """
  x = noise()
  errors_of = {}
  for name in solvers.SAMPLERS:
    sampler = solvers.Sampler(name, grid)
    errors_of[name] = []
    for steps in (8, 16, 32):
      times, _ = solvers.sampling_times(steps, sampler)
      states = jax_trajectory(steps, sampler, x)["noisy_trajectory"][:-1]
      errors_of[name].append(float(np.max(np.abs(states - exact_states(x, times)))))
  ddim, dpm = np.array(errors_of["ddim"]), np.array(errors_of["dpmpp_2m"])
  assert np.all(dpm < ddim / 2), errors_of
  ddim_order, dpm_order = np.log2(ddim[:-1] / ddim[1:]), np.log2(dpm[:-1] / dpm[1:])
  assert np.all((ddim_order > 0.5) & (ddim_order < 1.3)), errors_of  # first order (before its asymptote)
  assert np.all(dpm_order > 1.7), errors_of


@pytest.mark.parametrize("sampler", [DPMPP, DPMPP_LOGSNR], ids=["uniform", "logsnr"])
def test_the_twins_and_k_diffusions_dpmpp_2m_agree_on_the_closed_form_model(k_sampling, sampler):
  steps, x = 12, noise()
  ours = jax_trajectory(steps, sampler, x)
  twin = torch_sampling.reverse_diffusion(
      lambda y, v: gaussian_noise_prediction(y, v, xp=torch), torch.from_numpy(x).permute(0, 3, 1, 2), steps,
      sampler=torch_solvers.Sampler(sampler.name, sampler.time_grid), return_trajectory=True)
  # x0 = (x - n eps) / s divides float32 rounding by s = 0.02 at t = 1: 50 ulps of the state.
  for key, bound in (("noisy_trajectory", 1e-5), ("pred_trajectory", 1e-4)):
    np.testing.assert_allclose(twin[key].permute(0, 1, 3, 4, 2).numpy(), ours[key], rtol=1e-5, atol=bound)
  rates = sampling.step_rates(steps, sampler=sampler)
  states, denoised, final = run_k_diffusion(k_sampling, rates, x,
                                            lambda y, v: gaussian_noise_prediction(y, v, xp=torch))
  np.testing.assert_allclose(states, ours["noisy_trajectory"][:-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(denoised, ours["pred_trajectory"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(final, ours["pred_images"], rtol=1e-5, atol=1e-4)


def run_k_diffusion(k_sampling, rates, initial_noise, noise_prediction):
  """k-diffusion's ``sample_dpmpp_2m`` on our model and grid: (VP states before each step, denoised, output), NHWC.

  Its sigmas are n_i / s_i of our S evaluation times, then 0. The denoiser maps its x_ve to our
  x = s x_ve and asks ``noise_prediction`` (NCHW torch, given the variance n^2) at the float32 rates
  of that step, looked up by sigma: the network sees exactly what our sampler feeds it.
  """
  noise_rates, signal_rates = rates[0].astype(np.float64), rates[1].astype(np.float64)
  sigmas = torch.tensor(np.append(noise_rates / signal_rates, 0.0), dtype=torch.float32)
  by_sigma = {float(sigma): i for i, sigma in enumerate(sigmas[:-1])}

  def denoiser(x_ve, sigma):
    i = by_sigma[float(sigma[0])]
    n, s = float(rates[0][i]), float(rates[1][i])
    x = s * x_ve
    eps = noise_prediction(x, torch.full((x.shape[0], 1, 1, 1), n * n, dtype=torch.float32))
    return (x - n * eps) / s

  states, denoised = [], []

  def callback(info):
    states.append((info["x"] * float(rates[1][info["i"]])).permute(0, 2, 3, 1).numpy())
    denoised.append(info["denoised"].permute(0, 2, 3, 1).numpy())

  # Our initial state x_1 (variance-preserving) is s_0 x_ve: x_ve = x_1 / s_0.
  x_ve = torch.from_numpy(initial_noise).permute(0, 3, 1, 2) / float(rates[1][0])
  with torch.no_grad():
    final = k_sampling.sample_dpmpp_2m(denoiser, x_ve, sigmas, callback=callback, disable=True)
  return np.stack(states), np.stack(denoised), final.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("sampler", [DPMPP, DPMPP_LOGSNR], ids=["uniform", "logsnr"])
def test_dpmpp_2m_of_a_trained_unet_equals_k_diffusions(k_sampling, trained_model, steps, sampler):
  """The Keras-variant U-Net (briefly trained, 16x16): our JAX sampler against k-diffusion's solver
  driving the torch twin of the same weights; every state within the trajectory bound (1e-4)."""
  model, variables, _ = trained_model("keras")
  twin = parity.torch_twin(model, variables).eval()
  x = noise((4, 16, 16, model.channels), seed=2)
  with parity.precision("highest"):
    ours = {k: np.asarray(v) for k, v in sampling.generate(model, variables, jnp.asarray(x), steps=steps,
                                                           sampler=sampler, return_trajectory=True).items()}
    states, denoised, final = run_k_diffusion(k_sampling, sampling.step_rates(steps, sampler=sampler), x, twin)
  assert np.max(np.abs(ours["noisy_trajectory"])) < 50  # bounded: a denoiser, not a random network
  assert np.max(np.abs(states - ours["noisy_trajectory"][:-1])) <= 1e-4
  assert np.max(np.abs(denoised - ours["pred_trajectory"])) <= 1e-4
  assert np.max(np.abs(final - ours["pred_images"])) <= 1e-4
