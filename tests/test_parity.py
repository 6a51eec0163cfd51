"""JAX vs PyTorch parity on the same converted weights (ddim_jax/parity.py; README, "Parity").

Forward: every tensor perturbed, BN in eval and train mode, a batch with mixed noise levels, max
|diff| <= 1e-5. Trajectories: a model briefly trained (in the torch twin, on the bundled digits,
by code in ddim_jax/parity.py) so that states stay bounded; every state <= 1e-4.
"""

import numpy as np
import pytest

from ddim_jax import models, parity


@pytest.mark.parametrize("variant,image_size,widths", [
    ("keras", 64, (32, 64, 96, 128)),  # the real Keras configuration
    ("r", 32, (32, 64, 96, 128)),
    ("keras", 16, (8, 16)),
])
def test_forward_parity(variant, image_size, widths):
  model = models.create_model(variant, widths=widths)
  variables = parity.perturbed_variables(model, image_size, seed=0)
  result = parity.forward_parity(model, variables, image_size, batch=8)
  assert result["output_max_abs"] > 0.5  # the comparison is not vacuous
  assert result["forward_max_abs"] <= 1e-5, result
  assert result["forward_bn_train_max_abs"] <= 1e-5, result
  assert result["bn_stats_max_abs"] <= 1e-5, result


@pytest.fixture(params=["keras", "r"])
def trained(request, trained_model):
  return trained_model(request.param)


@pytest.mark.parametrize("steps,eta", [(20, 0.0), (50, 0.0), (20, 1.0), (50, 1.0)])
def test_trajectory_parity(trained, steps, eta):
  model, variables, _ = trained
  result = parity.trajectory_parity(model, variables, 16, steps, eta)
  # Bounded trajectories: the states of a trained model stay O(1-10), unlike a random U-Net's.
  assert result["state_max_abs"] < 50, result
  assert result["max_abs"] <= 1e-4, result


def test_trained_reference_is_a_denoiser(trained):
  """The fixture is meaningful: its noise predictions beat predicting zero by a wide margin."""
  import jax.numpy as jnp
  from ddim_jax import schedules
  model, variables, normalizer = trained
  images = (parity.load_digits_images(16)[:64].astype(np.float32) / 255 - normalizer["mean"]) / np.sqrt(
      normalizer["variance"])
  rng = np.random.default_rng(0)
  noises = rng.standard_normal(images.shape).astype(np.float32)
  noise_rates, signal_rates = schedules.rate_table(np.full((64, 1, 1, 1), 0.5))
  pred = model.apply(variables, jnp.asarray(signal_rates * images + noise_rates * noises), jnp.asarray(noise_rates ** 2))
  assert float(np.mean(np.abs(np.asarray(pred) - noises))) < 0.6 * float(np.mean(np.abs(noises)))
