"""Which sampler, on which time grid, the twin of ``ddim_jax/core/solvers.py`` (read them side by side).

DDIM and DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2m``), time grids uniform
in t or in lambda = log(s / n). NumPy, float64 from the float32 rates, rounded to float32: the same
numbers as the JAX twin. See the JAX module for the update rule and the conventions.
"""

import dataclasses
import math

import numpy as np

from ddim_torch_ref import schedules

SAMPLERS = ("ddim", "dpmpp_2m")
TIME_GRIDS = ("uniform", "logsnr")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler (``SAMPLERS``) and its time grid (``TIME_GRIDS``)."""
  name: str = "ddim"
  time_grid: str = "uniform"

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
    if self.time_grid not in TIME_GRIDS:
      raise ValueError(f"unknown time grid {self.time_grid!r}; choose one of {', '.join(TIME_GRIDS)}")

  def check(self, spec, eta: float = 0.0) -> None:
    """Raises ``ValueError`` when this sampler cannot run on ``spec`` with ``eta``."""
    if eta != 0.0 and self.name != "ddim":
      raise ValueError(f"eta={eta:g} is DDIM's: sampler {self.name} is deterministic; give eta 0 or --sampler ddim")
    if self.time_grid == "logsnr" and spec.schedule != "cosine":
      raise ValueError(f"the logsnr time grid needs the cosine schedule; this model's schedule is {spec.schedule!r}")

  def describe(self) -> str:
    """For messages: ``ddim`` or ``dpmpp_2m``, with `` (logsnr grid)`` off the uniform grid."""
    return self.name + ("" if self.time_grid == "uniform" else f" ({self.time_grid} grid)")


DDIM = Sampler()


def half_log_snr(noise_rates, signal_rates) -> np.ndarray:
  """lambda = log(s / n) in float64."""
  return np.log(np.asarray(signal_rates, np.float64)) - np.log(np.asarray(noise_rates, np.float64))


def logsnr_times(steps: int, spec) -> np.ndarray:
  """The S + 1 times (float64) at which lambda is uniform from lambda(t=1) to lambda(t=0), cosine schedule."""
  start_angle, end_angle = math.acos(spec.max_signal_rate), math.acos(spec.min_signal_rate)
  low, high = -math.log(math.tan(end_angle)), -math.log(math.tan(start_angle))
  lambdas = low + np.arange(steps + 1, dtype=np.float64) / steps * (high - low)
  times = (np.arctan(np.exp(-lambdas)) - start_angle) / (end_angle - start_angle)
  times[0], times[-1] = 1.0, 0.0
  return times


def sampling_times(steps: int, sampler=DDIM, spec=schedules.DiffusionSpec()):
  """(diffusion_times, next_diffusion_times) of the S network evaluations, float32, from 1 down to 0."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1 (network evaluations), got {steps}")
  sampler.check(spec)
  if sampler.time_grid == "uniform":
    times = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps
  else:
    times = logsnr_times(steps, spec)
  times = times.astype(np.float32)
  return times[:-1], times[1:]


def dpmpp_2m_coefficients(noise_rates, signal_rates, next_noise_rates, next_signal_rates):
  """(a, b, c, d), each (S,) float32: step i is x' = a x + b (c x0_i + d x0_{i-1}); see the JAX twin."""
  n, s, next_n, next_s = (np.asarray(r, np.float64) for r in (noise_rates, signal_rates, next_noise_rates,
                                                                next_signal_rates))
  h = half_log_snr(next_n, next_s) - half_log_snr(n, s)
  a = next_n / n
  b = -next_s * np.expm1(-h)
  c, d = np.ones_like(h), np.zeros_like(h)
  if len(h) > 2:
    r = h[:-2] / h[1:-1]  # r_i for the steps i = 1 .. S-2
    c[1:-1] = 1.0 + 1.0 / (2.0 * r)
    d[1:-1] = -1.0 / (2.0 * r)
  return tuple(v.astype(np.float32) for v in (a, b, c, d))
