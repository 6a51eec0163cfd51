"""InceptionV3 feature extractor for KID (PyTorch, NCHW), the twin of ``ddim_jax/quality/inception.py``.

Written from scratch (no torchvision import) with torchvision's module layout, so both
``inception_v3_google-0cc3c7bd.pth`` (flavour "torchvision") and pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (flavour "fid") load with ``strict=True``. The flavours
differ only in the pool branches (see ddim_jax/quality/inception.py): torchvision averages with the
padding counted; fid (pytorch-fid's FIDInceptionA/C/E_1) excludes it, and Mixed_7c (FIDInceptionE_2)
max-pools. ``forward`` returns the 2048-d pooled features; ``fc`` and ``AuxLogits`` exist only so
that the files load strictly.
"""

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

FLAVOURS = ("torchvision", "fid")
NUM_CLASSES = {"torchvision": 1000, "fid": 1008}
# Pool-branch kind of (Mixed_5x, Mixed_6x, Mixed_7b, Mixed_7c).
POOLS = {
    "torchvision": ("avg", "avg", "avg", "avg"),
    "fid": ("avg_exclude_pad", "avg_exclude_pad", "avg_exclude_pad", "max"),
}
KERAS_IMAGE_SIZE = 75
MIN_IMAGE_SIZE = 75


def pool_branch(x: torch.Tensor, kind: str) -> torch.Tensor:
  """The 3x3 stride-1 padded pool in front of a block's pool-branch 1x1 conv."""
  if kind == "max":
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
  if kind not in ("avg", "avg_exclude_pad"):
    raise ValueError(f"unknown pool kind {kind!r}")
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=kind == "avg")


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

  def __init__(self, in_channels: int, out_channels: int, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  """Mixed_5b..5d."""

  def __init__(self, in_channels: int, pool_features: int, pool: str = "avg"):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(pool_branch(x, self.pool))
    return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
  """Mixed_6a."""

  def __init__(self, in_channels: int):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  """Mixed_6b..6e."""

  def __init__(self, in_channels: int, channels_7x7: int, pool: str = "avg"):
    super().__init__()
    c7 = channels_7x7
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    branch_pool = self.branch_pool(pool_branch(x, self.pool))
    return torch.cat([self.branch1x1(x), branch7x7, dbl, branch_pool], 1)


class InceptionD(nn.Module):
  """Mixed_7a."""

  def __init__(self, in_channels: int):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    b = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b = layer(b)
    return torch.cat([branch3x3, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  """Mixed_7b, 7c."""

  def __init__(self, in_channels: int, pool: str = "avg"):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1)
    branch_pool = self.branch_pool(pool_branch(x, self.pool))
    return torch.cat([self.branch1x1(x), b3, dbl, branch_pool], 1)


class InceptionAux(nn.Module):
  """torchvision's auxiliary classifier: present only so the torchvision file loads strictly."""

  def __init__(self, in_channels: int, num_classes: int):
    super().__init__()
    self.conv0 = BasicConv2d(in_channels, 128, kernel_size=1)
    self.conv1 = BasicConv2d(128, 768, kernel_size=5)
    self.fc = nn.Linear(768, num_classes)


class InceptionV3(nn.Module):
  """InceptionV3 up to the global average pool: (B, 3, H, W) in [-1, 1] -> (B, 2048).

  Args:
    flavour: "torchvision" or "fid" (pool-branch layout and classifier width).
    aux_logits: build ``AuxLogits`` (None: torchvision yes, fid no, as the files hold them).
  """

  def __init__(self, flavour: str = "torchvision", aux_logits: Optional[bool] = None):
    super().__init__()
    if flavour not in FLAVOURS:
      raise ValueError(f"unknown Inception flavour {flavour!r}; choose one of {FLAVOURS}")
    self.flavour = flavour
    num_classes = NUM_CLASSES[flavour]
    pool_5, pool_6, pool_7b, pool_7c = POOLS[flavour]
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = InceptionA(192, pool_features=32, pool=pool_5)
    self.Mixed_5c = InceptionA(256, pool_features=64, pool=pool_5)
    self.Mixed_5d = InceptionA(288, pool_features=64, pool=pool_5)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, pool=pool_6)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, pool=pool_6)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, pool=pool_6)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, pool=pool_6)
    if aux_logits is None:
      aux_logits = flavour == "torchvision"
    if aux_logits:
      self.AuxLogits = InceptionAux(768, num_classes)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, pool=pool_7b)
    self.Mixed_7c = InceptionE(2048, pool=pool_7c)
    self.fc = nn.Linear(2048, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return x.mean(dim=(2, 3))

  def features(self, images: torch.Tensor, image_size: int = KERAS_IMAGE_SIZE) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> (B, 2048): bilinear resize (no antialias), 2x - 1, forward."""
    if image_size < MIN_IMAGE_SIZE:
      raise ValueError(f"InceptionV3 needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    if tuple(images.shape[-2:]) != (image_size, image_size):
      images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return self(images * 2.0 - 1.0)


def detect_flavour(state_dict: Mapping[str, torch.Tensor]) -> str:
  """'torchvision' (fc of 1000 classes) or 'fid' (1008) from a state dict."""
  num_classes = state_dict["fc.weight"].shape[0]
  for flavour, n in NUM_CLASSES.items():
    if n == num_classes:
      return flavour
  raise ValueError(f"fc.weight has {num_classes} classes; expected 1000 (torchvision) or 1008 (fid)")


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> InceptionV3:
  """An eval-mode InceptionV3 with ``state_dict`` loaded strictly (flavour and AuxLogits detected)."""
  aux_logits = any(key.startswith("AuxLogits.") for key in state_dict)
  model = InceptionV3(detect_flavour(state_dict), aux_logits=aux_logits)
  model.load_state_dict(state_dict, strict=True)
  return model.eval()


def load(path: str) -> InceptionV3:
  """Loads a torchvision / pytorch-fid InceptionV3 ``.pth`` file (see ``from_state_dict``)."""
  return from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
