"""Which sampler, on which time grid: DDIM and DPM-Solver++(2M), their times and step coefficients.

The samplers solve the same probability-flow ODE of the trained diffusion (``schedules``); the
network takes the noise variance, so any time grid works without retraining. ``steps`` counts
network evaluations for every sampler (Keras semantics): evaluations at times t_0 = 1 > t_1 > ...
> t_{S-1}, each step going on to the next time and the last to t_S = 0; the output is the
pred_images of the last evaluation (``sampling.reverse_diffusion``).

  ddim       DDIM (Song et al. 2021), any eta; at eta 0 it is DPM-Solver++'s first-order step.
  dpmpp_2m   DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's ``sample_dpmpp_2m``):
             multistep, data prediction, deterministic. With lambda = log(s / n) (half the log-SNR)
             and h_i = lambda_{i+1} - lambda_i, step i is

               x_{i+1} = (n_{i+1} / n_i) x_i - s_{i+1} expm1(-h_i) D_i,
               D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1},   r_i = h_{i-1} / h_i,

             first order (D_i = x0_i, the DDIM step) at the first step, which has no x0_{i-1}, and
             at the last, as the published method (and k-diffusion, whose last step goes to sigma 0)
             does. The last step's state is discarded like DDIM's, so the output is x0_{S-1}.

Time grids (``TIME_GRIDS``):
  uniform  t_i = 1 - i / S (the Keras sampler's);
  logsnr   lambda uniform from lambda(1) to lambda(0) (DPM-Solver's "logSNR" skip), cosine schedule only.

Everything here is NumPy, evaluated in float64 from the float32 times and rates the network sees,
then rounded to float32: the torch twin (``ddim_torch_ref/solvers.py``) gets the same numbers.
"""

import dataclasses
import math

import numpy as np

from ddim_jax import errors
from ddim_jax.core import schedules

SAMPLERS = ("ddim", "dpmpp_2m")
TIME_GRIDS = ("uniform", "logsnr")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler and its time grid; frozen and hashable (a static argument of the jitted samplers).

  Attributes:
    name: one of ``SAMPLERS``.
    time_grid: one of ``TIME_GRIDS``.
  """
  name: str = "ddim"
  time_grid: str = "uniform"

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise errors.ConfigError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
    if self.time_grid not in TIME_GRIDS:
      raise errors.ConfigError(f"unknown time grid {self.time_grid!r}; choose one of {', '.join(TIME_GRIDS)}")

  @classmethod
  def from_config(cls, sample_config) -> "Sampler":
    """From a config's ``sample`` block (``sampler``, ``time_grid``; DDIM on the uniform grid when absent)."""
    return cls(str(sample_config.get("sampler", "ddim")), str(sample_config.get("time_grid", "uniform")))

  def check(self, spec: schedules.DiffusionSpec, eta: float = 0.0) -> None:
    """Raises ``errors.ConfigError`` when this sampler cannot run on ``spec`` with ``eta``."""
    if eta != 0.0 and self.name != "ddim":
      raise errors.ConfigError(f"eta={eta:g} is DDIM's: sampler {self.name} is deterministic; give eta 0 or "
                               "--sampler ddim")
    if self.time_grid == "logsnr" and spec.schedule != "cosine":
      raise errors.ConfigError(f"the logsnr time grid needs the cosine schedule (its log-SNR has a closed-form "
                               f"inverse); this model's schedule is {spec.schedule!r}: use the uniform grid (--time-grid "
                               "uniform, config.sample.time_grid)")

  def describe(self) -> str:
    """For messages: ``ddim`` or ``dpmpp_2m``, with `` (logsnr grid)`` off the uniform grid."""
    return self.name + ("" if self.time_grid == "uniform" else f" ({self.time_grid} grid)")

  def record(self) -> dict:
    """The JSON record (``sampler``, ``time_grid``)."""
    return {"sampler": self.name, "time_grid": self.time_grid}


DDIM = Sampler()


def half_log_snr(noise_rates, signal_rates) -> np.ndarray:
  """lambda = log(s / n) in float64 (half the log signal-to-noise ratio; -inf... +inf as n -> 0)."""
  return np.log(np.asarray(signal_rates, np.float64)) - np.log(np.asarray(noise_rates, np.float64))


def logsnr_times(steps: int, spec: schedules.DiffusionSpec) -> np.ndarray:
  """The S + 1 times (float64) at which lambda is uniform from lambda(t=1) to lambda(t=0), cosine schedule.

  On the offset cosine schedule n = sin(a), s = cos(a) with a linear in t, so lambda = -log(tan a)
  and a = atan(exp(-lambda)). The ends are exactly 1 and 0.
  """
  start_angle, end_angle = math.acos(spec.max_signal_rate), math.acos(spec.min_signal_rate)
  low, high = -math.log(math.tan(end_angle)), -math.log(math.tan(start_angle))  # lambda(1), lambda(0)
  lambdas = low + np.arange(steps + 1, dtype=np.float64) / steps * (high - low)
  times = (np.arctan(np.exp(-lambdas)) - start_angle) / (end_angle - start_angle)
  times[0], times[-1] = 1.0, 0.0
  return times


def sampling_times(steps: int, sampler: Sampler = DDIM,
                   spec: schedules.DiffusionSpec = schedules.DiffusionSpec()) -> tuple[np.ndarray, np.ndarray]:
  """(diffusion_times, next_diffusion_times) of the S network evaluations, float32, from 1 down to 0.

  ``uniform``: 1 - i/S and 1 - (i+1)/S (formed in float64, rounded to float32). ``logsnr``: see
  ``logsnr_times``. Both twins use the same times.
  """
  if steps < 1:
    raise errors.ConfigError(f"steps must be >= 1 (network evaluations), got {steps}")
  sampler.check(spec)
  if sampler.time_grid == "uniform":
    times = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps
  else:
    times = logsnr_times(steps, spec)
  times = times.astype(np.float32)
  return times[:-1], times[1:]


def dpmpp_2m_coefficients(noise_rates, signal_rates, next_noise_rates, next_signal_rates) -> tuple[np.ndarray, ...]:
  """(a, b, c, d), each (S,) float32: DPM-Solver++(2M)'s step i is x' = a x + b (c x0_i + d x0_{i-1}).

  a = n'/n and b = -s' expm1(-h) (the first-order step), c = 1 + 1/(2r) and d = -1/(2r) with
  r = h_{i-1}/h_i; c = 1, d = 0 at the first and the last step. Evaluated in float64 from the
  float32 rates the network is conditioned on.
  """
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
