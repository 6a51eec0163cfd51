"""Weight conversion and the safetensors weight file: round trips and corrupt-file errors."""

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ddim_jax.core import models
from ddim_jax.interop import parity, weight_files
from ddim_torch_ref import weight_files as torch_weight_files
from ddim_torch_ref import models as torch_models

SMALL = dict(widths=(8, 16), block_depth=1)
NORMALIZER = {"mean": np.array([0.1, 0.2, 0.3], np.float32), "variance": np.array([0.04, 0.05, 0.06], np.float32)}


def random_variables(model, seed=3):
  """Random numbers in every tensor of ``model`` (BatchNorm variances positive): the file's round
  trips and checks need distinct values, not a calibrated network, and nothing here compiles."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 16))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.standard_normal(leaf.shape).astype(np.float32)
    return np.abs(value) + np.float32(0.5) if getattr(path[-1], "key", "") == "var" else value

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(params=["keras", "r"])
def small(request):
  model = models.create_model(request.param, **SMALL)
  return model, random_variables(model)


@pytest.mark.slow
def test_flax_file_flax_is_bit_exact(small, tmp_path):
  model, variables = small
  path = str(tmp_path / "w.safetensors")
  weight_files.save_weights(path, model, variables, NORMALIZER, 16, weights="ema", step=7)
  loaded_model, loaded, normalizer, metadata = weight_files.load_weights(path)
  assert loaded_model == model
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(variables) == jax.tree.structure(loaded)
  np.testing.assert_array_equal(normalizer["mean"], NORMALIZER["mean"])
  assert metadata["variant"] == model.variant and metadata["step"] == "7" and metadata["image_size"] == "16"


def test_file_is_the_torch_state_dict_both_ways(small, tmp_path):
  model, variables = small
  path = str(tmp_path / "w.safetensors")
  weight_files.save_weights(path, model, variables, NORMALIZER, 16)
  twin, normalizer, _ = torch_weight_files.load_weights(path)
  reference = parity.torch_twin(model, variables)
  for name, value in reference.state_dict().items():
    np.testing.assert_array_equal(twin.state_dict()[name].numpy(), value.numpy())
  np.testing.assert_array_equal(normalizer["variance"], NORMALIZER["variance"])
  # torch -> file -> Flax gives the original Flax variables back.
  path2 = str(tmp_path / "w2.safetensors")
  torch_weight_files.save_weights(path2, twin, NORMALIZER, 16)
  _, loaded, _, _ = weight_files.load_weights(path2)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_kernel_layout_is_oihw():
  model = models.create_model("keras", **SMALL)
  variables = models.init_variables(model, jax.random.key(0), 16)
  state = weight_files.flax_to_torch_state_dict(variables)
  kernel = np.asarray(variables["params"]["down_blocks_0"]["residual_blocks_0"]["conv1"]["kernel"])  # HWIO
  np.testing.assert_array_equal(state["down_blocks.0.residual_blocks.0.conv1.weight"], kernel.transpose(3, 2, 0, 1))
  assert set(state) == set(torch_models.create_model("keras", **SMALL).state_dict())


def _rewrite(path, out, mutate_tensors=None, mutate_meta=None):
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    meta = dict(f.metadata())
  tensors = load_file(path)
  if mutate_tensors:
    mutate_tensors(tensors)
  if mutate_meta:
    mutate_meta(meta)
  save_file(tensors, out, metadata=meta)
  return out


@pytest.fixture
def weight_file(tmp_path):
  model = models.create_model("keras", **SMALL)
  path = str(tmp_path / "good.safetensors")
  weight_files.save_weights(path, model, random_variables(model), NORMALIZER, 16)
  return path


def test_missing_tensor_is_named(weight_file, tmp_path):
  bad = _rewrite(weight_file, str(tmp_path / "b.safetensors"),
                 lambda t: t.pop("mid_blocks.0.conv2.weight"))
  with pytest.raises(weight_files.WeightFileError, match=r"mid_blocks.0.conv2.weight.*\(16, 16, 3, 3\)"):
    weight_files.load_weights(bad)
  with pytest.raises(ValueError, match=r"mid_blocks.0.conv2.weight.*\(16, 16, 3, 3\)"):
    torch_weight_files.load_weights(bad)


def test_wrong_shape_is_named(weight_file, tmp_path):
  def widen(t):
    t["head.weight"] = np.zeros((3, 9, 1, 1), np.float32)
  bad = _rewrite(weight_file, str(tmp_path / "b.safetensors"), widen)
  with pytest.raises(weight_files.WeightFileError, match=r"head.weight.*\(3, 9, 1, 1\).*expected \(3, 8, 1, 1\)"):
    weight_files.load_weights(bad)


def test_wrong_variant(weight_file, tmp_path):
  with pytest.raises(weight_files.WeightFileError, match="'keras' U-Net, expected 'r'"):
    weight_files.load_weights(weight_file, variant="r")
  # A keras file relabelled as r: the r model's tensors are missing.
  bad = _rewrite(weight_file, str(tmp_path / "b.safetensors"), mutate_meta=lambda m: m.update(variant="r"))
  with pytest.raises(weight_files.WeightFileError, match="missing tensor|has shape .* expected"):
    weight_files.load_weights(bad)


def test_truncated_foreign_and_absent_files(weight_file, tmp_path):
  data = open(weight_file, "rb").read()
  truncated = tmp_path / "t.safetensors"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(weight_files.WeightFileError, match="truncated or not a safetensors"):
    weight_files.load_weights(str(truncated))
  with pytest.raises(ValueError, match="truncated or not a safetensors"):
    torch_weight_files.load_weights(str(truncated))
  foreign = str(tmp_path / "f.safetensors")
  save_file({"x": np.zeros(3, np.float32)}, foreign)
  with pytest.raises(weight_files.WeightFileError, match="not a ddim-jax weight file"):
    weight_files.load_weights(foreign)
  with pytest.raises(weight_files.WeightFileError, match="does not exist"):
    weight_files.load_weights(str(tmp_path / "nope.safetensors"))


class _CodeOnUnpickle:
  """Unpickling this object runs code: it writes ``marker`` (what a malicious .pth file would do)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


@pytest.mark.parametrize("loader", ["ddim_jax", "ddim_torch_ref"])
def test_inception_pth_loaders_refuse_pickled_code(loader, tmp_path, monkeypatch):
  """The product's .pth loaders pass weights_only=True themselves, so a pickle that runs code is refused.

  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (set by users to read old checkpoints) turns torch.load's
  default into weights_only=False, but cannot override an explicit weights_only=True: a loader that
  relied on the default would run the payload here.
  """
  import pickle

  from ddim_jax.quality import inception_weights
  from ddim_torch_ref import inception as torch_inception
  monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
  monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
  marker = tmp_path / "payload_ran"
  path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
  torch.save({"fc.weight": torch.zeros(2, 2), "payload": _CodeOnUnpickle(marker)}, path)
  load = inception_weights.load_inception_weights if loader == "ddim_jax" else torch_inception.load
  try:
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights.only"):
      load(str(path))
  finally:
    assert not marker.exists(), "the loader unpickled the file and ran its code"


def test_torch_state_dict_converts_to_flax():
  # A state_dict of the torch twin (as torch.save writes it) converts to the Flax variables.
  import io
  buffer = io.BytesIO()
  torch.save(torch_models.create_model("keras", **SMALL).state_dict(), buffer)
  buffer.seek(0)
  state = torch.load(buffer, weights_only=True)
  model = models.create_model("keras", **SMALL)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 16))
  variables = weight_files.torch_state_dict_to_flax(state, reference)
  assert models.count_parameters(variables["params"]) == torch_models.count_parameters(
      torch_models.create_model("keras", **SMALL))


# ---------------------------------------------------------------------------------------------
# ddim-jax convert: the weight file to a torch file of the twin, and back.


def _convert(*argv) -> tuple[int, str, str]:
  import contextlib
  import io

  from ddim_jax import cli
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(["convert", *map(str, argv)])
  return code, out.getvalue(), err.getvalue()


def test_convert_to_torch_and_back_is_exact(small, tmp_path):
  model, variables = small
  path = tmp_path / "w.safetensors"
  weight_files.save_weights(str(path), model, variables, NORMALIZER, 16, weights="ema", step=7,
                            data={"dataset": "digits", "split_seed": 1})
  code, out, err = _convert(path, "--out", tmp_path / "w.pt")
  assert code == 0, err
  assert f"wrote {tmp_path / 'w.pt'} (variant={model.variant}, widths=8,16" in out
  # The state dict loads strictly into the twin, which then matches the twin read from the weight file.
  loaded = torch.load(tmp_path / "w.pt", weights_only=True)
  twin = torch_models.create_model(model.variant, **SMALL)
  twin.load_state_dict(loaded["state_dict"], strict=True)
  reference, _, _ = torch_weight_files.load_weights(str(path))
  for name, value in reference.state_dict().items():
    torch.testing.assert_close(twin.state_dict()[name], value, rtol=0, atol=0)
  np.testing.assert_array_equal(loaded["normalizer"]["variance"].numpy(), NORMALIZER["variance"])
  # And back: the same tensors and the same metadata as the original file.
  code, _, err = _convert(tmp_path / "w.pt", "--out", tmp_path / "back.safetensors")
  assert code == 0, err
  original, back = load_file(str(path)), load_file(str(tmp_path / "back.safetensors"))
  assert original.keys() == back.keys()
  for name in original:
    np.testing.assert_array_equal(original[name], back[name])
  assert weight_files.read_weight_file(str(tmp_path / "back.safetensors"))[1] == weight_files.read_weight_file(
      str(path))[1]


def test_convert_a_plain_state_dict_with_its_config(tmp_path):
  """torch.save(model.state_dict()) says nothing of its model or data: --config does, and the
  normaliser is the data's (the bundled digits here, built into a cache under tmp_path)."""
  from ddim_jax import configs, data
  overrides = ["--config.model.image_size=16", "--config.model.widths=(8,16)", "--config.model.block_depth=1",
               f"--config.data.cache_dir={tmp_path / 'cache'}"]
  twin = torch_models.create_model("keras", **SMALL)
  torch.save(twin.state_dict(), tmp_path / "plain.pt")
  code, _, err = _convert(tmp_path / "plain.pt", "--out", tmp_path / "w.safetensors")
  assert code == 2 and "plain state dict" in err and "--config" in err, err
  code, out, err = _convert(tmp_path / "plain.pt", "--out", tmp_path / "w.safetensors", "--config", "demo",
                            *overrides)
  assert code == 0, err
  assert "computed from the training split of data.dataset='digits'" in out, out
  _, variables, normalizer, metadata = weight_files.load_weights(str(tmp_path / "w.safetensors"))
  reference = twin.state_dict()
  for name, value in weight_files.flax_to_torch_state_dict(variables).items():
    np.testing.assert_array_equal(value, reference[name].numpy())
  config = configs.load_config("demo", overrides)
  expected = data.load_normalizer(config.data, 16)
  np.testing.assert_array_equal(normalizer["mean"], expected["mean"])
  assert metadata["image_size"] == "16" and weight_files.data_from_metadata(metadata)["dataset"] == "digits"
  # A config of another model names the tensor that does not fit; nothing is written.
  code, _, err = _convert(tmp_path / "plain.pt", "--out", tmp_path / "x.safetensors", "--config", "demo",
                          f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert code == 2 and "does not fit the config's model" in err and "widths=" in err, err
  assert not (tmp_path / "x.safetensors").exists()


def test_convert_refuses_bad_input_in_one_line(weight_file, tmp_path, monkeypatch):
  (tmp_path / "broken.pt").write_bytes(b"not a torch file")
  marker = tmp_path / "payload_ran"
  torch.save({"state_dict": {}, "payload": _CodeOnUnpickle(marker)}, tmp_path / "code.pt")
  monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
  cases = [
      ((weight_file, "--out", tmp_path / "w.npz"),
       "expected a .safetensors weight file, a .pt/.pth torch file, a Keras .weights.h5"),
      ((weight_file, "--out", tmp_path / "again.safetensors"), "from a weight file (.safetensors) to a torch file"),
      ((weight_file, "--out", tmp_path / "w.pt", "--config", "demo"), "drop --config"),
      ((weight_file, "--out", tmp_path / "w.pt", "--network", "raw"), "only for a .weights.h5 input"),
      ((tmp_path / "broken.pt", "--out", tmp_path / "w.weights.h5"), "convert to .safetensors first"),
      ((tmp_path / "missing.pt", "--out", tmp_path / "w.safetensors"), "does not exist"),
      ((tmp_path / "broken.pt", "--out", tmp_path / "w.safetensors"), "cannot read torch file"),
      ((tmp_path / "code.pt", "--out", tmp_path / "w.safetensors"), "weights_only=True"),
  ]
  for argv, message in cases:
    code, out, err = _convert(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
  assert not marker.exists(), "convert unpickled the file and ran its code"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "code.pt", "good.safetensors"]
