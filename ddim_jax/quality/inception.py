"""InceptionV3 feature extractor for KID and FID (Flax linen, NHWC): images -> 2048-d pool features.

torchvision's ``inception_v3`` without its classifier, with torchvision's submodule names (so a torch
state dict converts mechanically: ``inception_weights``); ``ddim_torch_ref/inception.py`` is the NCHW
twin. Two weight flavours differ in their pool branches (``POOL_SPECS``): torchvision's ImageNet
weights and pytorch-fid's 2015 TF graph. Why both preprocess as ``2x - 1``, and how Keras' own
encoder differs: docs/metrics.md.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddim_jax import errors

FLAVOURS = ("torchvision", "fid")
KERAS_IMAGE_SIZE = 75  # the Keras example's kid_image_size, Inception's minimum input
R_IMAGE_SIZE = 299  # the R port's kid_img_size, Inception's native size
MIN_IMAGE_SIZE = 75
FEATURE_DIM = 2048
BN_EPSILON = 1e-3  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001)


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
    flavour: "torchvision" or "fid": the pool-branch layout of the weights (``POOL_SPECS``).
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
    docs/metrics.md for why ``2x - 1`` for both flavours).
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
