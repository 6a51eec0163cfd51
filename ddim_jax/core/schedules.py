"""Diffusion schedules: pure functions ``diffusion_times -> (noise_rates, signal_rates)``.

Notation (Keras example): ``signal_rates`` s(t) = sqrt(alpha_bar), ``noise_rates`` n(t) =
sqrt(1 - alpha_bar); a noisy image is ``s * images + n * noises``. Times run from 0 (clean) to
1 (noise). Every function here has a line-for-line twin in ``ddim_torch_ref/schedules.py``; the
constants are formed once in float64 NumPy so that both twins see the same float32 numbers.
"""

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ddim_jax import errors

MIN_SIGNAL_RATE = 0.02
MAX_SIGNAL_RATE = 0.95
SCHEDULES = ("cosine", "linear")
TARGETS = ("noise", "image")  # what the network predicts: the noise (Keras) or the clean image (R option)


def offset_cosine_schedule(diffusion_times, min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE,
                           xp=jnp):
  """The Keras offset cosine schedule.

  angle(t) = acos(max_signal_rate) + t * (acos(min_signal_rate) - acos(max_signal_rate)),
  signal = cos(angle), noise = sin(angle); so s(0) = max_signal_rate, s(1) = min_signal_rate and
  s^2 + n^2 = 1.

  Args:
    diffusion_times: float array of times in [0, 1], any shape (usually (B, 1, 1, 1)).
    min_signal_rate: signal rate at t = 1.
    max_signal_rate: signal rate at t = 0.
    xp: the array module, ``jax.numpy`` or ``numpy`` (``rate_table`` evaluates in float64 NumPy).

  Returns:
    (noise_rates, signal_rates), each shaped like ``diffusion_times``.
  """
  start_angle = math.acos(max_signal_rate)
  end_angle = math.acos(min_signal_rate)
  diffusion_angles = start_angle + diffusion_times * (end_angle - start_angle)
  return xp.sin(diffusion_angles), xp.cos(diffusion_angles)


def linear_rate_tables(min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, num_timesteps=1000):
  """Signal and noise rates of the R ``linear`` (DDPM) schedule at its 1000 discrete times.

  beta = linspace(1e-4, 0.02, 1000) (float32, as R's torch_linspace), alpha_bar = cumprod(1 -
  beta), and, as in R, alpha_bar itself (not the rate) is clipped to [min, max]_signal_rate.

  Returns:
    (noise_rate_table, signal_rate_table): float32 NumPy arrays of length ``num_timesteps``.
  """
  betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float32).astype(np.float64)
  alpha_bars = np.clip(np.cumprod(1.0 - betas), min_signal_rate, max_signal_rate)
  return np.sqrt(1.0 - alpha_bars).astype(np.float32), np.sqrt(alpha_bars).astype(np.float32)


def linear_schedule(diffusion_times, min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, xp=jnp):
  """The R ``linear`` schedule: a table lookup at index floor(t * 999).

  Args:
    diffusion_times: float array of times in [0, 1], any shape.

  Returns:
    (noise_rates, signal_rates), each shaped like ``diffusion_times``.
  """
  noise_table, signal_table = linear_rate_tables(min_signal_rate, max_signal_rate)
  num_timesteps = noise_table.shape[0]
  indices = xp.clip(xp.floor(diffusion_times * (num_timesteps - 1)).astype(xp.int32), 0, num_timesteps - 1)
  return xp.asarray(noise_table)[indices], xp.asarray(signal_table)[indices]


def get_schedule(name="cosine", min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, xp=jnp):
  """Returns the schedule ``diffusion_times -> (noise_rates, signal_rates)`` called ``name``."""
  if not 0.0 < min_signal_rate < max_signal_rate < 1.0:
    raise errors.ConfigError(
        f"signal rates must satisfy 0 < min_signal_rate < max_signal_rate < 1, got min={min_signal_rate}, "
        f"max={max_signal_rate}")
  if name == "cosine":
    fn = offset_cosine_schedule
  elif name == "linear":
    fn = linear_schedule
  else:
    raise errors.ConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
  return lambda diffusion_times: fn(diffusion_times, min_signal_rate, max_signal_rate, xp=xp)


def rate_table(diffusion_times, name="cosine", min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE):
  """(noise_rates, signal_rates) at known times, evaluated in float64 NumPy and rounded to float32.

  The sampler's times are fixed in advance, so both twins take their rates from this same table:
  bit-identical rates matter because the embedding multiplies the noise variance by up to
  2*pi*1000, so a 1-ulp difference between two frameworks' sin/cos moves the embedding by ~4e-4.
  """
  schedule_fn = get_schedule(name, min_signal_rate, max_signal_rate, xp=np)
  noise_rates, signal_rates = schedule_fn(np.asarray(diffusion_times, np.float64))
  return np.asarray(noise_rates, np.float32), np.asarray(signal_rates, np.float32)


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """The diffusion a model was trained with: schedule, signal-rate bounds and prediction target.

  Frozen and hashable: one static argument of the jitted samplers. Training reads it from
  ``config.diffusion``, the samplers from a weight file's metadata; the torch twin has the same
  class in ``ddim_torch_ref/schedules.py``.
  """
  schedule: str = "cosine"
  min_signal_rate: float = MIN_SIGNAL_RATE
  max_signal_rate: float = MAX_SIGNAL_RATE
  target: str = "noise"

  def __post_init__(self):
    get_schedule(self.schedule, self.min_signal_rate, self.max_signal_rate)  # validates both
    if self.target not in TARGETS:
      raise errors.ConfigError(f"unknown prediction target {self.target!r}; choose one of {TARGETS}")

  @classmethod
  def from_config(cls, config) -> "DiffusionSpec":
    """From a config's ``diffusion`` block (schedule, min_signal_rate, max_signal_rate, target)."""
    d = config.diffusion
    return cls(str(d.schedule), float(d.min_signal_rate), float(d.max_signal_rate), str(d.target))

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> "DiffusionSpec":
    """From a weight file's metadata (the Keras defaults for keys it does not hold).

    Raises:
      errors.InputError: a value that is not a finite number, an unknown schedule or target, or rates
        outside 0 < min_signal_rate < max_signal_rate < 1 (the message names the key).
    """
    def rate(key, default):
      raw = metadata.get(key, default)
      try:
        value = float(raw)
      except (TypeError, ValueError):
        value = math.nan
      if not 0.0 < value < 1.0:
        raise errors.InputError(f"metadata {key}={raw!r} is invalid: must be a number strictly between 0 and 1")
      return value

    schedule = str(metadata.get("schedule", "cosine"))
    target = str(metadata.get("target", "noise"))
    if schedule not in SCHEDULES:
      raise errors.InputError(f"metadata schedule={schedule!r} is invalid: must be one of {SCHEDULES}")
    if target not in TARGETS:
      raise errors.InputError(f"metadata target={target!r} is invalid: must be one of {TARGETS}")
    low, high = rate("min_signal_rate", MIN_SIGNAL_RATE), rate("max_signal_rate", MAX_SIGNAL_RATE)
    if not low < high:
      raise errors.InputError(f"metadata min_signal_rate={low} and max_signal_rate={high} are invalid: need "
                              f"min_signal_rate < max_signal_rate")
    return cls(schedule, low, high, target)

  def to_metadata(self) -> dict:
    """The weight-file metadata entries (``from_metadata`` reads them back)."""
    return dataclasses.asdict(self)

  def schedule_fn(self, xp=jnp):
    """``diffusion_times -> (noise_rates, signal_rates)`` of this schedule (``get_schedule``)."""
    return get_schedule(self.schedule, self.min_signal_rate, self.max_signal_rate, xp=xp)

  def rate_table(self, diffusion_times):
    """float32 (noise_rates, signal_rates) evaluated in float64 NumPy (``rate_table``)."""
    return rate_table(diffusion_times, self.schedule, self.min_signal_rate, self.max_signal_rate)
