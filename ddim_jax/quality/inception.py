"""InceptionV3 feature extractor for KID (Flax linen, NHWC).

The network is torchvision's ``inception_v3`` without its classifier: it maps images to the
2048-d global-average-pooled activations of ``Mixed_7c``. Submodule names equal torchvision's
attribute names (``Mixed_5b/branch1x1/conv/kernel`` <-> ``Mixed_5b.branch1x1.conv.weight``), so a
torch state dict converts mechanically; ``ddim_torch_ref/inception.py`` is the NCHW twin.

Two weight flavours, told apart by the classifier size of the state dict:

* ``"torchvision"``: ``inception_v3_google-0cc3c7bd.pth`` (ImageNet, 1000 classes). Every pool
  branch is a 3x3/1 average pool whose zero padding counts in the mean (torch's
  ``count_include_pad=True``).
* ``"fid"``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF 2015 graph used by
  FID, 1008 classes). It patches the pool branches as that graph computes them: average pools of
  Mixed_5b..5d, Mixed_6b..6e and Mixed_7b exclude the padding (TF "SAME" pooling), and Mixed_7c's
  pool branch is a 3x3/1 *max* pool.

Input preprocessing (``preprocess``), the same for both flavours: bilinear resize with half-pixel
centres to ``image_size`` (75 = the Keras example, 299 = the R port), then ``2x - 1``.

* torchvision weights: ``inception_v3(weights=...)`` sets ``transform_input=True``, whose
  ``_transform_input`` maps ImageNet-normalised input ``(x - m_c)/s_c`` to
  ``(x - m_c)/0.5 + (m_c - 0.5)/0.5 = 2x - 1`` per channel c. The R port feeds it exactly that
  (mean/std normalise, then transform_input), so ``2x - 1`` equals it up to float rounding.
* fid weights: pytorch-fid's ``InceptionV3(normalize_input=True)`` computes ``2x - 1``. (The
  original TF graph subtracts 128 and divides by 128 on 0..255 pixels, i.e. ``1.992x - 1``;
  pytorch-fid, and this module, use ``2x - 1``.)
* Keras (the example's own encoder): ``preprocess_input`` is ``x/127.5 - 1`` on 0..255, i.e.
  ``2x - 1``. Keras' ImageNet weights themselves cannot be loaded here (no ``.h5`` reader); note
  that its architecture matches neither flavour exactly (BN without scale, and TF "SAME" average
  pools everywhere, including Mixed_7c), so KID values are comparable in trend, not digit for digit.

Resizing uses no antialiasing by default, as Keras' ``Resizing`` layer, torch's ``F.interpolate``
(pytorch-fid) and the R port do; for upscaling (64 -> 75 or 299) antialiasing has no effect anyway.
"""

import dataclasses
import functools
import os
import pickle
import re
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors

FLAVOURS = ("torchvision", "fid")
KERAS_IMAGE_SIZE = 75  # the Keras example's kid_image_size, Inception's minimum input
R_IMAGE_SIZE = 299  # the R port's kid_img_size, Inception's native size
MIN_IMAGE_SIZE = 75
FEATURE_DIM = 2048
BN_EPSILON = 1e-3  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001)

TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# The classifier width tells the flavours apart: ImageNet's 1000 classes vs the 2015 TF graph's 1008.
NUM_CLASSES = {"torchvision": 1000, "fid": 1008}


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """Which pool each block's pool branch uses: "avg" (padding counts), "avg_exclude_pad" or "max"."""
  mixed_5: str
  mixed_6: str
  mixed_7b: str
  mixed_7c: str


POOL_SPECS = {
    "torchvision": PoolSpec(mixed_5="avg", mixed_6="avg", mixed_7b="avg", mixed_7c="avg"),
    "fid": PoolSpec(mixed_5="avg_exclude_pad", mixed_6="avg_exclude_pad", mixed_7b="avg_exclude_pad",
                    mixed_7c="max"),
}


def get_pool_spec(flavour: str) -> PoolSpec:
  """Returns the pool-branch layout of weight ``flavour`` ('torchvision' or 'fid')."""
  if flavour not in POOL_SPECS:
    raise errors.ConfigError(f"unknown Inception flavour {flavour!r}; choose one of {FLAVOURS}")
  return POOL_SPECS[flavour]


def _pair(value) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _pool_branch(x: jax.Array, kind: str) -> jax.Array:
  """The 3x3 stride-1 'same' pool in front of a block's pool-branch 1x1 conv."""
  pad = ((1, 1), (1, 1))
  if kind == "max":
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=pad)  # pads with -inf, as torch does
  if kind not in ("avg", "avg_exclude_pad"):
    raise ValueError(f"unknown pool kind {kind!r}")
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=kind == "avg")


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel_size: Any  # int or (kh, kw)
  strides: int = 1
  padding: Any = 0  # torch-style symmetric padding: int or (ph, pw)
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b..5d (35x35 at 299 input): 1x1, 5x5, double 3x3 and pool branches."""
  pool_features: int
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, 1, name="branch1x1")(x)
    branch5x5 = conv(48, 1, name="branch5x5_1")(x)
    branch5x5 = conv(64, 5, padding=2, name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: the 35x35 -> 17x17 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, 3, strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17): factorised 1x7 / 7x1 branches."""
  channels_7x7: int
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name="branch1x1")(x)
    branch7x7 = conv(c7, 1, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    dbl = conv(c7, 1, name="branch7x7dbl_1")(x)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
    dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
    dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
    branch_pool = conv(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: the 17x17 -> 8x8 reduction."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, 1, name="branch3x3_1")(x)
    branch3x3 = conv(320, 3, strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b, 7c (8x8): expanded 1x3 / 3x1 branches."""
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, 1, name="branch1x1")(x)
    branch3x3 = conv(384, 1, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)
    dbl = conv(448, 1, name="branch3x3dbl_1")(x)
    dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(dbl)
    dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
    ], axis=-1)
    branch_pool = conv(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """InceptionV3 up to the global average pool: (B, H, W, 3) in [-1, 1] -> (B, 2048).

  Attributes:
    flavour: "torchvision" or "fid": the pool-branch layout of the weights (module docstring).
    precision: matmul precision of the convolutions (None: JAX's default; on GPUs that default
      may use TF32, which changes features by ~1e-3 relative; pass "highest" for parity checks).
  """
  flavour: str = "torchvision"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pools = get_pool_spec(self.flavour)
    p = self.precision
    x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, pool=pools.mixed_5, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, pool=pools.mixed_5, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, pool=pools.mixed_5, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, pool=pools.mixed_6, precision=p, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(pool=pools.mixed_7b, precision=p, name="Mixed_7b")(x)
    x = InceptionE(pool=pools.mixed_7c, precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array, image_size: int = KERAS_IMAGE_SIZE, antialias: bool = False) -> jax.Array:
  """Maps images in [0, 1] (B, H, W, C) to the network input: (B, S, S, 3) in [-1, 1].

  Args:
    images: (B, H, W, 3) or grayscale (B, H, W, 1) (repeated over 3 channels), values in [0, 1].
    image_size: the square side S the images are resized to (>= 75).
    antialias: antialias when downscaling (default off, like Keras' Resizing and torch's
      F.interpolate); upscaling is unaffected.

  Returns:
    ``2 * resized - 1`` in float32, or float64 for float64 input under x64 (see the module
    docstring for why ``2x - 1`` for both flavours).
  """
  if image_size < MIN_IMAGE_SIZE:
    raise errors.ConfigError(f"InceptionV3 needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
  images = jnp.asarray(images)
  images = images.astype(jnp.promote_types(images.dtype, jnp.float32))
  b, h, w, c = images.shape
  if c == 1:
    images = jnp.broadcast_to(images, (b, h, w, 3))
  elif c != 3:
    raise errors.InputError(f"expected 1 or 3 channels, got images of shape {images.shape}")
  if (h, w) != (image_size, image_size):
    # Half-pixel bilinear, as tf.image.resize and F.interpolate(align_corners=False).
    images = jax.image.resize(images, (b, image_size, image_size, 3), "bilinear", antialias=antialias)
  return images * 2.0 - 1.0


def feature_extractor(model: InceptionV3, variables: Mapping[str, Any], image_size: int = KERAS_IMAGE_SIZE,
                      antialias: bool = False) -> Callable[[jax.Array], jax.Array]:
  """A jitted ``images in [0, 1] (B, H, W, C) -> (B, 2048) features`` function.

  Args:
    model: the InceptionV3 module (its flavour must match the variables).
    variables: {"params", "batch_stats"}, e.g. from ``load_inception_weights``.
    image_size: 75 (Keras example) or 299 (R port).
    antialias: see ``preprocess``.
  """

  @jax.jit
  def features(variables, images):
    return model.apply(variables, preprocess(images, image_size, antialias))

  return lambda images: features(variables, images)


def init_variables(model: InceptionV3, rng: Optional[jax.Array] = None) -> Mapping[str, Any]:
  """Randomly initialised variables (for tests and shape templates; KID needs trained weights)."""
  rng = jax.random.key(0) if rng is None else rng
  return model.init(rng, jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32))


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
    if os.path.isfile(path):
      return path
    if os.path.exists(path):
      raise InceptionWeightsError(f"InceptionV3 weights {path!r} is not a regular file; pass the .pth file itself "
                                  f"(--inception-weights PATH, config key `inception_weights`)")
    raise errors.MissingInputError(missing_weights_message(f"no file at {path!r}"))
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
