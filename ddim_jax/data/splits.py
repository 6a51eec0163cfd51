"""Which images go to the training and the validation split.

``config.data.split = "keras"`` (TFDS only): train = the first 80% of every TFDS split
(``train[:80%]+validation[:80%]+test[:80%]``, TFDS's rounding), validation = the rest; for
oxford_flowers102 that is 6,551 / 1,638. ``"r"``: a seeded random 80/20 split over all images
(R's ``sample.int(N, 0.8 N)``: 6,551 / 1,638, a different draw since NumPy is not R's RNG).
Folders and digits always use the seeded random split (they have no predefined splits).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ddim_jax.data.options import DataOptions


def keras_train_count(num_examples: int, train_percent: float = 80.0) -> int:
  """Size of ``split[:train_percent%]`` with TFDS's "closest" rounding: round(p * n / 100)."""
  return int(round(train_percent * num_examples / 100.0))


def random_split(num_examples: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random split (R's ``sample.int(N, train_fraction * N)``, truncated), indices sorted.

  Returns:
    (train_indices, validation_indices), int64, disjoint, covering range(num_examples).
  """
  num_train = int(math.floor(num_examples * train_fraction + 1e-9))
  num_train = min(num_examples, max(num_train, 1 if num_examples else 0))
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[:num_train]), np.sort(order[num_train:])


def assign_tfds_splits(split_sizes: Sequence[tuple[str, int]], options: DataOptions) -> dict[str, list]:
  """Which (tfds_split, index) goes to our train and validation sets.

  Args:
    split_sizes: ordered (tfds split name, number of examples).
    options: ``split`` ("keras" or "r"), ``validation_fraction``, ``split_seed``.

  Returns:
    {"train": [(name, index), ...], "validation": [...]}, in source order.
  """
  train_percent = 100.0 * (1.0 - options.validation_fraction)
  if options.split == "keras":
    out = {"train": [], "validation": []}
    for name, size in split_sizes:
      boundary = keras_train_count(size, train_percent)
      out["train"] += [(name, i) for i in range(boundary)]
      out["validation"] += [(name, i) for i in range(boundary, size)]
    return out
  everything = [(name, i) for name, size in split_sizes for i in range(size)]
  train, validation = random_split(len(everything), 1.0 - options.validation_fraction, options.split_seed)
  return {"train": [everything[i] for i in train], "validation": [everything[i] for i in validation]}
