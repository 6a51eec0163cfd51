"""Diffusion schedules, the twin of ``ddim_jax/core/schedules.py`` (read them side by side)."""

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
import torch

MIN_SIGNAL_RATE = 0.02
MAX_SIGNAL_RATE = 0.95
SCHEDULES = ("cosine", "linear")
TARGETS = ("noise", "image")


def offset_cosine_schedule(diffusion_times, min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE,
                           xp=torch):
  """The Keras offset cosine schedule; returns (noise_rates, signal_rates). ``xp``: torch or numpy."""
  start_angle = math.acos(max_signal_rate)
  end_angle = math.acos(min_signal_rate)
  diffusion_angles = start_angle + diffusion_times * (end_angle - start_angle)
  return xp.sin(diffusion_angles), xp.cos(diffusion_angles)


def linear_rate_tables(min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, num_timesteps=1000):
  """Noise and signal rate tables of the R ``linear`` schedule (float32 NumPy)."""
  betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float32).astype(np.float64)
  alpha_bars = np.clip(np.cumprod(1.0 - betas), min_signal_rate, max_signal_rate)
  return np.sqrt(1.0 - alpha_bars).astype(np.float32), np.sqrt(alpha_bars).astype(np.float32)


def linear_schedule(diffusion_times, min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, xp=torch):
  """The R ``linear`` schedule: a table lookup at index floor(t * 999). ``xp``: torch or numpy."""
  noise_table, signal_table = linear_rate_tables(min_signal_rate, max_signal_rate)
  num_timesteps = noise_table.shape[0]
  if xp is np:
    indices = np.clip(np.floor(diffusion_times * (num_timesteps - 1)).astype(np.int64), 0, num_timesteps - 1)
    return noise_table[indices], signal_table[indices]
  indices = torch.floor(diffusion_times * (num_timesteps - 1)).long().clamp(0, num_timesteps - 1)
  device = diffusion_times.device
  return torch.from_numpy(noise_table).to(device)[indices], torch.from_numpy(signal_table).to(device)[indices]


def get_schedule(name="cosine", min_signal_rate=MIN_SIGNAL_RATE, max_signal_rate=MAX_SIGNAL_RATE, xp=torch):
  """Returns the schedule ``diffusion_times -> (noise_rates, signal_rates)`` called ``name``."""
  if not 0.0 < min_signal_rate < max_signal_rate < 1.0:
    raise ValueError(
        f"signal rates must satisfy 0 < min_signal_rate < max_signal_rate < 1, got min={min_signal_rate}, "
        f"max={max_signal_rate}")
  if name == "cosine":
    fn = offset_cosine_schedule
  elif name == "linear":
    fn = linear_schedule
  else:
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
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
  """The diffusion a model was trained with (schedule, signal-rate bounds, target); see the JAX twin."""
  schedule: str = "cosine"
  min_signal_rate: float = MIN_SIGNAL_RATE
  max_signal_rate: float = MAX_SIGNAL_RATE
  target: str = "noise"

  def __post_init__(self):
    get_schedule(self.schedule, self.min_signal_rate, self.max_signal_rate)  # validates both
    if self.target not in TARGETS:
      raise ValueError(f"unknown prediction target {self.target!r}; choose one of {TARGETS}")

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> "DiffusionSpec":
    """From a weight file's metadata (the Keras defaults for keys it does not hold); ValueError names a bad key."""
    rates = {}
    for key, default in (("min_signal_rate", MIN_SIGNAL_RATE), ("max_signal_rate", MAX_SIGNAL_RATE)):
      try:
        rates[key] = float(metadata.get(key, default))
      except (TypeError, ValueError):
        rates[key] = math.nan
      if not 0.0 < rates[key] < 1.0:
        raise ValueError(f"metadata {key}={metadata.get(key)!r} is invalid: must be a number strictly between 0 "
                         f"and 1")
    return cls(str(metadata.get("schedule", "cosine")), rates["min_signal_rate"], rates["max_signal_rate"],
               str(metadata.get("target", "noise")))

  def to_metadata(self) -> dict:
    """The weight-file metadata entries (``from_metadata`` reads them back)."""
    return dataclasses.asdict(self)

  def schedule_fn(self, xp=torch):
    """``diffusion_times -> (noise_rates, signal_rates)`` of this schedule (``get_schedule``)."""
    return get_schedule(self.schedule, self.min_signal_rate, self.max_signal_rate, xp=xp)

  def rate_table(self, diffusion_times):
    """float32 (noise_rates, signal_rates) evaluated in float64 NumPy (``rate_table``)."""
    return rate_table(diffusion_times, self.schedule, self.min_signal_rate, self.max_signal_rate)
