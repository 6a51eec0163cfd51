"""Shared pieces of the InceptionV3 tests: a torch InceptionV3 with random but calibrated weights."""

import torch
from torch import nn

from ddim_jax.quality import inception
from ddim_torch_ref import inception as ref_inception


def random_torch_inception(flavour: str, seed: int, image_size: int = inception.KERAS_IMAGE_SIZE,
                           num_images: int = 16) -> ref_inception.InceptionV3:
  """A torch InceptionV3 with random weights and BN statistics that keep activations O(1).

  He-normal convs and random BN affines; each BN's running statistics are then set from the
  activations that reach it (a pre-hook in one eval pass, so later layers see the calibrated
  earlier ones), with the mean only partly removed and the variance jittered so that no
  statistic is trivial. Calibrated at ``image_size`` (on ``num_images`` random 64x64 images resized
  to it); at another size they drift (calibrated at 75 px, the features reach ~1e5 at 299 px: compare
  relative to scale there). Even so the net amplifies float32 rounding: torch float32 itself is
  ~1e-4 relative from torch float64 at the output, hence test_metrics.py compares in float64.
  """
  torch.manual_seed(seed)
  model = ref_inception.InceptionV3(flavour).eval()

  def calibrate(bn, inputs):
    (x,) = inputs
    mean = x.mean(dim=(0, 2, 3))
    shift = mean * torch.empty_like(mean).uniform_(0.0, 0.3)
    bn.running_mean.copy_(shift)
    second_moment = ((x - shift[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    bn.running_var.copy_(second_moment * torch.empty_like(mean).uniform_(0.8, 1.25))

  hooks = []
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        hooks.append(module.register_forward_pre_hook(calibrate))
    model.features(torch.rand(num_images, 3, 64, 64), image_size)
  for hook in hooks:
    hook.remove()
  return model
