"""The offline demo: the bundled 8x8 digits upsampled to 16x16, about 7.5 minutes on 2 CPU cores.

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
  # 2,500 steps: the digits metric (20 steps, 500 samples, 3 noise seeds) went from 17.3 at 1,500
  # steps to 13.3, where a cosine decay, the MSE loss or both did not help (README, "The demo").
  config.train.num_steps = 2500
  config.train.batch_size = 64
  # A short run needs a short EMA: with 0.999 the EMA is still 8% initial weights after 2500 steps.
  config.train.ema_decay = 0.995
  config.train.ema_warmup = True
  config.train.checkpoint_every = 250
  config.train.log_every = 50
  config.train.sample_every = 500
  config.sample.num_images = 36
  # One step per call: a CPU step of this preset takes ~0.2 s, so the ~1 ms dispatch per call is
  # lost in it (the loop runs at 98-99% of the bare step; docs/benchmarks.md).
  config.train.steps_per_call = 1
  config.train.kid_every = 0  # no KID on CPU (InceptionV3 weights are not available offline)
  return config
