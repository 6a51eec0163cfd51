"""Schedules of both twins against their closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax.core import schedules
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


def _r_linear_alpha_bars():
  """R's linear schedule (torch_linspace(1e-4, 0.02, 1000) betas), written independently of schedules.py.

  beta_i = 1e-4 + i (0.02 - 1e-4) / 999 (R's torch_linspace(1e-4, 0.02, 1000)) and
  alpha_bar_i = prod_{j <= i} (1 - beta_j), as an explicit running product in Python floats.
  """
  alpha_bars, product = [], 1.0
  for i in range(1000):
    product *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / 999)
    alpha_bars.append(product)
  return alpha_bars


def test_linear_schedule_is_the_clipped_ddpm_table():
  alpha_bars = _r_linear_alpha_bars()
  # The reference itself against the values the R port states.
  assert alpha_bars[0] == pytest.approx(0.9999, rel=1e-12)
  assert alpha_bars[-1] == pytest.approx(4.0358e-5, rel=1e-4)
  assert sum(a > 0.95 for a in alpha_bars) == 67 and sum(a < 0.02 for a in alpha_bars) == 380
  assert alpha_bars[619] >= 0.02 > alpha_bars[620]
  # R: idx = 1 + as.integer(t * 999) (1-based), s = sqrt(clip(alpha_bar[idx], min, max)), n = sqrt(1 - that).
  # Times between grid points (t * 999 = k + 1/2), the ends, and both sides of both clipping edges.
  cases = [(0.0, 0), (1.0, 999)] + [((k + 0.5) / 999, k) for k in (0, 1, 5, 66, 67, 100, 250, 499, 619, 620, 998)]
  times = np.array([t for t, _ in cases], np.float32)
  expected_signal = np.array([math.sqrt(min(max(alpha_bars[k], 0.02), 0.95)) for _, k in cases])
  expected_noise = np.array([math.sqrt(1.0 - min(max(alpha_bars[k], 0.02), 0.95)) for _, k in cases])
  results = {
      "jax": schedules.get_schedule("linear", 0.02, 0.95)(jnp.asarray(times)),
      "torch": [x.numpy() for x in torch_schedules.get_schedule("linear", 0.02, 0.95)(torch.from_numpy(times))],
      "jax rate_table": schedules.rate_table(times, "linear"),
      "torch rate_table": torch_schedules.rate_table(times, "linear"),
  }
  for name, (noise, signal) in results.items():
    np.testing.assert_allclose(np.asarray(signal, np.float64), expected_signal, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(noise, np.float64), expected_noise, rtol=1e-6, err_msg=name)
  # Seed spec 3: R clips alpha_bar (not the rate), so s runs over [0.1414, 0.9747].
  for noise, signal in both("linear"):
    assert signal.min() == pytest.approx(0.1414, abs=1e-4) and signal.max() == pytest.approx(0.9747, abs=1e-4)
    assert np.all(np.diff(signal) <= 0)


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


def test_diffusion_spec_round_trips_and_is_the_same_in_both_twins():
  """One frozen, hashable DiffusionSpec: config -> spec -> weight-file metadata -> spec, in both twins."""
  import ml_collections
  config = ml_collections.ConfigDict({"diffusion": {"schedule": "linear", "min_signal_rate": 0.03,
                                                    "max_signal_rate": 0.8, "target": "image"}})
  spec = schedules.DiffusionSpec.from_config(config)
  assert spec == schedules.DiffusionSpec("linear", 0.03, 0.8, "image")
  assert hash(spec) == hash(schedules.DiffusionSpec("linear", 0.03, 0.8, "image"))  # a static jit argument
  metadata = {k: str(v) for k, v in spec.to_metadata().items()}  # safetensors metadata holds strings
  assert schedules.DiffusionSpec.from_metadata(metadata) == spec
  assert torch_schedules.DiffusionSpec.from_metadata(metadata).to_metadata() == spec.to_metadata()
  assert schedules.DiffusionSpec.from_metadata({}) == schedules.DiffusionSpec() == schedules.DiffusionSpec(
      "cosine", 0.02, 0.95, "noise")  # files without the keys: the Keras defaults
  times = np.linspace(0.0, 1.0, 9)
  for got, want in zip(spec.rate_table(times), torch_schedules.DiffusionSpec("linear", 0.03, 0.8, "image").rate_table(
      times)):
    np.testing.assert_array_equal(got, want)
  for twin in (schedules, torch_schedules):
    with pytest.raises(ValueError, match="target"):
      twin.DiffusionSpec(target="velocity")
    with pytest.raises(ValueError, match="schedule"):
      twin.DiffusionSpec(schedule="sigmoid")
    with pytest.raises(ValueError, match="signal rates"):
      twin.DiffusionSpec(min_signal_rate=0.9, max_signal_rate=0.5)
