"""The offline demo: scikit-learn's bundled digits upsampled to 16x16, minutes on a CPU.

  make demo      (= ddim-jax demo --workdir outputs/demo)
"""

import ml_collections

from ddim_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """A small keras U-Net on the bundled digits; no download of any kind."""
  config = default.get_config()
  config.model.image_size = 16
  config.model.widths = (32, 64, 96)
  config.data.dataset = "digits"
  config.data.repetitions = 1
  config.train.num_steps = 600
  config.train.batch_size = 64
  config.train.checkpoint_every = 200
  config.train.sample_every = 200
  config.sample.num_images = 36
  return config
