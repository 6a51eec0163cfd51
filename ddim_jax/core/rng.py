"""Named random streams of a run: each purpose draws from its own key of the run's seed.

The keys are ``jax.random.key(seed + PURPOSE)``: offsets of the seed, as they were before they had
names, so that runs, sample grids and checkpoints made earlier reproduce bit for bit.
"""

import jax

INIT = 0  # the initial weights
SAMPLE_GRID = 1  # the fixed noise of the training-time sample grids (the same at every step)
TRAIN_DRAWS = 2  # the per-example noise and diffusion times of the training steps
KID_NOISE = 3  # the noise of the generated batches of KID during training (``seed + KID_NOISE``)


def purpose_key(seed: int, purpose: int) -> jax.Array:
  """The PRNG key of ``purpose`` (one of the constants above) for the run seeded ``seed``."""
  return jax.random.key(int(seed) + int(purpose))
