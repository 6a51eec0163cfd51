"""`config.train.init_weights`: a new run starts from a weight file (this project's or the torch twin's):
raw and EMA weights equal to the file's at step 0, AdamW fresh, the run record says so; a file of
another U-Net is refused naming the keys."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from ddim_jax import configs, errors
from ddim_jax.core import models, rng, step as step_lib
from ddim_jax.interop import weight_files
from ddim_jax.training import init_weights, trainer
from ddim_torch_ref import models as torch_models, weight_files as torch_weight_files
from train_helpers import final_weights, tiny_config

FIXTURE_MODEL = {"model.widths": "(16,32,48)", "model.block_depth": 2, "model.image_size": 16}


def _flat(variables) -> dict:
  return weight_files.flax_to_torch_state_dict(jax.tree.map(np.asarray, variables))


def _initial(config):
  model = models.create_model(**config.model)
  return init_weights.initial_state(config, model, step_lib.StepConfig.from_config(config),
                                    rng.purpose_key(config.seed, rng.INIT), int(config.model.image_size))


@pytest.mark.slow
def test_a_new_run_starts_from_the_file_raw_and_ema(trained_weights, tmp_path):
  path = trained_weights("keras")
  config = tiny_config(tmp_path / "cache", **FIXTURE_MODEL, **{"train.init_weights": path})
  state = _initial(config)
  _, variables, _, _ = weight_files.load_weights(path)
  want = _flat(variables)
  for got in (_flat(state.variables(ema=False)), _flat(state.variables(ema=True))):
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert int(state.step) == 0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state) if np.asarray(x).ndim > 0)
  fresh = _initial(tiny_config(tmp_path / "cache", **FIXTURE_MODEL))  # without the file: the random init
  fresh_flat = _flat(fresh.variables(ema=False))
  assert any(np.any(fresh_flat[k] != want[k]) for k in want if not k.endswith(("running_mean", "running_var")))


@pytest.mark.slow
def test_the_torch_twins_file_and_a_trained_run_record_it(tmp_path):
  twin = torch_models.create_model(variant="keras", widths=(8, 16), block_depth=1)
  with torch.no_grad():
    for p in twin.parameters():
      p.add_(torch.randn_like(p) * 0.05)  # not the init: the file's weights must be what the run starts from
  path = str(tmp_path / "twin.safetensors")
  torch_weight_files.save_weights(path, twin, {"mean": np.full(3, 0.5), "variance": np.full(3, 0.1)}, 16)
  config = tiny_config(tmp_path / "cache", **{"train.init_weights": path, "train.num_steps": 2,
                                               "train.checkpoint_every": 2, "train.log_every": 2})
  want = {k: v.numpy() for k, v in twin.state_dict().items() if not k.endswith("num_batches_tracked")}
  state = _initial(config)
  for name, value in _flat(state.variables(ema=False)).items():
    np.testing.assert_allclose(value, want[name], rtol=0, atol=0, err_msg=name)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir), progress=False)
  runs = [json.loads(line) for line in open(workdir / "runs.jsonl", encoding="utf-8")]
  assert runs[-1]["init_weights"] == path and runs[-1]["start_step"] == 0
  assert json.load(open(workdir / "config.json", encoding="utf-8"))["train"]["init_weights"] == path
  trained = final_weights(workdir)
  assert int(trained["__step__"]) == 2
  moved = max(float(np.max(np.abs(trained[k] - want[k]))) for k in want if k.endswith(".weight"))
  assert 0 < moved < 0.05  # two AdamW steps of 1e-3 from the file's weights, not from a random init


@pytest.mark.slow
def test_a_file_of_another_unet_is_refused_naming_the_keys(trained_weights, tmp_path):
  config = tiny_config(tmp_path / "cache", **{"train.init_weights": trained_weights("keras")})  # widths 8,16
  with pytest.raises(errors.ConfigError, match=r"widths \(16, 32, 48\) \(config.model.widths: \(8, 16\)\)"):
    _initial(config)
  missing = tiny_config(tmp_path / "cache", **{"train.init_weights": str(tmp_path / "none.safetensors")})
  with pytest.raises(weight_files.WeightFileError, match="does not exist"):
    _initial(missing)
  assert not os.path.exists(tmp_path / "none.safetensors")
  assert configs.load_config("default").train.init_weights is None
