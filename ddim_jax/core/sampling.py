"""Sampling: DDIM for any eta and DPM-Solver++(2M) (``solvers``), reverse diffusion under one ``jit`` (``lax.scan``).

Notation (Keras names; DDIM paper, Song et al. 2021, with alpha_t = signal_rate^2):

  noisy_images       x_t                     noise_rates        n = sqrt(1 - alpha_t)
  pred_noises        eps_theta(x_t)          signal_rates       s = sqrt(alpha_t)
  pred_images        x0_hat = (x_t - n eps) / s                 next_*  rates at the next time
  sigma              eta * (n'/n) * sqrt(1 - s^2/s'^2)          (eq. 16)
  next noisy image   x' = s' x0_hat + sqrt(n'^2 - sigma^2) eps + sigma z   (eq. 12)

eta = 0 is deterministic DDIM (the Keras sampler), eta = 1 is DDPM-like. ``steps`` counts network
evaluations (Keras semantics: times 1, 1 - 1/S, ..., 1/S; R's ``diffusion_steps`` = S + 1). The
output is the pred_images of the LAST evaluation (the final re-mix at t = 0 is discarded).
``solvers`` holds the other sampler (DPM-Solver++(2M)) and the time grids (uniform in t, or in
log-SNR). Inversion and interpolation are DDIM on the uniform grid. The twin is
``ddim_torch_ref/sampling.py``.
"""

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors
from ddim_jax.core import schedules, solvers

TARGETS = schedules.TARGETS
DEFAULT_SPEC = schedules.DiffusionSpec()


def _channel_stats(normalizer):
  """(mean, variance) of a normaliser, shaped (1, 1, 1, C) for NHWC images."""
  return tuple(jnp.asarray(normalizer[k], jnp.float32).reshape(1, 1, 1, -1) for k in ("mean", "variance"))


def normalize(images, normalizer: Mapping[str, Any]):
  """(x - mean) / max(sqrt(variance), 1e-7), per channel (channels last), as Keras' Normalization."""
  mean, variance = _channel_stats(normalizer)
  return (images - mean) / jnp.maximum(jnp.sqrt(variance), 1e-7)


def denormalize(images, normalizer: Mapping[str, Any]):
  """clip(mean + x * sqrt(variance), 0, 1), per channel (channels last)."""
  mean, variance = _channel_stats(normalizer)
  return jnp.clip(mean + images * jnp.sqrt(variance), 0.0, 1.0)


def network_variances(noise_rates, signal_rates, target: str = "noise"):
  """What the network is conditioned on: n^2 for a noise target, s^2 for R's image target."""
  return jnp.square(noise_rates) if target == "noise" else jnp.square(signal_rates)


def denoise(network_output, noisy_images, noise_rates, signal_rates, target: str = "noise"):
  """Splits ``noisy_images`` into (pred_noises, pred_images) given the network's prediction."""
  if target == "noise":
    pred_noises = network_output
    pred_images = (noisy_images - noise_rates * pred_noises) / signal_rates
  elif target == "image":
    pred_images = network_output
    pred_noises = (noisy_images - signal_rates * pred_images) / noise_rates
  else:
    raise errors.ConfigError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
  return pred_noises, pred_images


def ddim_sigmas(noise_rates, signal_rates, next_noise_rates, next_signal_rates, eta: float):
  """sigma_t(eta) of DDIM eq. 16 in rate form: eta * (n'/n) * sqrt(1 - s^2/s'^2)."""
  ratio = jnp.square(signal_rates / next_signal_rates)
  return eta * (next_noise_rates / noise_rates) * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0))


def ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates, next_signal_rates,
              eta: float = 0.0, step_noises=None):
  """One DDIM update (eq. 12): x' = s' x0_hat + sqrt(n'^2 - sigma^2) eps_hat + sigma z.

  Args:
    pred_noises, pred_images: (B, H, W, C) predictions at the current time.
    noise_rates, signal_rates: (B, 1, 1, 1) rates at the current time.
    next_noise_rates, next_signal_rates: (B, 1, 1, 1) rates at the next (smaller) time.
    eta: a Python float; 0 is deterministic DDIM (exactly the Keras update), 1 is DDPM-like.
    step_noises: (B, H, W, C) standard normal draws z; required when eta > 0.

  Returns:
    The next noisy images, (B, H, W, C).
  """
  if eta == 0.0:
    return next_signal_rates * pred_images + next_noise_rates * pred_noises
  if step_noises is None:
    raise ValueError("ddim_step with eta > 0 needs step_noises (standard normal draws)")
  sigmas = ddim_sigmas(noise_rates, signal_rates, next_noise_rates, next_signal_rates, eta)
  direction = jnp.sqrt(jnp.maximum(jnp.square(next_noise_rates) - jnp.square(sigmas), 0.0))
  return next_signal_rates * pred_images + direction * pred_noises + sigmas * step_noises


def step_rates(steps: int, spec: schedules.DiffusionSpec = DEFAULT_SPEC,
               sampler: solvers.Sampler = solvers.DDIM) -> tuple[np.ndarray, ...]:
  """(noise_rates, signal_rates, next_noise_rates, next_signal_rates), each (S,) float32, of the S steps.

  At the times of ``sampler``'s grid (``solvers.sampling_times``), evaluated by
  ``schedules.rate_table`` in float64 NumPy: both twins use bit-identical rates.
  """
  times, next_times = solvers.sampling_times(steps, sampler, spec)
  return (*spec.rate_table(times), *spec.rate_table(next_times))


def dpmpp_2m_step(noisy_images, pred_images, previous_pred_images, a, b, c, d):
  """One DPM-Solver++(2M) update, x' = a x + b (c x0 + d x0_prev) (``solvers.dpmpp_2m_coefficients``)."""
  return a * noisy_images + b * (c * pred_images + d * previous_pred_images)


def reverse_diffusion(network_fn: Callable, initial_noise, steps: int, *,
                      spec: schedules.DiffusionSpec = DEFAULT_SPEC, eta: float = 0.0, step_noises=None, key=None,
                      return_trajectory: bool = False, sampler: solvers.Sampler = solvers.DDIM):
  """Runs ``steps`` steps of ``sampler`` (DDIM by default) from ``initial_noise`` (t = 1) with ``lax.scan``.

  Call it inside ``jit`` (``generate`` does). Random draws for eta > 0 come from ``step_noises``
  if given (parity tests feed the same NumPy draws to both twins), otherwise from ``key``.

  Args:
    network_fn: (noisy_images, variances) -> network output.
    initial_noise: (B, H, W, C) standard normal.
    steps: number of network evaluations S.
    spec: the diffusion (schedule, signal-rate bounds, prediction target: 'noise' (Keras) or 'image').
    eta: DDIM eta (a Python float); other samplers are deterministic (eta 0).
    step_noises: optional (S, B, H, W, C) draws z for eta > 0.
    key: PRNG key used when eta > 0 and step_noises is None.
    return_trajectory: also return every noisy image and every predicted image.
    sampler: ``solvers.Sampler`` (DDIM or DPM-Solver++(2M), uniform or log-SNR time grid).

  Returns:
    dict with 'pred_images' (B, H, W, C) of the last evaluation (normalised space) and, if asked,
    'noisy_trajectory' (S + 1, B, H, W, C: the initial noise, then the state after each step) and
    'pred_trajectory' (S, B, H, W, C).
  """
  if eta < 0:
    raise errors.ConfigError(f"eta must be >= 0, got {eta}")
  if eta > 0 and step_noises is None and key is None:
    raise ValueError("eta > 0 needs step_noises or a PRNG key")
  sampler.check(spec, eta)
  batch = initial_noise.shape[0]
  if eta > 0 and step_noises is None:
    step_noises = jax.random.normal(key, (steps,) + initial_noise.shape, initial_noise.dtype)
  rate_values = step_rates(steps, spec, sampler)
  rates = tuple(jnp.asarray(r) for r in rate_values)
  # DPM-Solver++(2M)'s (a, b, c, d) per step; DDIM needs none (zeros keep one scan signature).
  coefficients = (tuple(jnp.asarray(v) for v in solvers.dpmpp_2m_coefficients(*rate_values))
                  if sampler.name == "dpmpp_2m" else jnp.zeros((steps,)))
  xs = (rates, step_noises if eta > 0 else jnp.zeros((steps,)), coefficients)
  target = spec.target

  def body(carry, x):
    noisy_images, previous_pred_images = carry
    step_rate_values, z, step_coefficients = x
    noise_rates, signal_rates, next_noise_rates, next_signal_rates = (
        jnp.full((batch, 1, 1, 1), r, jnp.float32) for r in step_rate_values)
    output = network_fn(noisy_images, network_variances(noise_rates, signal_rates, target))
    pred_noises, pred_images = denoise(output, noisy_images, noise_rates, signal_rates, target)
    if sampler.name == "dpmpp_2m":
      next_noisy_images = dpmpp_2m_step(noisy_images, pred_images, previous_pred_images, *step_coefficients)
    else:
      next_noisy_images = ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates,
                                    next_signal_rates, eta, z if eta > 0 else None)
    trajectory = (next_noisy_images, pred_images) if return_trajectory else None
    return (next_noisy_images, pred_images), trajectory

  (_, pred_images), trajectory = jax.lax.scan(body, (initial_noise, jnp.zeros_like(initial_noise)), xs)
  out = {"pred_images": pred_images}
  if return_trajectory:
    noisy_trajectory, pred_trajectory = trajectory
    out["noisy_trajectory"] = jnp.concatenate([initial_noise[None], noisy_trajectory], axis=0)
    out["pred_trajectory"] = pred_trajectory
  return out


@functools.partial(jax.jit, static_argnames=("model", "steps", "spec", "eta", "return_trajectory", "sampler"))
def generate(model, variables, initial_noise, normalizer=None, step_noises=None, key=None, *, steps: int = 20,
             spec: schedules.DiffusionSpec = DEFAULT_SPEC, eta: float = 0.0, return_trajectory: bool = False,
             sampler: solvers.Sampler = solvers.DDIM):
  """Samples images with a ddim_jax UNet (BatchNorm in inference mode), all under one jit.

  Args:
    model: the UNet (static).
    variables: its {'params', 'batch_stats'} (usually the EMA ones).
    initial_noise: (B, H, W, C) standard normal.
    normalizer: {'mean', 'variance'}; when given, 'images' holds denormalised, clipped images.
    step_noises, key, steps, spec, eta, return_trajectory, sampler: see ``reverse_diffusion``.

  Returns:
    ``reverse_diffusion``'s dict, plus 'images' in [0, 1] when ``normalizer`` is given.
  """
  network_fn = lambda x, v: model.apply(variables, x, v, train=False)
  out = reverse_diffusion(network_fn, initial_noise, steps, spec=spec, eta=eta, step_noises=step_noises, key=key,
                          return_trajectory=return_trajectory, sampler=sampler)
  if normalizer is not None:
    out["images"] = denormalize(out["pred_images"], normalizer)
  return out


# ------------------------------------------------------------------------------------------------
# DDIM inversion (image -> noise) and spherical interpolation of noises.


def inversion_rates(steps: int, spec: schedules.DiffusionSpec = DEFAULT_SPEC) -> tuple[np.ndarray, ...]:
  """(noise_rates, signal_rates, next_noise_rates, next_signal_rates), each (S,) float32, of S inversion steps.

  The inversion retraces the sampler's S steps backwards. The sampler's last step maps the state
  at t = 1/S to its output pred_images, i.e. to the clean rates (n, s) = (0, 1); so the inversion
  starts from the clean image at (0, 1) and visits t = 1/S, 2/S, ..., 1: its step j goes from
  time j/S (clean for j = 0) to (j + 1)/S. Evaluated in float64 NumPy like ``step_rates``.
  """
  if steps < 1:
    raise errors.ConfigError(f"steps must be >= 1 (network evaluations), got {steps}")
  next_times = ((np.arange(steps, dtype=np.float64) + 1) / steps).astype(np.float32)
  next_noise_rates, next_signal_rates = spec.rate_table(next_times)
  noise_rates = np.concatenate([[0.0], next_noise_rates[:-1]]).astype(np.float32)
  signal_rates = np.concatenate([[1.0], next_signal_rates[:-1]]).astype(np.float32)
  return noise_rates, signal_rates, next_noise_rates, next_signal_rates


def ddim_inversion(network_fn: Callable, images, steps: int, *, spec: schedules.DiffusionSpec = DEFAULT_SPEC,
                   return_trajectory: bool = False):
  """Encodes normalised images into initial noises with the deterministic DDIM ODE run backwards.

  Step j goes from the state x at time t_j to t_{j+1} > t_j (rates from ``inversion_rates``):
  eps = net(x, n_{j+1}^2), x0 = (x - n_j eps) / s_j, x' = s_{j+1} x0 + n_{j+1} eps. This is the
  sampler's step from t_{j+1} to t_j solved for its input, with the one approximation of DDIM
  inversion: the noise is predicted from the known x_{t_j} instead of the unknown x_{t_{j+1}}
  (the network is conditioned on t_{j+1}, the time of the sampler step it undoes; as diffusers'
  ``DDIMInverseScheduler``). Feeding the result to ``reverse_diffusion`` with the same ``steps``
  reconstructs the images; the error falls as the steps grow (DDIM paper, Table 2).

  Args:
    network_fn: (noisy_images, variances) -> network output.
    images: (B, H, W, C) clean images in normalised space.
    steps: number of network evaluations S (use the same S to reconstruct).
    spec: the diffusion; its target must be 'noise': an image-predicting network gives no noise at
      the clean start (n = 0).
    return_trajectory: also return every state.

  Returns:
    dict with 'noises' (B, H, W, C), the state at t = 1, and, if asked, 'noisy_trajectory'
    (S + 1, B, H, W, C): the images, then the state after each step.
  """
  target = spec.target
  if target != "noise":
    raise errors.ConfigError(f"DDIM inversion needs a noise-predicting model (target 'noise'), got target {target!r}")
  batch = images.shape[0]
  rates = tuple(jnp.asarray(r) for r in inversion_rates(steps, spec))

  def body(noisy_images, step_rate_values):
    noise_rates, signal_rates, next_noise_rates, next_signal_rates = (
        jnp.full((batch, 1, 1, 1), r, jnp.float32) for r in step_rate_values)
    pred_noises = network_fn(noisy_images, network_variances(next_noise_rates, next_signal_rates, target))
    pred_images = (noisy_images - noise_rates * pred_noises) / signal_rates
    next_noisy_images = ddim_step(pred_noises, pred_images, noise_rates, signal_rates, next_noise_rates,
                                  next_signal_rates, 0.0)
    return next_noisy_images, next_noisy_images if return_trajectory else None

  noises, trajectory = jax.lax.scan(body, images, rates)
  out = {"noises": noises}
  if return_trajectory:
    out["noisy_trajectory"] = jnp.concatenate([images[None], trajectory], axis=0)
  return out


@functools.partial(jax.jit, static_argnames=("model", "steps", "spec", "return_trajectory"))
def invert(model, variables, images, normalizer=None, *, steps: int = 20, spec: schedules.DiffusionSpec = DEFAULT_SPEC,
           return_trajectory: bool = False):
  """``ddim_inversion`` with a ddim_jax UNet (BatchNorm in inference mode), under one jit.

  Args:
    model, variables: the UNet (static) and its {'params', 'batch_stats'}.
    images: (B, H, W, C); in [0, 1] when ``normalizer`` is given (normalised here), else normalised.
    normalizer: {'mean', 'variance'} or None.
    steps, spec, return_trajectory: see ``ddim_inversion``.

  Returns:
    ``ddim_inversion``'s dict.
  """
  if normalizer is not None:
    images = normalize(images, normalizer)
  network_fn = lambda x, v: model.apply(variables, x, v, train=False)
  return ddim_inversion(network_fn, images, steps, spec=spec, return_trajectory=return_trajectory)


@jax.jit
def slerp(start, end, weights):
  """Spherical interpolation between two noises (each flattened to one vector), Keras-example style.

  slerp(w) = sin((1 - w) theta) / sin(theta) start + sin(w theta) / sin(theta) end, theta the angle
  between them, so the norm stays that of a Gaussian draw (a straight line would shrink it
  towards the middle). Weights 0 and 1 return ``start`` and ``end`` exactly (selected, not
  computed), and nearly parallel inputs fall back to the straight line.

  Args:
    start, end: arrays of the same shape (e.g. (H, W, C) initial noises).
    weights: (K,) interpolation weights in [0, 1].

  Returns:
    (K, *start.shape) interpolated noises.
  """
  start, end = jnp.asarray(start, jnp.float32), jnp.asarray(end, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * start.ndim)
  cosine = jnp.vdot(start, end) / (jnp.linalg.norm(start) * jnp.linalg.norm(end))
  theta = jnp.arccos(jnp.clip(cosine, -1.0, 1.0))
  sin_theta = jnp.sin(theta)
  parallel = sin_theta < 1e-6
  safe_sin = jnp.where(parallel, 1.0, sin_theta)
  start_weights = jnp.where(parallel, 1.0 - weights, jnp.sin((1.0 - weights) * theta) / safe_sin)
  end_weights = jnp.where(parallel, weights, jnp.sin(weights * theta) / safe_sin)
  mixed = start_weights * start[None] + end_weights * end[None]
  return jnp.where(weights == 0.0, start[None], jnp.where(weights == 1.0, end[None], mixed))
