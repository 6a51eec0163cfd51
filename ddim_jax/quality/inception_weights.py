"""Reading InceptionV3 weights: torchvision's or pytorch-fid's ``.pth`` state dict -> Flax variables.

Files are read with ``torch.load(weights_only=True)`` (never unpickled); the flavour is told by the
classifier's size (1000 vs 1008 classes); every variable of ``inception.InceptionV3`` is filled
exactly once, and a missing, unexpected, mis-shaped or non-finite entry is one line naming it.
"""

import os
import pickle
import re
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors
from ddim_jax.quality.inception import KERAS_IMAGE_SIZE, InceptionV3, feature_extractor, init_variables

TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# torch.hub names a download <name>-<first 8 hex digits of its SHA-256>.pth: those of the published file.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
# The classifier width tells the flavours apart: ImageNet's 1000 classes vs the 2015 TF graph's 1008.
NUM_CLASSES = {"torchvision": 1000, "fid": 1008}


def _variable_shapes(model: InceptionV3) -> Mapping[str, Any]:
  shapes = jax.eval_shape(lambda: init_variables(model))
  return jax.tree.map(lambda s: s.shape, shapes)


class InceptionWeightsError(errors.InputError):
  """An InceptionV3 weights file that cannot be used (truncated, not a torch file, not a state dict)."""


class UnsafeInceptionWeightsError(InceptionWeightsError, pickle.UnpicklingError):
  """A ``.pth`` file holding pickled objects beyond tensors: refused (``torch.load(weights_only=True)``)."""


def missing_weights_message(looked_at: str) -> str:
  """The error text (one line) for absent InceptionV3 weights: both files, their sources, and how to pass them."""
  return (
      f"InceptionV3 weights for KID not found ({looked_at}). KID needs one of these torch state dict files: "
      f"{TORCHVISION_WEIGHTS_FILE} (torchvision's ImageNet InceptionV3, {TORCHVISION_WEIGHTS_URL}) or "
      f"{FID_WEIGHTS_FILE} (pytorch-fid's FID Inception, github.com/mseitzer/pytorch-fid release 'fid_weights', "
      f"{FID_WEIGHTS_URL}). Download one and pass its path with --inception-weights PATH (config key "
      f"`inception_weights`), or put it in {_torch_hub_dir()}.")


def missing_fid_weights_message(looked_at: str) -> str:
  """The one line said when the standard FID's weights are absent: the file, its source, where to put it."""
  return (f"FID not computed: the FID Inception weights {FID_WEIGHTS_FILE} were not found ({looked_at}). "
          f"Download {FID_WEIGHTS_URL} into {_torch_hub_dir()} or pass the file with --fid-weights PATH "
          f"(config key `eval.fid_weights`).")


def find_fid_weights(path: Optional[str] = None) -> str:
  """The weights file of the standard FID: ``path`` if given, else pytorch-fid's file in the torch hub cache.

  Raises:
    FileNotFoundError: with ``missing_fid_weights_message`` when no file is found.
  """
  if path:
    return _given_file(path, "FID Inception weights", "--fid-weights PATH, config key `eval.fid_weights`",
                       missing_fid_weights_message)
  candidate = os.path.join(_torch_hub_dir(), FID_WEIGHTS_FILE)
  if os.path.isfile(candidate):
    return candidate
  raise errors.MissingInputError(missing_fid_weights_message(f"none in {_torch_hub_dir()}"))


def _given_file(path: str, what: str, how: str, missing_message) -> str:
  """``path`` when it is a regular file; else the error naming it (``missing_message(looked_at)`` when
  nothing is there)."""
  if os.path.isfile(path):
    return path
  if os.path.exists(path):
    raise InceptionWeightsError(f"{what} {path!r} is not a regular file; pass the .pth file itself ({how})")
  raise errors.MissingInputError(missing_message(f"no file at {path!r}"))


def _torch_hub_dir() -> str:
  """Where torch.hub (torchvision, pytorch-fid) caches downloads: $TORCH_HOME/hub/checkpoints."""
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
  return os.path.join(torch_home, "hub", "checkpoints")


def find_inception_weights(path: Optional[str] = None) -> str:
  """Resolves the weights file: ``path`` if given, else a known file in the torch hub cache.

  Raises:
    FileNotFoundError: with ``missing_weights_message`` when no file is found.
  """
  if path:
    return _given_file(path, "InceptionV3 weights", "--inception-weights PATH, config key `inception_weights`",
                       missing_weights_message)
  for name in (TORCHVISION_WEIGHTS_FILE, FID_WEIGHTS_FILE):
    candidate = os.path.join(_torch_hub_dir(), name)
    if os.path.isfile(candidate):
      return candidate
  raise errors.MissingInputError(missing_weights_message(f"no path given and none in {_torch_hub_dir()}"))


def detect_flavour(state_dict: Mapping[str, Any]) -> str:
  """'torchvision' (fc of 1000 classes) or 'fid' (1008 classes) from a torch state dict."""
  if "fc.weight" not in state_dict:
    raise errors.InputError("cannot tell the Inception flavour: the state dict has no fc.weight; pass flavour=")
  shape = tuple(getattr(state_dict["fc.weight"], "shape", ()))
  if len(shape) != 2:
    raise errors.InputError(f"fc.weight has shape {shape}, expected (classes, 2048)")
  num_classes = shape[0]
  for flavour, n in NUM_CLASSES.items():
    if n == num_classes:
      return flavour
  raise errors.InputError(f"fc.weight has {num_classes} classes; expected 1000 (torchvision) or 1008 (fid)")


def _is_ignored_key(key: str) -> bool:
  # The classifiers are unused for features; torch adds num_batches_tracked to every BN.
  return key.startswith(("fc.", "AuxLogits.")) or key.endswith(".num_batches_tracked")


def _flax_location(key: str) -> Tuple[str, Tuple[str, ...], bool]:
  """torch key -> (collection, Flax path, transpose OIHW->HWIO?)."""
  if key.count(".") < 1:
    raise errors.InputError(f"unexpected key {key!r} in the InceptionV3 state dict")
  *modules, layer, leaf = key.split(".")
  table = {
      ("conv", "weight"): ("params", "kernel", True),
      ("bn", "weight"): ("params", "scale", False),
      ("bn", "bias"): ("params", "bias", False),
      ("bn", "running_mean"): ("batch_stats", "mean", False),
      ("bn", "running_var"): ("batch_stats", "var", False),
  }
  if (layer, leaf) not in table:
    raise errors.InputError(f"unexpected key {key!r} in the InceptionV3 state dict")
  collection, name, transpose = table[(layer, leaf)]
  return collection, (*modules, layer, name), transpose


def variables_from_state_dict(state_dict: Mapping[str, Any],
                              flavour: Optional[str] = None) -> Tuple[InceptionV3, Mapping[str, Any]]:
  """Converts a torchvision / pytorch-fid InceptionV3 state dict into Flax variables.

  Args:
    state_dict: torch key -> array-like (torch tensors or NumPy arrays).
    flavour: "torchvision" | "fid"; None detects it from fc.weight (1000 vs 1008 classes).

  Returns:
    ``(model, {"params": ..., "batch_stats": ...})``, every key of the network filled exactly once.

  Raises:
    ValueError: on missing, unexpected or mis-shaped entries.
  """
  flavour = detect_flavour(state_dict) if flavour is None else flavour
  model = InceptionV3(flavour=flavour)
  expected = {
      (coll, *path): shape
      for coll, tree in _variable_shapes(model).items()
      for path, shape in _flatten(tree)
  }
  found = {}
  for key, value in state_dict.items():
    if _is_ignored_key(key):
      continue
    collection, path, transpose = _flax_location(key)
    location = (collection, *path)
    if location not in expected:
      raise errors.InputError(f"unexpected key {key!r} for the {flavour} InceptionV3")
    try:
      array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
    except (TypeError, ValueError, RuntimeError) as e:
      raise errors.InputError(f"{key}: not a tensor of numbers ({type(value).__name__})") from e
    if not np.all(np.isfinite(array)):
      raise errors.InputError(f"{key} holds NaN or inf values")
    if collection == "batch_stats" and path[-1] == "var" and np.any(array < 0):
      raise errors.InputError(f"{key} holds negative BatchNorm variances")
    if transpose:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.shape != tuple(expected[location]):
      raise errors.InputError(f"{key}: shape {array.shape} (after conversion), expected {expected[location]}")
    found[location] = jnp.asarray(array)
  missing = sorted(".".join(loc) for loc in expected if loc not in found)
  if missing:
    raise errors.InputError(f"{len(missing)} InceptionV3 variables missing from the state dict, e.g. {missing[:3]}")
  return model, _unflatten(found)


def load_inception_weights(path: Optional[str] = None,
                           flavour: Optional[str] = None) -> Tuple[InceptionV3, Mapping[str, Any]]:
  """Loads torchvision's or pytorch-fid's InceptionV3 ``.pth`` into ``(model, variables)``.

  Args:
    path: the ``.pth`` file; None looks for a known file in the torch hub cache.
    flavour: "torchvision" | "fid"; None detects it from the classifier size.

  Raises:
    FileNotFoundError: no weights file; the message names both files and where to get them.
  """
  path = find_inception_weights(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel  (torch only to read the file)
  except ImportError as e:
    raise errors.MissingDependencyError(
        f"reading the InceptionV3 weights {path} needs PyTorch: pip install 'ddim-jax[torch]' (the CPU build is "
        "enough; see the README's Set-up)") from e
  fix = (f"download {TORCHVISION_WEIGHTS_FILE} or {FID_WEIGHTS_FILE} again and pass it with --inception-weights "
         f"(config key `inception_weights`)")
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # weights_only=True met an object that is not a tensor: never unpickled
    detail = [line.strip() for line in str(e).splitlines() if "Unsupported" in line or "Unpickler error" in line]
    detail = re.sub(r"\. Please use .*", "", detail[0])[:200] if detail else type(e).__name__
    raise UnsafeInceptionWeightsError(
        f"InceptionV3 weights {path!r} refused: it holds pickled Python objects besides tensors, which "
        f"torch.load(weights_only=True) does not run ({detail}); {fix}") from None
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types for garbage files
    raise InceptionWeightsError(f"cannot read InceptionV3 weights {path!r} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); it is "
                                f"truncated or not a torch .pth file: {fix}") from None
  if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
    raise InceptionWeightsError(f"InceptionV3 weights {path!r} hold a {type(state_dict).__name__}, not a state dict "
                                f"(names -> tensors); {fix}")
  try:
    return variables_from_state_dict(state_dict, flavour)
  except errors.InputError as e:
    raise InceptionWeightsError(f"InceptionV3 weights {path!r}: {e}; {fix}") from None


def inception_feature_fn(path: Optional[str] = None, image_size: int = KERAS_IMAGE_SIZE,
                         flavour: Optional[str] = None) -> Callable[[jax.Array], jax.Array]:
  """``load_inception_weights`` + ``feature_extractor``: images in [0, 1] -> (B, 2048) features."""
  model, variables = load_inception_weights(path, flavour)
  return feature_extractor(model, variables, image_size)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree
