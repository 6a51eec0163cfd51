"""The noise-prediction U-Net in PyTorch (NCHW), the twin of ``ddim_jax/core/models.py``.

Same variants, same numerics, same submodule names (``down_blocks.0.residual_blocks.1.conv1``
here is ``down_blocks_0/residual_blocks_1/conv1`` there). BatchNorm follows the Flax/Keras
convention in both variants (see ``BatchNorm``) so that running statistics agree too.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("keras", "r")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """The per-variant numerics that differ between the Keras and the R U-Net."""
  bn_momentum: float  # Flax/Keras convention: the fraction KEPT (torch momentum = 1 - this).
  bn_epsilon: float
  bn_affine: bool
  always_project: bool
  torch_init: bool


VARIANT_SPECS = {
    "keras": VariantSpec(bn_momentum=0.99, bn_epsilon=1e-3, bn_affine=False, always_project=False, torch_init=False),
    "r": VariantSpec(bn_momentum=0.9, bn_epsilon=1e-5, bn_affine=True, always_project=True, torch_init=True),
}


def get_variant_spec(variant: str) -> VariantSpec:
  """Returns the numerics of U-Net ``variant`` ('keras' or 'r')."""
  if variant not in VARIANT_SPECS:
    raise ValueError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
  return VARIANT_SPECS[variant]


def angular_speeds(embedding_dims: int, min_frequency: float = 1.0, max_frequency: float = 1000.0) -> np.ndarray:
  """2*pi*f_k with f_k log-spaced in [min, max], formed in float64 and rounded to float32."""
  frequencies = np.exp(np.linspace(math.log(min_frequency), math.log(max_frequency), embedding_dims // 2))
  return (2.0 * math.pi * frequencies).astype(np.float32)


def sinusoidal_embedding(noise_variances, embedding_dims=32, min_frequency=1.0, max_frequency=1000.0):
  """(B, 1, 1, 1) noise variances -> (B, embedding_dims, 1, 1), sin then cos."""
  speeds = torch.from_numpy(angular_speeds(embedding_dims, min_frequency, max_frequency))
  angles = speeds.to(noise_variances.device).reshape(1, -1, 1, 1) * noise_variances
  return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class BatchNorm(nn.Module):
  """BatchNorm2d with the Flax/Keras conventions.

  Differs from ``torch.nn.BatchNorm2d`` in exactly the points that break running-statistic parity:
  ``momentum`` is the fraction kept (0.99 here = torch's 0.01), the running variance is updated with
  the BIASED batch variance, and there is no ``num_batches_tracked``. The arithmetic follows
  ``flax.linen.BatchNorm`` step for step: (x - mean) * (rsqrt(var + eps) * scale) + bias.
  """

  def __init__(self, num_features: int, momentum: float, eps: float, affine: bool):
    super().__init__()
    self.momentum, self.eps, self.affine = momentum, eps, affine
    self.register_buffer("running_mean", torch.zeros(num_features))
    self.register_buffer("running_var", torch.ones(num_features))
    if affine:
      self.weight = nn.Parameter(torch.ones(num_features))
      self.bias = nn.Parameter(torch.zeros(num_features))

  def forward(self, x):
    if self.training:
      mean = x.mean(dim=(0, 2, 3))
      var = torch.square(x - mean.reshape(1, -1, 1, 1)).mean(dim=(0, 2, 3))
      with torch.no_grad():
        self.running_mean.copy_(self.momentum * self.running_mean + (1 - self.momentum) * mean)
        self.running_var.copy_(self.momentum * self.running_var + (1 - self.momentum) * var)
    else:
      mean, var = self.running_mean, self.running_var
    mul = torch.rsqrt(var + self.eps)
    if self.affine:
      mul = mul * self.weight
    y = (x - mean.reshape(1, -1, 1, 1)) * mul.reshape(1, -1, 1, 1)
    if self.affine:
      y = y + self.bias.reshape(1, -1, 1, 1)
    return y


def conv(in_features: int, features: int, kernel_size: int, spec: VariantSpec, zero_init: bool = False) -> nn.Conv2d:
  """A stride-1 'same' convolution with the variant's initialisation."""
  layer = nn.Conv2d(in_features, features, kernel_size, padding=kernel_size // 2)
  if zero_init:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
  elif not spec.torch_init:  # Keras: glorot-uniform kernels, zero biases
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
  return layer  # R: torch's own default init


class ResidualBlock(nn.Module):
  """Pre-norm residual block: BN -> conv3x3 -> swish -> conv3x3, plus a (projected) skip."""

  def __init__(self, in_features: int, width: int, spec: VariantSpec):
    super().__init__()
    self.norm = BatchNorm(in_features, spec.bn_momentum, spec.bn_epsilon, spec.bn_affine)
    self.conv1 = conv(in_features, width, 3, spec)
    self.conv2 = conv(width, width, 3, spec)
    self.proj = conv(in_features, width, 1, spec) if spec.always_project or in_features != width else None

  def forward(self, x):
    residual = x if self.proj is None else self.proj(x)
    h = self.conv2(F.silu(self.conv1(self.norm(x))))
    return h + residual


class DownBlock(nn.Module):
  """``block_depth`` residual blocks (each output pushed onto ``skips``), then 2x2 average pooling."""

  def __init__(self, in_features: int, width: int, block_depth: int, spec: VariantSpec):
    super().__init__()
    self.residual_blocks = nn.ModuleList(
        [ResidualBlock(in_features if j == 0 else width, width, spec) for j in range(block_depth)])

  def forward(self, x, skips: list):
    for block in self.residual_blocks:
      x = block(x)
      skips.append(x)
    return F.avg_pool2d(x, 2)


class UpBlock(nn.Module):
  """x2 bilinear upsampling, then ``block_depth`` times: concat [x, skips.pop()] -> residual block."""

  def __init__(self, in_features_list, width: int, spec: VariantSpec):
    super().__init__()
    self.residual_blocks = nn.ModuleList([ResidualBlock(c, width, spec) for c in in_features_list])

  def forward(self, x, skips: list):
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    for block in self.residual_blocks:
      x = block(torch.cat([x, skips.pop()], dim=1))
    return x


class UNet(nn.Module):
  """The noise-prediction U-Net; ``variant`` selects the Keras or the R topology (NCHW)."""

  def __init__(self, variant="keras", widths=(32, 64, 96, 128), block_depth=2, embedding_dims=32, channels=3,
               embedding_min_frequency=1.0, embedding_max_frequency=1000.0):
    super().__init__()
    spec = get_variant_spec(variant)
    widths = tuple(int(w) for w in widths)
    self.variant, self.widths, self.block_depth = variant, widths, block_depth
    self.embedding_dims, self.channels = embedding_dims, channels
    self.embedding_min_frequency, self.embedding_max_frequency = embedding_min_frequency, embedding_max_frequency

    stem_width = widths[0] if variant == "keras" else embedding_dims
    self.stem = conv(channels, stem_width, 1, spec)
    features = stem_width + embedding_dims
    skip_features = []  # channel counts of the skip stack, to size the up blocks
    down_widths = widths[:-1] if variant == "keras" else widths
    self.down_blocks = nn.ModuleList()
    for w in down_widths:
      self.down_blocks.append(DownBlock(features, w, block_depth, spec))
      skip_features += [w] * block_depth
      features = w

    mid_widths = [widths[-1]] * block_depth if variant == "keras" else [2 * widths[-1], widths[-1]]
    self.mid_blocks = nn.ModuleList()
    for w in mid_widths:
      self.mid_blocks.append(ResidualBlock(features, w, spec))
      features = w

    up_widths = list(reversed(widths[:-1]))
    if variant == "r":
      up_widths.append(embedding_dims)
    self.up_blocks = nn.ModuleList()
    for w in up_widths:
      in_list = []
      for j in range(block_depth):
        in_list.append((features if j == 0 else w) + skip_features.pop())
      self.up_blocks.append(UpBlock(in_list, w, spec))
      features = w

    self.head = conv(features, channels, 1, spec, zero_init=True)

  def forward(self, noisy_images, noise_variances):
    """Predicts the noise in ``noisy_images`` (B, C, H, W) at ``noise_variances`` (B, 1, 1, 1)."""
    batch, _, height, width = noisy_images.shape
    e = sinusoidal_embedding(noise_variances, self.embedding_dims, self.embedding_min_frequency,
                             self.embedding_max_frequency)
    e = e.expand(batch, self.embedding_dims, height, width)
    x = torch.cat([self.stem(noisy_images), e], dim=1)
    skips = []
    for block in self.down_blocks:
      x = block(x, skips)
    for block in self.mid_blocks:
      x = block(x)
    for block in self.up_blocks:
      x = block(x, skips)
    return self.head(x)


def create_model(variant="keras", widths=(32, 64, 96, 128), block_depth=2, embedding_dims=32, channels=3,
                 **unused) -> UNet:
  """Builds a UNet (the twin of ``ddim_jax.core.models.create_model``)."""
  return UNet(variant, widths, block_depth, embedding_dims, channels)


def count_parameters(module: nn.Module) -> int:
  """Number of trainable scalars (torch's usual count; buffers excluded)."""
  return sum(p.numel() for p in module.parameters())
