"""DDIM and DPM-Solver++(2M) sampling in PyTorch, the twin of ``ddim_jax/core/sampling.py`` (same names,
same formulas, NCHW).

See the JAX module for the notation block. Random draws are passed in (``step_noises``) or come
from an explicit ``torch.Generator``; nothing here touches the global RNG.
"""

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ddim_torch_ref import schedules, solvers

TARGETS = schedules.TARGETS
DEFAULT_SPEC = schedules.DiffusionSpec()


def _channel(value, like):
  return torch.as_tensor(np.asarray(value, np.float32), device=like.device).reshape(1, -1, 1, 1)


def normalize(images, normalizer: Mapping[str, Any]):
  """(x - mean) / max(sqrt(variance), 1e-7), per channel (NCHW)."""
  mean = _channel(normalizer["mean"], images)
  std = torch.clamp(torch.sqrt(_channel(normalizer["variance"], images)), min=1e-7)
  return (images - mean) / std


def denormalize(images, normalizer: Mapping[str, Any]):
  """clip(mean + x * sqrt(variance), 0, 1), per channel (NCHW)."""
  mean = _channel(normalizer["mean"], images)
  std = torch.sqrt(_channel(normalizer["variance"], images))
  return torch.clamp(mean + images * std, 0.0, 1.0)


def network_variances(noise_rates, signal_rates, target="noise"):
  """n^2 for a noise target, s^2 for R's image target."""
  return torch.square(noise_rates) if target == "noise" else torch.square(signal_rates)


def denoise(network_output, noisy_images, noise_rates, signal_rates, target="noise"):
  """Splits ``noisy_images`` into (pred_noises, pred_images) given the network's prediction."""
  if target == "noise":
    pred_noises = network_output
    pred_images = (noisy_images - noise_rates * pred_noises) / signal_rates
  elif target == "image":
    pred_images = network_output
    pred_noises = (noisy_images - signal_rates * pred_images) / noise_rates
  else:
    raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
  return pred_noises, pred_images


def ddim_sigmas(noise_rates, signal_rates, next_noise_rates, next_signal_rates, eta: float):
  """sigma_t(eta) of DDIM eq. 16 in rate form: eta * (n'/n) * sqrt(1 - s^2/s'^2)."""
  ratio = torch.square(signal_rates / next_signal_rates)
  return eta * (next_noise_rates / noise_rates) * torch.sqrt(torch.clamp(1.0 - ratio, min=0.0))


def ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates, next_signal_rates,
              eta: float = 0.0, step_noises=None):
  """One DDIM update (eq. 12): x' = s' x0_hat + sqrt(n'^2 - sigma^2) eps_hat + sigma z."""
  if eta == 0.0:
    return next_signal_rates * pred_images + next_noise_rates * pred_noises
  if step_noises is None:
    raise ValueError("ddim_step with eta > 0 needs step_noises (standard normal draws)")
  sigmas = ddim_sigmas(noise_rates, signal_rates, next_noise_rates, next_signal_rates, eta)
  direction = torch.sqrt(torch.clamp(torch.square(next_noise_rates) - torch.square(sigmas), min=0.0))
  return next_signal_rates * pred_images + direction * pred_noises + sigmas * step_noises


def step_rates(steps, spec=DEFAULT_SPEC, sampler=solvers.DDIM):
  """(noise_rates, signal_rates, next_noise_rates, next_signal_rates), each (S,) float32, at ``sampler``'s times."""
  times, next_times = solvers.sampling_times(steps, sampler, spec)
  return (*spec.rate_table(times), *spec.rate_table(next_times))


def dpmpp_2m_step(noisy_images, pred_images, previous_pred_images, a, b, c, d):
  """One DPM-Solver++(2M) update, x' = a x + b (c x0 + d x0_prev) (``solvers.dpmpp_2m_coefficients``)."""
  return a * noisy_images + b * (c * pred_images + d * previous_pred_images)


@torch.no_grad()
def reverse_diffusion(network_fn: Callable, initial_noise, steps: int, *, spec=DEFAULT_SPEC, eta=0.0,
                      step_noises=None, generator=None, return_trajectory=False, sampler=solvers.DDIM):
  """Runs ``steps`` steps of ``sampler`` (DDIM by default) from ``initial_noise`` (t = 1); see the JAX twin.

  ``step_noises`` is (S, B, C, H, W); without it, eta > 0 draws from ``generator``.
  Returns the same dict as the JAX twin (NCHW arrays).
  """
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  if eta > 0 and step_noises is None and generator is None:
    raise ValueError("eta > 0 needs step_noises or a torch.Generator")
  sampler.check(spec, eta)
  batch = initial_noise.shape[0]
  rates = step_rates(steps, spec, sampler)
  coefficients = solvers.dpmpp_2m_coefficients(*rates) if sampler.name == "dpmpp_2m" else None
  target = spec.target
  noisy_images, pred_images = initial_noise, torch.zeros_like(initial_noise)
  noisy_trajectory, pred_trajectory = [initial_noise], []

  def full(value):
    return torch.full((batch, 1, 1, 1), float(value), dtype=torch.float32, device=initial_noise.device)

  for i in range(steps):
    noise_rates, signal_rates, next_noise_rates, next_signal_rates = (full(r[i]) for r in rates)
    output = network_fn(noisy_images, network_variances(noise_rates, signal_rates, target))
    previous_pred_images = pred_images
    pred_noises, pred_images = denoise(output, noisy_images, noise_rates, signal_rates, target)
    if coefficients is not None:
      noisy_images = dpmpp_2m_step(noisy_images, pred_images, previous_pred_images,
                                   *(full(v[i]) for v in coefficients))
    else:
      z = None
      if eta > 0:
        z = step_noises[i] if step_noises is not None else torch.randn(
            initial_noise.shape, generator=generator, device=initial_noise.device)
      noisy_images = ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates,
                               next_signal_rates, eta, z)
    if return_trajectory:
      noisy_trajectory.append(noisy_images)
      pred_trajectory.append(pred_images)
  out = {"pred_images": pred_images}
  if return_trajectory:
    out["noisy_trajectory"] = torch.stack(noisy_trajectory)
    out["pred_trajectory"] = torch.stack(pred_trajectory)
  return out


@torch.no_grad()
def generate(model, initial_noise, normalizer=None, step_noises=None, generator=None, *, steps=20, spec=DEFAULT_SPEC,
             eta=0.0, return_trajectory=False, sampler=solvers.DDIM):
  """Samples with a ``ddim_torch_ref`` UNet in eval mode; the twin of ``ddim_jax.core.sampling.generate``."""
  was_training = model.training
  model.eval()
  try:
    out = reverse_diffusion(model, initial_noise, steps, spec=spec, eta=eta, step_noises=step_noises,
                            generator=generator, return_trajectory=return_trajectory, sampler=sampler)
  finally:
    model.train(was_training)
  if normalizer is not None:
    out["images"] = denormalize(out["pred_images"], normalizer)
  return out


# ------------------------------------------------------------------------------------------------
# DDIM inversion (image -> noise) and spherical interpolation of noises.


def inversion_rates(steps, spec=DEFAULT_SPEC):
  """(noise_rates, signal_rates, next_noise_rates, next_signal_rates) of S inversion steps; see the JAX twin.

  Step j goes from time j/S (the clean rates (0, 1) for j = 0) to (j + 1)/S, float64-evaluated.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1 (network evaluations), got {steps}")
  next_times = ((np.arange(steps, dtype=np.float64) + 1) / steps).astype(np.float32)
  next_noise_rates, next_signal_rates = spec.rate_table(next_times)
  noise_rates = np.concatenate([[0.0], next_noise_rates[:-1]]).astype(np.float32)
  signal_rates = np.concatenate([[1.0], next_signal_rates[:-1]]).astype(np.float32)
  return noise_rates, signal_rates, next_noise_rates, next_signal_rates


@torch.no_grad()
def ddim_inversion(network_fn: Callable, images, steps: int, *, spec=DEFAULT_SPEC, return_trajectory=False):
  """Normalised images (NCHW) -> initial noises by the DDIM ODE run backwards; see the JAX twin.

  Step j: eps = net(x, n_{j+1}^2), x0 = (x - n_j eps) / s_j, x' = s_{j+1} x0 + n_{j+1} eps.
  """
  target = spec.target
  if target != "noise":
    raise ValueError(f"DDIM inversion needs a noise-predicting model (target 'noise'), got target {target!r}")
  batch = images.shape[0]
  rates = inversion_rates(steps, spec)

  def full(value):
    return torch.full((batch, 1, 1, 1), float(value), dtype=torch.float32, device=images.device)

  noisy_images, trajectory = images, [images]
  for i in range(steps):
    noise_rates, signal_rates, next_noise_rates, next_signal_rates = (full(r[i]) for r in rates)
    pred_noises = network_fn(noisy_images, network_variances(next_noise_rates, next_signal_rates, target))
    pred_images = (noisy_images - noise_rates * pred_noises) / signal_rates
    noisy_images = ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates,
                             next_signal_rates, 0.0)
    trajectory.append(noisy_images)
  out = {"noises": noisy_images}
  if return_trajectory:
    out["noisy_trajectory"] = torch.stack(trajectory)
  return out


@torch.no_grad()
def invert(model, images, normalizer=None, *, steps=20, spec=DEFAULT_SPEC, return_trajectory=False):
  """``ddim_inversion`` with a ``ddim_torch_ref`` UNet in eval mode; the twin of ``ddim_jax.core.sampling.invert``."""
  was_training = model.training
  model.eval()
  try:
    if normalizer is not None:
      images = normalize(images, normalizer)
    return ddim_inversion(model, images, steps, spec=spec, return_trajectory=return_trajectory)
  finally:
    model.train(was_training)


def slerp(start, end, weights):
  """Spherical interpolation between two noises; weights 0 and 1 return the inputs exactly (see the JAX twin).

  Args:
    start, end: tensors of the same shape.
    weights: (K,) weights in [0, 1] (a sequence or tensor).

  Returns:
    (K, *start.shape) tensor.
  """
  start, end = start.float(), end.float()
  weights = torch.as_tensor(weights, dtype=torch.float32, device=start.device).reshape((-1,) + (1,) * start.ndim)
  cosine = torch.sum(start * end) / (torch.linalg.norm(start) * torch.linalg.norm(end))
  theta = torch.arccos(torch.clamp(cosine, -1.0, 1.0))
  sin_theta = torch.sin(theta)
  parallel = sin_theta < 1e-6
  safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
  start_weights = torch.where(parallel, 1.0 - weights, torch.sin((1.0 - weights) * theta) / safe_sin)
  end_weights = torch.where(parallel, weights, torch.sin(weights * theta) / safe_sin)
  mixed = start_weights * start[None] + end_weights * end[None]
  return torch.where(weights == 0.0, start[None], torch.where(weights == 1.0, end[None], mixed))
