"""The recipe of the digits metric's feature network: how its small CNN is trained.

``train_feature_params`` trains the classifier of ``digits_metric`` (``digits_metric.apply``) on
the digits' TRAINING split (the demo preset's split: ``random_split(1797, 0.8, split_seed=1)``,
1,437 images) with their labels: Adam on the softmax cross-entropy, float32, seeded, no
augmentation; deterministic, seconds on a CPU. ``scripts/train_digits_features.py`` runs it with
the defaults below and writes ``ddim_jax/assets/digits_features.safetensors``
(``save_feature_params``), the weights that ``digits_metric`` loads.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import data, files
from ddim_jax.quality import digits_metric

# The training recipe of the shipped weights (``train_feature_params``' defaults).
TRAIN_SEED = 0
TRAIN_EPOCHS = 30
TRAIN_BATCH_SIZE = 32
TRAIN_LEARNING_RATE = 2e-3


def training_data(data_config: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train", "validation"}: (gray 16x16 images (N, 16, 16, 1) in [0, 1], labels (N,)).

  The split of ``data_config`` (default: the demo preset's ``config.data``), the input
  pipeline's, without its cache.
  """
  if data_config is None:
    from ddim_jax import configs  # pylint: disable=import-outside-toplevel
    data_config = configs.load_config("demo").data
  indices = data.digits_split_indices(data.data_options(data_config))
  images = digits_metric.network_input(data.load_digits_images(digits_metric.FEATURE_SIZE))
  labels = data.load_digits_labels()
  return {split: (images[idx], labels[idx]) for split, idx in indices.items()}


def accuracy(params: Mapping[str, Any], images, labels) -> float:
  """Share of ``images`` (NHWC, any size) classified as ``labels``."""
  _, logits = digits_metric.features_and_logits(params, images)
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def train_feature_params(seed: int = TRAIN_SEED, epochs: int = TRAIN_EPOCHS, batch_size: int = TRAIN_BATCH_SIZE,
                         learning_rate: float = TRAIN_LEARNING_RATE,
                         data_config: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Trains the feature network on the digits' training split: deterministic, seconds on a CPU.

  Adam on the softmax cross-entropy, float32, initial weights from ``jax.random.key(seed)``, the
  batches of each epoch in the order of ``np.random.default_rng(seed).permutation`` (a partial
  last batch is kept), no augmentation.

  Returns:
    (params as float32 NumPy, a record with the recipe and the train/validation accuracies).
  """
  import optax  # pylint: disable=import-outside-toplevel
  splits = training_data(data_config)
  x, y = splits["train"]
  params = jax.tree.map(jnp.asarray, digits_metric.init_params(jax.random.key(seed)))
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  def loss_fn(p, xb, yb):
    _, logits = digits_metric.apply(p, xb)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  @jax.jit
  def step(p, state, xb, yb):
    grads = jax.grad(loss_fn)(p, xb, yb)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  order_rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = order_rng.permutation(len(x))
    for start in range(0, len(x), batch_size):
      idx = order[start:start + batch_size]
      params, opt_state = step(params, opt_state, x[idx], y[idx].astype(np.int32))
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  record = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "train_images": len(x), "validation_images": len(splits["validation"][0]),
            "train_accuracy": accuracy(params, *splits["train"]),
            "validation_accuracy": accuracy(params, *splits["validation"])}
  return params, record


def save_feature_params(path: str, params: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> None:
  """Writes the weights as safetensors, with how they were made (``record``) as string metadata."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  metadata = {"format": "ddim_jax.quality.digits_metric feature network",
              "produced_by": "python scripts/train_digits_features.py "
                             "(ddim_jax.quality.digits_features.train_feature_params)",
              "data": "sklearn.datasets.load_digits, 16x16 bilinear, training split of the demo preset "
                      "(random_split(1797, 0.8, split_seed=1)), sklearn labels"}
  metadata.update({k: str(v) for k, v in record.items()})
  files.ensure_parent(path)
  files.replace_file(path, safetensors_numpy.save({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
                                                  metadata=metadata))
