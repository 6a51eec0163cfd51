"""The R blog model (dfalbel/denoising-diffusion): 4 down levels, 128->256->128 middle, no EMA.

  ddim-jax train --config r_variant --workdir runs/flowers64_r
"""

import ml_collections

from ddim_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The R configuration: the r U-Net, R's data split and resize, 50 epochs of batch 64."""
  config = default.get_config()
  config.model.variant = "r"
  config.data.split = "r"
  config.data.antialias = False
  config.train.ema_decay = 0.0  # R has no EMA: sampling uses the raw weights
  config.train.num_steps = 25_600
  config.train.kid_every = 512  # one epoch of batch 64 (25,600 = 50 epochs)
  # R's kid_img_size: KID (val_kid) at 299 px with eval.inception_weights (R: torchvision's). FID keeps
  # its own Inception (eval.fid_weights at 299, the standard FID, val_fid), not KID's: with pytorch-fid's
  # file as KID's weights too, both share one feature computation.
  config.eval.kid_image_size = 299
  config.eval.kid_batch_size = 128  # R evaluates with batch_size 128
  return config
