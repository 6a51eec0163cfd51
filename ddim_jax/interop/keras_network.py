"""The Keras example's network in Keras 3: the third framework of ``ddim-jax parity --keras``.

``build_network`` is the example's ``get_network`` (functional API: stem, down blocks, middle blocks,
up blocks, head; ``BatchNormalization(center=False, scale=False)``, eps 1e-3; bilinear x2
upsampling; the noise-variance embedding broadcast by nearest upsampling). ``load_network`` fills it
from a ``.weights.h5`` through ``keras_files`` (the file's groups mapped by Keras's layer-order rule,
so a wrong rule shows as a parity failure). ``reverse_diffusion`` is the example's sampler: its
cosine schedule and its time grid in float32 Keras ops.

The embedding's angular speeds are the ones both twins multiply (``models.angular_speeds``: formed in
float64, rounded once). The example forms them in float32 Keras ops, up to 4 ulps away, which alone
moves a prediction by ~1e-4 relative (docs/parity.md); with the same speeds the three frameworks
agree to float32 rounding, which is what a port check needs to see.

Keras runs on TensorFlow when it is installed (the example's backend), else on JAX; it is imported
only when a function here runs.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np

from ddim_jax import errors
from ddim_jax.core import models, schedules
from ddim_jax.interop import keras_files


def import_keras():
  """Keras 3, on TensorFlow when installed (else JAX) unless KERAS_BACKEND says otherwise."""
  if importlib.util.find_spec("keras") is None:
    raise errors.ConfigError("the Keras comparison runs Keras 3: pip install 'ddim-jax[keras]' (or the tfds extra, "
                             "whose TensorFlow brings it)")
  os.environ.setdefault("KERAS_BACKEND", "tensorflow" if importlib.util.find_spec("tensorflow") else "jax")
  import keras  # pylint: disable=import-outside-toplevel
  if int(keras.__version__.split(".")[0]) < 3:
    raise errors.ConfigError(f"Keras {keras.__version__} is installed; the example's .weights.h5 needs Keras 3")
  return keras


def build_network(image_size: int, widths, block_depth: int, embedding_dims: int = 32):
  """The example's U-Net in Keras; returns (model, {the twin's module name: its Keras layer})."""
  keras = import_keras()
  layers, ops = keras.layers, keras.ops
  speeds = models.angular_speeds(embedding_dims)
  by_name = {}

  def named(layer, name):
    by_name[name] = layer
    return layer

  def embedding(x):
    angular_speeds = ops.convert_to_tensor(speeds)
    return ops.concatenate([ops.sin(angular_speeds * x), ops.cos(angular_speeds * x)], axis=3)

  def residual_block(x, width, name):
    residual = x if x.shape[3] == width else named(layers.Conv2D(width, 1), f"{name}.proj")(x)
    x = named(layers.BatchNormalization(center=False, scale=False), f"{name}.norm")(x)
    x = named(layers.Conv2D(width, 3, padding="same", activation=keras.activations.swish), f"{name}.conv1")(x)
    x = named(layers.Conv2D(width, 3, padding="same"), f"{name}.conv2")(x)
    return layers.Add()([x, residual])

  noisy_images = keras.Input(shape=(image_size, image_size, 3))
  noise_variances = keras.Input(shape=(1, 1, 1))
  e = layers.Lambda(embedding, output_shape=(1, 1, embedding_dims))(noise_variances)
  e = layers.UpSampling2D(size=image_size, interpolation="nearest")(e)
  x = named(layers.Conv2D(widths[0], 1), "stem")(noisy_images)
  x = layers.Concatenate()([x, e])
  skips = []
  for i, width in enumerate(widths[:-1]):
    for j in range(block_depth):
      x = residual_block(x, width, f"down_blocks.{i}.residual_blocks.{j}")
      skips.append(x)
    x = layers.AveragePooling2D(pool_size=2)(x)
  for j in range(block_depth):
    x = residual_block(x, widths[-1], f"mid_blocks.{j}")
  for i, width in enumerate(reversed(widths[:-1])):
    x = layers.UpSampling2D(size=2, interpolation="bilinear")(x)
    for j in range(block_depth):
      x = layers.Concatenate()([x, skips.pop()])
      x = residual_block(x, width, f"up_blocks.{i}.residual_blocks.{j}")
  x = named(layers.Conv2D(3, 1, kernel_initializer="zeros"), "head")(x)
  return keras.Model([noisy_images, noise_variances], x, name="residual_unet"), by_name


def load_network(path: str, image_size: int, network: str = "ema"):
  """The example's network from the ``.weights.h5`` at ``path`` ("ema": its ``ema_network``, "raw":
  its ``network``); returns (Keras model, the architecture as ``models.create_model`` kwargs)."""
  keras_file = keras_files.read_keras_file(path)
  weights = keras_file.networks[keras_files.NETWORK_GROUPS[network]]
  kwargs = keras_files.infer_architecture(weights)
  model, by_name = build_network(image_size, kwargs["widths"], kwargs["block_depth"], kwargs["embedding_dims"])
  for twin_name, group in keras_files.keras_layer_names(kwargs["widths"], kwargs["block_depth"],
                                                        kwargs["embedding_dims"]).items():
    by_name[twin_name].set_weights(weights[group])
  return model, kwargs


def forward(network, images: np.ndarray, noise_variances: np.ndarray, train: bool) -> np.ndarray:
  """The network's prediction; with ``train`` (batch statistics) its BatchNorm statistics are kept
  as they were (a Keras call with training=True moves them)."""
  keras = import_keras()
  saved = network.get_weights() if train else None
  out = keras.ops.convert_to_numpy(network([images, noise_variances], training=train))
  if saved is not None:
    network.set_weights(saved)
  return np.asarray(out, np.float32)


def reverse_diffusion(network, initial_noise: np.ndarray, steps: int, spec: schedules.DiffusionSpec
                      ) -> dict[str, np.ndarray]:
  """The example's ``reverse_diffusion`` (eta 0), in float32 Keras ops: 'noisy_trajectory' (S + 1
  states, the initial noise first) and 'pred_trajectory' (S predicted images), NHWC."""
  if spec.schedule != "cosine" or spec.target != "noise":
    raise errors.ConfigError(f"the Keras example samples the cosine schedule with noise prediction; this model has "
                             f"schedule={spec.schedule!r}, target={spec.target!r}")
  ops = import_keras().ops
  start, end = math.acos(spec.max_signal_rate), math.acos(spec.min_signal_rate)
  batch = initial_noise.shape[0]
  noisy = ops.convert_to_tensor(initial_noise)
  noisy_states, predictions = [np.asarray(initial_noise)], []
  for step in range(steps):
    times = ops.ones((batch, 1, 1, 1)) - step * (1.0 / steps)
    angles = start + times * (end - start)
    noise_rates, signal_rates = ops.sin(angles), ops.cos(angles)
    pred_noises = network([noisy, noise_rates ** 2], training=False)
    pred_images = (noisy - noise_rates * pred_noises) / signal_rates
    next_angles = start + (times - 1.0 / steps) * (end - start)
    noisy = ops.cos(next_angles) * pred_images + ops.sin(next_angles) * pred_noises
    noisy_states.append(ops.convert_to_numpy(noisy))
    predictions.append(ops.convert_to_numpy(pred_images))
  return {"noisy_trajectory": np.stack(noisy_states), "pred_trajectory": np.stack(predictions)}


def description() -> dict:
  """Keras's version and backend (for the parity record)."""
  keras = import_keras()
  return {"keras": keras.__version__, "keras_backend": keras.backend.backend()}
