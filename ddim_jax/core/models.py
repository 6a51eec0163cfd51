"""The noise-prediction U-Net of the Keras DDIM example, and the R blog's variant (Flax, NHWC).

The network maps ``(noisy_images (B, H, W, C), noise_variances (B, 1, 1, 1)) -> pred_noises``.
Two variants share the building blocks (``ddim_torch_ref/models.py`` is the NCHW twin):

* ``keras`` (canonical): widths 32/64/96/128, 3 down levels, 2 bottleneck blocks at the last
  width, BatchNorm without affine parameters (Keras defaults: keep-momentum 0.99, eps 1e-3), a 1x1
  residual projection only where the width changes, glorot-uniform kernels and zero biases.
  1,950,627 parameters plus 2,880 BatchNorm statistics at the default widths.
* ``r`` (Falbel & Keydana's R torch code): a down level for every width, a 128 -> 256 -> 128
  middle, an up level for every width, torch-default BatchNorm (affine, momentum 0.1, eps 1e-5),
  a 1x1 projection on every residual and torch-default initialisation. 3,562,211 parameters.

Submodule names are chosen so that ``convert.py`` maps them to the torch twin mechanically:
``down_blocks_0/residual_blocks_1/conv1/kernel`` <-> ``down_blocks.0.residual_blocks.1.conv1.weight``.
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors

VARIANTS = ("keras", "r")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """The per-variant numerics that differ between the Keras and the R U-Net."""
  bn_momentum: float  # Flax/Keras convention: the fraction KEPT (torch momentum = 1 - this).
  bn_epsilon: float
  bn_affine: bool
  always_project: bool  # a 1x1 conv on every residual (R), or only where the width changes (Keras)
  torch_init: bool  # torch-default init (R) instead of glorot-uniform kernels / zero biases (Keras)


VARIANT_SPECS = {
    "keras": VariantSpec(bn_momentum=0.99, bn_epsilon=1e-3, bn_affine=False, always_project=False, torch_init=False),
    "r": VariantSpec(bn_momentum=0.9, bn_epsilon=1e-5, bn_affine=True, always_project=True, torch_init=True),
}


def get_variant_spec(variant: str) -> VariantSpec:
  """Returns the numerics of U-Net ``variant`` ('keras' or 'r')."""
  if variant not in VARIANT_SPECS:
    raise errors.ConfigError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
  return VARIANT_SPECS[variant]


def angular_speeds(embedding_dims: int, min_frequency: float = 1.0, max_frequency: float = 1000.0) -> np.ndarray:
  """The embedding's angular speeds 2*pi*f_k, f_k log-spaced in [min, max] frequency.

  Formed once in float64 and rounded to float32 so that both twins multiply the same numbers:
  angles reach 2*pi*1000 rad, where one float32 ulp is ~5e-4 rad, so forming them differently
  in two frameworks alone costs ~5e-4 of parity.
  """
  frequencies = np.exp(np.linspace(math.log(min_frequency), math.log(max_frequency), embedding_dims // 2))
  return (2.0 * math.pi * frequencies).astype(np.float32)


def sinusoidal_embedding(noise_variances, embedding_dims: int = 32, min_frequency: float = 1.0,
                         max_frequency: float = 1000.0):
  """sin-then-cos embedding of the noise variance.

  Args:
    noise_variances: (B, 1, 1, 1) float array (the squared noise rates).

  Returns:
    (B, 1, 1, embedding_dims) embedding: [sin(w_k v) for k] + [cos(w_k v) for k].
  """
  speeds = jnp.asarray(angular_speeds(embedding_dims, min_frequency, max_frequency)).reshape(1, 1, 1, -1)
  angles = speeds * noise_variances
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def upsample2x_bilinear(x):
  """x2 bilinear upsampling with half-pixel centres (Keras UpSampling2D, torch align_corners=False).

  For a factor of 2 the interpolation weights are exactly 3/4 and 1/4, with the edge pixel
  repeated; written out like this it is a cheap separable stencil instead of the dense resize
  matrices of ``jax.image.resize``, and exact to float32 rounding against both.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, 2H, 2W, C).
  """
  def along(axis, y):
    n = y.shape[axis]
    prev = jnp.concatenate([lax_slice(y, axis, 0, 1), lax_slice(y, axis, 0, n - 1)], axis=axis)
    nxt = jnp.concatenate([lax_slice(y, axis, 1, n), lax_slice(y, axis, n - 1, n)], axis=axis)
    even = 0.75 * y + 0.25 * prev
    odd = 0.75 * y + 0.25 * nxt
    stacked = jnp.stack([even, odd], axis=axis + 1)
    shape = list(y.shape)
    shape[axis] = 2 * n
    return stacked.reshape(shape)

  return along(2, along(1, x))


def lax_slice(x, axis, start, stop):
  """x[..., start:stop, ...] along ``axis``."""
  return jax.lax.slice_in_dim(x, start, stop, axis=axis)


def avg_pool2x2(x):
  """2x2 average pooling with stride 2 on (B, H, W, C)."""
  return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def torch_default_bias_init(fan_in: int):
  """torch.nn.Conv2d's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel_size: int, in_features: int, spec: VariantSpec, name: str,
         dtype: Any = jnp.float32, zero_init: bool = False) -> nn.Conv:
  """A stride-1 'SAME' convolution with the variant's initialisation."""
  if zero_init:
    kernel_init, bias_init = nn.initializers.zeros, nn.initializers.zeros
  elif spec.torch_init:
    # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3).
    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    bias_init = torch_default_bias_init(in_features * kernel_size * kernel_size)
  else:
    kernel_init, bias_init = nn.initializers.glorot_uniform(), nn.initializers.zeros
  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME", kernel_init=kernel_init,
                 bias_init=bias_init, dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """Pre-norm residual block: BN -> conv3x3 -> swish -> conv3x3, plus a (projected) skip."""
  width: int
  spec: VariantSpec
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    in_features = x.shape[-1]
    if self.spec.always_project or in_features != self.width:
      residual = conv(self.width, 1, in_features, self.spec, "proj", self.dtype)(x)
    else:
      residual = x
    h = nn.BatchNorm(
        use_running_average=not train, momentum=self.spec.bn_momentum, epsilon=self.spec.bn_epsilon,
        use_bias=self.spec.bn_affine, use_scale=self.spec.bn_affine, use_fast_variance=False,
        axis_name=self.bn_axis_name, dtype=self.dtype, name="norm")(x)
    h = conv(self.width, 3, in_features, self.spec, "conv1", self.dtype)(h)
    h = nn.swish(h)
    h = conv(self.width, 3, self.width, self.spec, "conv2", self.dtype)(h)
    return h + residual


class DownBlock(nn.Module):
  """``block_depth`` residual blocks (each output pushed onto ``skips``), then 2x2 average pooling."""
  width: int
  block_depth: int
  spec: VariantSpec
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, skips: list, train: bool):
    for j in range(self.block_depth):
      x = ResidualBlock(self.width, self.spec, self.bn_axis_name, self.dtype, name=f"residual_blocks_{j}")(x, train)
      skips.append(x)
    return avg_pool2x2(x)


class UpBlock(nn.Module):
  """x2 bilinear upsampling, then ``block_depth`` times: concat [x, skips.pop()] -> residual block."""
  width: int
  block_depth: int
  spec: VariantSpec
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, skips: list, train: bool):
    x = upsample2x_bilinear(x)
    for j in range(self.block_depth):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = ResidualBlock(self.width, self.spec, self.bn_axis_name, self.dtype, name=f"residual_blocks_{j}")(x, train)
    return x


class UNet(nn.Module):
  """The noise-prediction U-Net; ``variant`` selects the Keras or the R topology.

  Attributes:
    variant: 'keras' or 'r'.
    widths: channel widths of the levels.
    block_depth: residual blocks per level.
    embedding_dims: size of the sinusoidal noise-variance embedding.
    channels: image channels (3).
    embedding_min_frequency, embedding_max_frequency: embedding frequency range.
    bn_axis_name: named axis over which BatchNorm statistics are averaged (data-parallel steps).
    dtype: computation dtype (params stay float32); bfloat16 for mixed precision.
  """
  variant: str = "keras"
  widths: Sequence[int] = (32, 64, 96, 128)
  block_depth: int = 2
  embedding_dims: int = 32
  channels: int = 3
  embedding_min_frequency: float = 1.0
  embedding_max_frequency: float = 1000.0
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, noisy_images, noise_variances, train: bool = False):
    """Predicts the noise in ``noisy_images`` (B, H, W, C) at ``noise_variances`` (B, 1, 1, 1)."""
    spec = get_variant_spec(self.variant)
    batch, height, width, in_channels = noisy_images.shape
    level_args = dict(block_depth=self.block_depth, spec=spec, bn_axis_name=self.bn_axis_name, dtype=self.dtype)

    e = sinusoidal_embedding(noise_variances, self.embedding_dims, self.embedding_min_frequency,
                             self.embedding_max_frequency)
    # Materialise the (B, 1, 1, E) embedding before the broadcast: otherwise XLA fuses it (and the
    # draw of the diffusion times before it) into the broadcast-concatenate below and recomputes the
    # sines and cosines for every pixel. XLA:CPU removes an optimization_barrier before fusion; a
    # dot with the identity is never fused into an elementwise loop and is exact (x * 1 plus zeros).
    e = jnp.einsum("bhwe,ef->bhwf", e, jnp.eye(self.embedding_dims, dtype=e.dtype),
                   precision=jax.lax.Precision.HIGHEST)
    e = jnp.broadcast_to(e, (batch, height, width, self.embedding_dims)).astype(self.dtype)
    stem_width = self.widths[0] if self.variant == "keras" else self.embedding_dims
    x = conv(stem_width, 1, in_channels, spec, "stem", self.dtype)(noisy_images)
    x = jnp.concatenate([x, e], axis=-1)

    down_widths = self.widths[:-1] if self.variant == "keras" else self.widths
    skips = []
    for i, w in enumerate(down_widths):
      x = DownBlock(w, name=f"down_blocks_{i}", **level_args)(x, skips, train)

    if self.variant == "keras":
      mid_widths = [self.widths[-1]] * self.block_depth
    else:
      mid_widths = [2 * self.widths[-1], self.widths[-1]]
    for j, w in enumerate(mid_widths):
      x = ResidualBlock(w, spec, self.bn_axis_name, self.dtype, name=f"mid_blocks_{j}")(x, train)

    if self.variant == "keras":
      up_widths = list(reversed(self.widths[:-1]))
    else:  # R: up(128->96), up(96->64), up(64->32), up(32->embedding_dims)
      up_widths = list(reversed(self.widths[:-1])) + [self.embedding_dims]
    for i, w in enumerate(up_widths):
      x = UpBlock(w, name=f"up_blocks_{i}", **level_args)(x, skips, train)

    x = conv(self.channels, 1, x.shape[-1], spec, "head", self.dtype, zero_init=True)(x)
    return x.astype(jnp.float32)


# config.model.dtype names -> computation dtypes (parameters are float32 in both).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(dtype) -> Any:
  """``config.model.dtype`` ("float32" / "bfloat16", or a dtype) -> the jnp dtype; errors name the key."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise errors.ConfigError(f"config.model.dtype={dtype!r} is invalid: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise errors.ConfigError(f"model dtype {dtype} is not supported: use float32 or bfloat16")
  return dtype


# Generous bounds of the hyper-parameters (``hyperparameter_problem``): far beyond any model of this
# project, small enough that a bad value is refused before it builds a model that exhausts memory.
MAX_WIDTH = 4096
MAX_LEVELS = 10  # widths: 2..MAX_LEVELS entries (each down level halves the image)
MAX_BLOCK_DEPTH = 16
MAX_EMBEDDING_DIMS = 4096
MAX_CHANNELS = 4  # gray, RGB, RGBA
MAX_IMAGE_SIZE = 1024


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def hyperparameter_problem(widths, block_depth, embedding_dims, channels) -> str | None:
  """What is wrong with these U-Net hyper-parameters (naming the key and the allowed range), or None."""
  widths = tuple(widths) if isinstance(widths, (tuple, list)) else widths
  if (not isinstance(widths, tuple) or not 2 <= len(widths) <= MAX_LEVELS
      or not all(_is_int(w) and 1 <= w <= MAX_WIDTH for w in widths)):
    return f"widths must be 2 to {MAX_LEVELS} integers in 1..{MAX_WIDTH}, got {widths!r}"
  if not _is_int(block_depth) or not 1 <= block_depth <= MAX_BLOCK_DEPTH:
    return f"block_depth must be an integer in 1..{MAX_BLOCK_DEPTH}, got {block_depth!r}"
  if not _is_int(embedding_dims) or not 2 <= embedding_dims <= MAX_EMBEDDING_DIMS or embedding_dims % 2:
    return f"embedding_dims must be an even integer in 2..{MAX_EMBEDDING_DIMS}, got {embedding_dims!r}"
  if not _is_int(channels) or not 1 <= channels <= MAX_CHANNELS:
    return f"channels must be an integer in 1..{MAX_CHANNELS}, got {channels!r}"
  return None


def image_size_problem(variant: str, widths, image_size) -> str | None:
  """What is wrong with ``image_size`` for a U-Net of ``variant`` and ``widths`` (see ``check_image_size``), or None."""
  levels = len(widths) - 1 if variant == "keras" else len(widths)
  if not _is_int(image_size) or not 1 <= image_size <= MAX_IMAGE_SIZE or image_size % (2 ** levels):
    return (f"image_size must be a multiple of {2 ** levels} in 1..{MAX_IMAGE_SIZE} for the {variant} U-Net with "
            f"{len(widths)} widths ({levels} 2x2 poolings), got {image_size!r}")
  return None


def create_model(variant: str = "keras", widths=(32, 64, 96, 128), block_depth: int = 2, embedding_dims: int = 32,
                 channels: int = 3, bn_axis_name=None, dtype="float32", **unused) -> UNet:
  """Builds a UNet after checking its hyper-parameters (errors name the bad value).

  ``dtype``: the computation dtype ("float32", "bfloat16" or a jnp dtype); parameters stay float32.
  """
  get_variant_spec(variant)
  dtype = compute_dtype(dtype)
  problem = hyperparameter_problem(widths, block_depth, embedding_dims, channels)
  if problem:
    raise errors.ConfigError(f"config.model.{problem}")
  widths = tuple(int(w) for w in widths)
  return UNet(variant=variant, widths=widths, block_depth=int(block_depth), embedding_dims=int(embedding_dims),
              channels=int(channels), bn_axis_name=bn_axis_name, dtype=dtype)


def check_image_size(model: UNet, image_size: int) -> None:
  """Raises if ``image_size`` cannot be halved once per down level of ``model``."""
  problem = image_size_problem(model.variant, model.widths, image_size)
  if problem:
    raise errors.ConfigError(problem)


def init_variables(model: UNet, key, image_size: int):
  """Initialises ``{'params', 'batch_stats'}`` for (1, image_size, image_size, channels) inputs."""
  check_image_size(model, image_size)
  images = jnp.zeros((1, image_size, image_size, model.channels), jnp.float32)
  variances = jnp.zeros((1, 1, 1, 1), jnp.float32)
  return dict(model.init(key, images, variances, train=False))


def count_parameters(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
