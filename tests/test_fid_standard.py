"""The standard FID (issue 32) against pytorch-fid's own code.

pytorch-fid 0.3.0 (the dev extra) is the reference: its network ``pytorch_fid.inception.InceptionV3([3])``
(``resize_input=True``: ``F.interpolate`` bilinear to 299, ``align_corners=False``; ``normalize_input=True``:
``2x - 1``; its ``fid_inception_v3`` = torchvision's ``inception_v3`` patched with its FIDInception* blocks)
and its ``calculate_frechet_distance`` on ``calculate_activation_statistics``' mu/sigma (``np.mean``,
``np.cov(rowvar=False)``). The real FID weights are not available offline: pytorch-fid's network gets
ONE random (calibrated, 1008-class) state dict through its download function, and our JAX Inception
reads the same state dict from a .pth file, as ``evaluate --fid-weights`` does.
"""

import importlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from ddim_jax.inference import evaluation
from ddim_jax.quality import inception, inception_weights, metrics
from ddim_jax.training import reporting
from inception_helpers import random_torch_inception

INSTALL = "pip install 'pytorch-fid==0.3.0' (the dev extra: make setup, or pip install -e '.[torch,dev]')"


def load_pytorch_fid():
  """pytorch-fid's ``inception`` and ``fid_score`` modules, over torchvision's own Python model code.

  Why this loader: pytorch-fid imports torchvision, and the torchvision wheel that matches torch
  2.13.0 on PyPI (0.28.0) is CUDA-linked: on a CPU-only torch, ``import torchvision`` fails in its
  ``__init__`` ("RuntimeError: operator torchvision::nms does not exist": it registers kernels of its
  C++ extension, which needs libtorch_cuda). pytorch-fid needs only ``torchvision.__version__`` and
  ``torchvision.models.inception_v3`` (pure Python, torchvision/models/inception.py), so torchvision
  is registered as a bare package (its installed folder as ``__path__``, its installed version)
  without running its ``__init__``; its submodules then import as usual. The entries are taken out
  of ``sys.modules`` afterwards (the returned modules keep what they imported), so no other test
  sees this torchvision.

  Raises:
    pytest.fail (not a skip): pytorch-fid or torchvision is not installed, with what to install.
  """
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("pytorch_fid") is None:
    pytest.fail(f"pytorch-fid (and the torchvision it depends on) is not installed: {INSTALL}")
  before = {name for name in sys.modules if name.split(".")[0] in ("torchvision", "pytorch_fid")}
  package = types.ModuleType("torchvision")
  package.__path__ = list(spec.submodule_search_locations)
  package.__file__ = spec.origin
  package.__version__ = importlib.metadata.version("torchvision")
  saved = {name: sys.modules.pop(name) for name in before}
  sys.modules["torchvision"] = package
  try:
    pytorch_fid_inception = importlib.import_module("pytorch_fid.inception")
    fid_score = importlib.import_module("pytorch_fid.fid_score")
  except ImportError as e:
    pytest.fail(f"cannot import pytorch-fid over torchvision's model code ({e}): {INSTALL}")
  finally:
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "pytorch_fid")]:
      del sys.modules[name]
    sys.modules.update(saved)
  return pytorch_fid_inception, fid_score


@pytest.fixture(scope="module")
def pytorch_fid():
  return load_pytorch_fid()


@pytest.fixture(scope="module")
def fid_state_dict_file(tmp_path_factory):
  """(state dict, .pth path) of a random FID Inception (1008 classes), calibrated at 299 px so its
  features are O(1) there."""
  state_dict = random_torch_inception("fid", seed=21, image_size=inception.R_IMAGE_SIZE, num_images=4).state_dict()
  path = tmp_path_factory.mktemp("fid_inception") / "random_fid_inception.pth"
  torch.save(state_dict, path)
  return state_dict, str(path)


@pytest.fixture(scope="module")
def features(pytorch_fid, fid_state_dict_file):
  """pytorch-fid's and our features of the same 64x64 images: {"ours"/"pytorch_fid": (real, generated)}."""
  pytorch_fid_inception, _ = pytorch_fid
  state_dict, path = fid_state_dict_file
  # Only the download is replaced: fid_inception_v3 builds torchvision's inception_v3, patches the
  # FID blocks and load_state_dict()s (strictly) what load_state_dict_from_url returns.
  original = pytorch_fid_inception.load_state_dict_from_url
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
  try:
    network = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pytorch_fid_inception.load_state_dict_from_url = original
  assert network.resize_input and network.normalize_input
  rng = np.random.default_rng(32)
  real = rng.random((12, 64, 64, 3), dtype=np.float32)
  generated = np.clip(real + rng.normal(0.0, 0.2, real.shape), 0.0, 1.0).astype(np.float32)
  with torch.no_grad():
    theirs = [network(torch.from_numpy(x).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy() for x in (real, generated)]
  # Ours as `evaluate` computes them: the settings of the weights file, its feature function.
  settings = evaluation.InceptionSettings.of(path, metrics.STANDARD_FID_IMAGE_SIZE)
  assert (settings.flavour, settings.image_size, settings.fid_name) == ("fid", 299, "fid")
  assert not settings.published_fid_weights  # random weights: not pytorch-fid's published file
  feature_fn = settings.feature_fn()
  ours = [np.asarray(feature_fn(x)) for x in (real, generated)]
  return {"ours": ours, "pytorch_fid": theirs}


def test_pytorch_fid_loads_without_torchvisions_init():
  def loaded():
    return {name: module for name, module in sys.modules.items() if name.split(".")[0] in ("torchvision", "pytorch_fid")}

  before = loaded()
  pytorch_fid_inception, fid_score = load_pytorch_fid()
  assert pytorch_fid_inception.FID_WEIGHTS_URL == inception_weights.FID_WEIGHTS_URL
  assert callable(fid_score.calculate_frechet_distance)
  assert callable(pytorch_fid_inception.torchvision.models.inception_v3)  # torchvision's own model code
  assert loaded() == before  # sys.modules as it was: no other test sees this torchvision


@pytest.mark.slow
def test_features_equal_pytorch_fids_network(features):
  """64x64 images, resized to 299 and scaled to [-1, 1] by both, through the same weights."""
  for ours, theirs in zip(features["ours"], features["pytorch_fid"]):
    assert ours.shape == theirs.shape == (12, inception.FEATURE_DIM)
    scale = float(np.abs(theirs).max())
    assert scale > 0.5 and theirs.std() > 0.1  # calibrated: O(1), not degenerate
    diff = float(np.abs(ours - theirs).max())
    print(f"features: max|diff| {diff:.3g}, max|feature| {scale:.3g}, relative {diff / scale:.3g}")
    # float32: measured 3.0e-5 (AVX-512; 4.6e-5 with other weights and images); the net amplifies float32 rounding (torch float32 alone is
    # ~1e-4 relative from float64, inception_helpers), so relative to the feature scale, with room.
    assert diff <= 2e-4 * scale


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy's sqrtm(disp=False) in pytorch-fid
def test_fid_equals_pytorch_fids(pytorch_fid, features):
  _, fid_score = pytorch_fid

  def statistics(f):  # calculate_activation_statistics
    return np.mean(f, axis=0), np.cov(f, rowvar=False)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # sqrtm of a singular product (12 images, 2048 features)
    want = float(fid_score.calculate_frechet_distance(*statistics(features["pytorch_fid"][0]),
                                                      *statistics(features["pytorch_fid"][1])))
  got = metrics.fid_from_features(*features["ours"])
  same_features = metrics.fid_from_features(*features["pytorch_fid"])
  print(f"FID: pytorch-fid {want:.6f}, ours {got:.6f} (relative {abs(got - want) / want:.3g}), our formula on "
        f"pytorch-fid's features {same_features:.6f} (relative {abs(same_features - want) / want:.3g})")
  assert want > 1.0
  # Measured 4.6e-7 (1.5e-6 with other weights and images) and 1.8e-7 (the formulas alone: sqrtm's
  # round-off on a singular product).
  assert got == pytest.approx(want, rel=1e-4)
  assert same_features == pytest.approx(want, rel=1e-5)
  mu, sigma = metrics.feature_statistics(features["pytorch_fid"][0])
  want_mu, want_sigma = statistics(features["pytorch_fid"][0])
  # np.mean of float32 activations is float32 in pytorch-fid (ours: float64); np.cov is float64 in both.
  np.testing.assert_allclose(mu, want_mu, rtol=1e-6)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-12, atol=1e-15)


def test_fid_names_say_their_settings():
  assert metrics.fid_name("fid", 299) == "fid"  # the standard FID alone is "fid"
  assert metrics.fid_name("torchvision", 75) == "fid_torchvision_75px"
  assert metrics.fid_name("torchvision", 299) == "fid_torchvision_299px"
  assert metrics.fid_name("fid", 75) == "fid_inception2015_75px"
  with pytest.raises(ValueError, match="flavour"):
    metrics.fid_name("keras", 75)
  settings = evaluation.InceptionSettings("w.pth", "torchvision", 75, "0" * 16)
  assert evaluation.training_fid_metric(settings) == "val_fid_torchvision_75px"
  assert "not comparable" in evaluation.fid_comparability_note(settings)
  standard = evaluation.InceptionSettings("pt.pth", "fid", 299, inception_weights.FID_WEIGHTS_SHA256_PREFIX + "0" * 8)
  assert standard.published_fid_weights and evaluation.fid_comparability_note(standard) is None
  assert evaluation.training_fid_metric(standard) == evaluation.FID_METRIC == "val_fid"
  for name, tag in (("val_kid", "val/kid"), ("val_fid", "val/fid"), ("val_fid_torchvision_75px",
                                                                     "val/fid_torchvision_75px"), ("loss", "train/loss")):
    assert reporting.tensorboard_tag(name) == tag


def test_missing_fid_weights_is_one_line_saying_where_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
  settings, message = evaluation.fid_settings(None)
  assert settings is None and "\n" not in message
  hub = str(tmp_path / "torch" / "hub" / "checkpoints")
  for needle in (inception_weights.FID_WEIGHTS_URL, hub, "--fid-weights", "eval.fid_weights"):
    assert needle in message, (needle, message)
  with pytest.raises(FileNotFoundError, match="--fid-weights"):  # a file asked for is not skipped
    evaluation.fid_settings(str(tmp_path / "nowhere.pth"))
  # pytorch-fid's file name in the hub cache is found (the default).
  (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
  in_hub = tmp_path / "torch" / "hub" / "checkpoints" / inception_weights.FID_WEIGHTS_FILE
  in_hub.write_bytes(b"")  # found by name (read later, by InceptionSettings.of)
  assert inception_weights.find_fid_weights(None) == str(in_hub)


def test_training_without_fid_weights_warns_once_and_logs_kid(tmp_path, monkeypatch, inception_file):
  from train_helpers import tiny_config
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  config = tiny_config(tmp_path / "cache", **{"train.kid_every": 2, "eval.inception_weights": inception_file})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert evaluation.make_training_kid(config, None, np.zeros((4, 16, 16, 3), np.uint8)) is not None
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and messages[0].startswith("FID not computed") and "\n" not in messages[0], messages
  assert inception_weights.FID_WEIGHTS_URL in messages[0]
  bad = tiny_config(tmp_path / "cache", **{"train.kid_every": 2, "eval.inception_weights": inception_file,
                                           "eval.fid_image_size": 64})
  with pytest.raises(ValueError, match="eval.fid_image_size"):
    evaluation.make_training_kid(bad, None, np.zeros((4, 16, 16, 3), np.uint8))
