"""JAX vs PyTorch parity on the same converted weights (ddim_jax/interop/parity.py; README, "Parity").

Forward: every tensor perturbed, BN in eval and train mode, a batch with mixed noise levels, max
|diff| <= 1e-5. Trajectories: a model briefly trained (in the torch twin, on the bundled digits,
by code in ddim_jax/interop/parity.py) so that states stay bounded; every state <= 1e-4. The bounds are
float32's: the comparisons run under ``parity.precision("highest")`` (full float32 on GPUs and TPUs
too; on CPU the same numbers as XLA's default, which a test below checks).
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ddim_jax.core import models, solvers
from ddim_jax.interop import parity, parity_fixtures, weight_files


@pytest.mark.parametrize("variant,image_size,widths", [
    ("keras", 64, (32, 64, 96, 128)),  # the real Keras configuration
    ("r", 32, (32, 64, 96, 128)),
    ("keras", 16, (8, 16)),
])
@pytest.mark.slow
def test_forward_parity(variant, image_size, widths):
  model = models.create_model(variant, widths=widths)
  with parity.precision("highest"):
    variables = parity_fixtures.perturbed_variables(model, image_size, seed=0)
    result = parity.forward_parity(model, variables, image_size, batch=8)
  assert result["output_max_abs"] > 0.5  # the comparison is not vacuous
  assert result["forward_max_abs"] <= 1e-5, result
  assert result["forward_bn_train_max_abs"] <= 1e-5, result
  assert result["bn_stats_max_abs"] <= 1e-5, result


@pytest.fixture(params=["keras", "r"])
def trained(request, trained_model):
  return trained_model(request.param)


@pytest.mark.parametrize("steps,eta", [(20, 0.0), (50, 0.0), (20, 1.0), (50, 1.0)])
@pytest.mark.slow
def test_trajectory_parity(trained, steps, eta):
  model, variables, _ = trained
  with parity.precision("highest"):
    result = parity.trajectory_parity(model, variables, 16, steps, eta)
  # Bounded trajectories: the states of a trained model stay O(1-10), unlike a random U-Net's.
  assert result["state_max_abs"] < 50, result
  assert result["max_abs"] <= 1e-4, result


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("grid", solvers.TIME_GRIDS)
@pytest.mark.slow
def test_dpmpp_2m_trajectory_parity(trained, steps, grid):
  """DPM-Solver++(2M) in both twins, both variants: every state of the trajectory within the DDIM bound."""
  model, variables, _ = trained
  with parity.precision("highest"):
    result = parity.trajectory_parity(model, variables, 16, steps, sampler=solvers.Sampler("dpmpp_2m", grid))
  assert result["state_max_abs"] < 50, result
  assert result["max_abs"] <= 1e-4, result


@pytest.mark.slow
def test_trained_reference_is_a_denoiser(trained):
  """The fixture is meaningful: its noise predictions beat predicting zero by a wide margin."""
  import jax.numpy as jnp
  from ddim_jax.core import schedules
  model, variables, normalizer = trained
  images = (parity_fixtures.load_digits_images(16)[:64].astype(np.float32) / 255 - normalizer["mean"]) / np.sqrt(
      normalizer["variance"])
  rng = np.random.default_rng(0)
  noises = rng.standard_normal(images.shape).astype(np.float32)
  noise_rates, signal_rates = schedules.rate_table(np.full((64, 1, 1, 1), 0.5))
  pred = model.apply(variables, jnp.asarray(signal_rates * images + noise_rates * noises), jnp.asarray(noise_rates ** 2))
  assert float(np.mean(np.abs(np.asarray(pred) - noises))) < 0.6 * float(np.mean(np.abs(noises)))


@pytest.mark.slow
def test_precision_default_and_highest_compute_the_same_numbers_on_cpu():
  """On CPU XLA computes float32 convolutions and matmuls in float32 either way: the report's two
  --precision settings give the same numbers, bit for bit (forward in both BN modes, a trajectory)."""
  if parity.on_accelerator():
    pytest.skip(f"meaningless on {jax.default_backend()}: XLA's default precision there is TF32 / bf16 passes "
                f"by design, and differs from 'highest'")
  model = models.create_model("keras", widths=(8, 16))
  variables = parity_fixtures.perturbed_variables(model, 16, seed=0)
  images, noise_variances = parity.mixed_noise_inputs(4, 16, 3)
  noise = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  outs = {}
  for name in parity.PRECISIONS:
    with parity.precision(name):
      assert jax.config.jax_default_matmul_precision == (None if name == "default" else "highest")
      outs[name] = jax.tree.map(np.asarray, (
          parity._apply(model, variables, images, noise_variances, False),
          parity._apply(model, variables, images, noise_variances, True),
          parity._trajectories(model, variables, noise, None, steps=3, etas=(0.0,))))
  assert outs["default"][0].std() > 0.1  # not vacuous
  jax.tree.map(np.testing.assert_array_equal, outs["default"], outs["highest"])


def test_precision_restores_jax_and_torch_settings():
  import torch
  before = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)
  with parity.precision("highest"):
    assert jax.config.jax_default_matmul_precision == "highest"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
  assert (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32,
          torch.backends.cudnn.allow_tf32) == before
  with pytest.raises(ValueError, match="precision"):
    with parity.precision("tf32"):
      pass


@pytest.mark.slow
def test_trained_reference_cache_is_bit_exact_and_keyed(tmp_path):
  """The cached fixture reads back the trained weights bit for bit; another key trains again."""
  first = parity_fixtures.cached_trained_reference("keras", cache_dir=str(tmp_path), num_steps=2, widths=(8, 16))
  assert first[3]["source"] == "trained" and os.path.exists(first[3]["path"])
  second = parity_fixtures.cached_trained_reference("keras", cache_dir=str(tmp_path), num_steps=2, widths=(8, 16))
  assert second[3] == {**first[3], "source": "cache"}
  assert second[0] == first[0]
  jax.tree.map(np.testing.assert_array_equal, (second[1], second[2]), (first[1], first[2]))
  # A file whose recorded key differs (e.g. written by other code) is not trusted: trained and rewritten.
  model, variables, normalizer, _ = weight_files.load_weights(first[3]["path"])
  key = dict(first[3]["key"], code="something else")
  weight_files.save_weights(first[3]["path"], model, variables, normalizer, 16, weights="raw",
                       parity_fixture=json.dumps(key))
  third = parity_fixtures.cached_trained_reference("keras", cache_dir=str(tmp_path), num_steps=2, widths=(8, 16))
  assert third[3]["source"] == "trained"
  other = parity_fixtures.cached_trained_reference("keras", cache_dir=str(tmp_path), num_steps=3, widths=(8, 16))
  assert other[3]["source"] == "trained" and other[3]["path"] != first[3]["path"]
  assert parity_fixtures.cached_trained_reference("keras", cache_dir="", num_steps=2, widths=(8, 16))[3]["path"] is None


@pytest.mark.slow
def test_parity_report_says_what_it_compared_and_times_its_phases(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(parity, "_EXECUTABLES", {})  # compiled by the tests above in this process
  spec = importlib.util.spec_from_file_location(
      "parity_report", os.path.join(os.path.dirname(__file__), "..", "scripts", "parity_report.py"))
  report_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(report_module)
  args = ["--image-size", "16", "--widths", "8,16", "--trajectory-steps", "3", "--fixture-steps", "2",
          "--fixture-cache", str(tmp_path), "--torch-threads", "1"]
  assert report_module.main(args + ["--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["precision"] == "highest" and report["device"]["backend"] == jax.default_backend()
  assert report["device"]["torch_threads"] == 1 and report["fixture"]["source"] == "trained"
  assert os.path.exists(report["fixture"]["path"]) and len(os.listdir(tmp_path)) == 2  # + the init values
  for phase in ("import jax + ddim_jax", "import torch + ddim_torch_ref", "JAX compile: forward, BN eval",
                "JAX compile: forward, BN train", "JAX compile: trajectories", "torch fixture: training (2 steps)",
                "JAX run: forward", "torch run: forward", "JAX run: trajectories", "torch run: trajectories"):
    assert phase in report["phases"], (phase, report["phases"])
  assert report["forward_max_abs"] <= 1e-5 and report["trajectory_eta1_max_abs"] <= 1e-4, report
  assert report_module.main(args + ["--precision", "default"]) == 0
  out = capsys.readouterr().out
  assert "precision=default" in out and f"JAX on {jax.default_backend()}" in out and "cache:" in out, out
  assert "torch fixture: read cache" in out and "JAX init: read cache" in out and "JAX compile + run: init" not in out
  assert "(widths 8/16" in out and "JAX compile: trajectories" in out, out
