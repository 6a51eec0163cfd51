"""A weight file knows its data: `export` and `demo` record the run's ``config.data``; `evaluate`,
`invert` and `figures` read it (KID for a model of another dataset, never the digits by default),
take ``--config`` / ``--config.data.*`` instead, and refuse a file that records none or images whose
channels the model does not take. (The one-line errors: test_bad_inputs.py.)
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from ddim_jax import cli, configs, data, errors
from ddim_jax.core import models
from ddim_jax.inference import evaluation, pipeline
from ddim_jax.interop import weight_files


def _with_metadata(source: str, target, **changes) -> str:
  """A copy of weight file ``source`` whose metadata has ``changes`` (a value None drops the key)."""
  tensors = load_file(source)
  _, metadata = weight_files.read_weight_file(source)
  metadata.update({k: v for k, v in changes.items() if v is not None})
  for key in [k for k, v in changes.items() if v is None]:
    metadata.pop(key, None)
  save_file(tensors, str(target), metadata=metadata)
  return str(target)


def _image_folder(root, count: int = 10, size: int = 20) -> str:
  """``count`` random RGB PNGs of ``size`` px: a dataset that is not the digits."""
  rng = np.random.default_rng(0)
  os.makedirs(root)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, f"{i}.png"))
  return str(root)


@pytest.mark.slow
def test_export_records_the_run_data_and_the_commands_read_it(kid_run, tmp_path):
  out = tmp_path / "run.safetensors"
  assert cli.main(["export", "--workdir", kid_run, "--out", str(out)]) == 0
  _, metadata = weight_files.read_weight_file(str(out))
  run_data = pipeline.restore_checkpoint(kid_run)[3].data
  recorded = weight_files.data_from_metadata(metadata)
  assert recorded == {k: run_data[k] for k in weight_files.DATA_KEYS}
  source = pipeline.load_model(weights=str(out))
  assert {k: source.data_config[k] for k in weight_files.DATA_KEYS} == recorded
  # The real images of the file are the run's validation split, at the model's size.
  np.testing.assert_array_equal(source.real_images("validation", 4),
                                data.load_split(run_data, "validation", 16)[:4])


@pytest.mark.slow
def test_a_model_of_another_dataset_gets_its_own_data_and_kid(trained_weights, tmp_path, monkeypatch):
  monkeypatch.setenv("DDIM_JAX_CACHE_DIR", str(tmp_path / "cache"))
  folder = _image_folder(tmp_path / "images")
  recorded = {"dataset": "folder", "folder": folder, "split": "r", "split_seed": 3, "validation_fraction": 0.2,
              "antialias": True}
  weights = _with_metadata(trained_weights("keras"), tmp_path / "folder_model.safetensors",
                           data=json.dumps(recorded))
  source = pipeline.load_model(weights=weights)
  assert source.data_config.dataset == "folder" and source.data_config.split_seed == 3
  want = data.load_split(source.data_config, "validation", 16)
  assert len(want) == 2  # 20% of 10
  np.testing.assert_array_equal(source.real_images("validation"), want)
  # --metric auto is KID for it (asks for Inception weights), not the digits metric.
  with pytest.raises(errors.MissingInputError, match="InceptionV3 weights"):
    evaluation.evaluate_model(weights=weights, steps_list=[1], inception_weights=str(tmp_path / "none.pth"))
  # --config.data.* overrides the recorded data; --config replaces it.
  moved = pipeline.load_model(weights=weights, overrides=["--config.data.split_seed=4"])
  assert moved.data_config.split_seed == 4 and moved.data_config.folder == folder
  assert pipeline.load_model(weights=weights, config="demo").data_config.dataset == "digits"


@pytest.mark.slow
def test_a_file_without_data_still_samples_but_names_the_fix_for_real_images(trained_weights, tmp_path, capsys):
  weights = _with_metadata(trained_weights("keras"), tmp_path / "no_data.safetensors", data=None)
  assert cli.main(["sample", "--weights", weights, "--num-images", "2", "--steps", "1", "--out",
                   str(tmp_path / "grid.png")]) == 0
  capsys.readouterr()
  assert cli.main(["figures", "--weights", weights, "--out-dir", str(tmp_path / "figures"), "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not record the data" in err and "--config" in err, err
  # With --config the same file works: the bundled digits.
  source = pipeline.load_model(weights=weights, config="demo")
  assert source.real_images("validation", 2).shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_images_whose_channels_the_model_does_not_take_are_refused(tmp_path, capsys):
  model = models.create_model("keras", widths=(8, 16), block_depth=1, channels=1)
  variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(0), 16))
  weights = str(tmp_path / "gray.safetensors")
  weight_files.save_weights(weights, model, variables, {"mean": np.zeros(1), "variance": np.ones(1)}, 16,
                            data=configs.load_config("demo").data)
  assert cli.main(["invert", "--weights", weights, "--num-images", "2", "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert "have 3 channels" in err and "takes 1" in err and "--config" in err, err
