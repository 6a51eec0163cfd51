"""Schedules of both twins against their closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax import schedules
from ddim_torch_ref import schedules as torch_schedules

TIMES = np.linspace(0.0, 1.0, 101, dtype=np.float32)


def both(name, min_rate=0.02, max_rate=0.95):
  """(noise, signal) from the JAX and the torch schedule, as float64 NumPy."""
  n_j, s_j = schedules.get_schedule(name, min_rate, max_rate)(jnp.asarray(TIMES))
  n_t, s_t = torch_schedules.get_schedule(name, min_rate, max_rate)(torch.from_numpy(TIMES))
  return [np.asarray(x, np.float64) for x in (n_j, s_j)], [x.numpy().astype(np.float64) for x in (n_t, s_t)]


@pytest.mark.parametrize("min_rate,max_rate", [(0.02, 0.95), (0.1, 0.98)])
def test_offset_cosine_closed_form(min_rate, max_rate):
  start, end = math.acos(max_rate), math.acos(min_rate)
  angles = start + TIMES.astype(np.float64) * (end - start)
  for noise, signal in both("cosine", min_rate, max_rate):
    np.testing.assert_allclose(signal, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(noise, np.sin(angles), atol=1e-6)
    assert signal[0] == pytest.approx(max_rate, abs=1e-6)
    assert signal[-1] == pytest.approx(min_rate, abs=1e-6)
    assert np.all(np.diff(signal) < 0) and np.all(np.diff(noise) > 0)
    np.testing.assert_allclose(signal ** 2 + noise ** 2, 1.0, atol=1e-6)


def test_linear_schedule_is_the_clipped_ddpm_table():
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32).astype(np.float64)
  alpha_bars = np.clip(np.cumprod(1 - betas), 0.02, 0.95)
  index = np.floor(TIMES.astype(np.float64) * 999).astype(int)
  for noise, signal in both("linear"):
    np.testing.assert_allclose(signal, np.sqrt(alpha_bars[index]), atol=1e-6)
    np.testing.assert_allclose(signal ** 2 + noise ** 2, 1.0, atol=1e-6)
    assert np.all(np.diff(signal) <= 0)
    # R clips alpha_bar (not the rate) to [0.02, 0.95]: s in [sqrt(0.02), sqrt(0.95)].
    assert signal.min() == pytest.approx(math.sqrt(0.02), abs=1e-6)
    assert signal.max() == pytest.approx(math.sqrt(0.95), abs=1e-6)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_rate_table_is_shared_and_close_to_framework_rates(name):
  table_j = schedules.rate_table(TIMES, name)
  table_t = torch_schedules.rate_table(TIMES, name)
  for a, b in zip(table_j, table_t):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  (n_j, s_j), _ = both(name)
  np.testing.assert_allclose(table_j[0], n_j, atol=2e-7)
  np.testing.assert_allclose(table_j[1], s_j, atol=2e-7)


@pytest.mark.parametrize("module", [schedules, torch_schedules])
def test_bad_schedule_arguments(module):
  with pytest.raises(ValueError, match="unknown schedule"):
    module.get_schedule("sigmoid")
  with pytest.raises(ValueError, match="min_signal_rate"):
    module.get_schedule("cosine", 0.9, 0.5)
