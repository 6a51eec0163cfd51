"""An offline sample-quality metric for models of the bundled digits (KID needs InceptionV3 weights).

A small CNN classifier of 16x16 gray digits (``apply``: two 3x3 convolutions with 2x2 average
pooling, a 32-unit hidden layer, 10 logits; 21,546 float32 parameters) is trained once on the
digits' TRAINING split (the demo preset's split: ``random_split(1797, 0.8, split_seed=1)``, 1,437
images) with their labels (the recipe: ``digits_features.train_feature_params``;
``scripts/train_digits_features.py`` reproduces the shipped
``ddim_jax/assets/digits_features.safetensors``). Its hidden layer (the
penultimate one, after the ReLU) gives the features of:

- the Frechet distance between the Gaussian fits of the features of generated images and of the
  held-out real digits (the validation split of the model's ``config.data``: 359 images),
  ``metrics.frechet_distance`` (FID's formula on this network's features);
- the class coverage: the share of the 10 classes that the classifier predicts for at least one
  sample, and the histogram of the predicted classes.

Images of any size are reduced to the network's input the same way, real or generated: the mean
of the channels (the digits are gray: their 3 channels are equal), bilinear resize to 16x16
(``jax.image.resize``; nothing to do at 16x16), clipped to [0, 1].

``DigitsMetric.calibration`` scores reference points with the same number of images as the
samples (the Frechet distance of N images is biased upwards at small N): real training-split
digits (seen by the feature network, but never part of the reference set), the same digits with
Gaussian pixel noise, the mean digit repeated, and uniform noise.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import data, errors
from ddim_jax.quality import metrics

FEATURE_SIZE = 16  # the network's input side
NUM_CLASSES = 10
HIDDEN = 32  # feature dimension (the hidden layer)
CHANNELS = (16, 32)  # of the two convolutions
# The package data folder ddim_jax/assets, one level above this module.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                               "digits_features.safetensors")
FEATURE_BATCH = 256  # images per jitted feature call (the last batch is padded: one compilation)
NOISE_SD = 0.25  # the calibration's Gaussian pixel noise, in [0, 1] units


def is_digits(data_config: Any) -> bool:
  """Whether ``config.data`` is the bundled digits (this metric's data)."""
  return data.data_options(data_config).dataset == "digits"


# ------------------------------------------------------------------------------------------------
# The feature network.


def init_params(key: jax.Array) -> dict[str, np.ndarray]:
  """He-normal kernels, zero biases (float32)."""
  shapes = {"conv1": (3, 3, 1, CHANNELS[0]), "conv2": (3, 3, CHANNELS[0], CHANNELS[1]),
            "hidden": ((FEATURE_SIZE // 4) ** 2 * CHANNELS[1], HIDDEN), "logits": (HIDDEN, NUM_CLASSES)}
  params = {}
  for i, (name, shape) in enumerate(shapes.items()):
    fan_in = int(np.prod(shape[:-1]))
    kernel = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * np.sqrt(2.0 / fan_in)
    params[f"{name}.kernel"] = np.asarray(kernel, np.float32)
    params[f"{name}.bias"] = np.zeros((shape[-1],), np.float32)
  return params


def _conv(x, params, name):
  y = jax.lax.conv_general_dilated(x, params[f"{name}.kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  return jax.nn.relu(y + params[f"{name}.bias"].reshape(1, 1, 1, -1))


def _pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def apply(params: Mapping[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hidden features (N, 32), logits (N, 10)) of gray (N, 16, 16, 1) images in [0, 1]."""
  x = _pool(_conv(x, params, "conv1"))
  x = _pool(_conv(x, params, "conv2"))
  x = x.reshape(x.shape[0], -1)
  hidden = jax.nn.relu(jnp.dot(x, params["hidden.kernel"], precision=jax.lax.Precision.HIGHEST)
                       + params["hidden.bias"][None, :])
  logits = jnp.dot(hidden, params["logits.kernel"], precision=jax.lax.Precision.HIGHEST) + params["logits.bias"][None, :]
  return hidden, logits


_apply_jit = jax.jit(apply)


def network_input(images) -> np.ndarray:
  """uint8 (0..255) or float ([0, 1]) NHWC images of any size -> float32 (N, 16, 16, 1) in [0, 1].

  The mean of the channels, a bilinear resize to 16x16 (none at 16x16), clipped to [0, 1].
  """
  images = data.unit_float(images)
  if images.ndim != 4:
    raise errors.InputError(f"expected NHWC images, got shape {images.shape}")
  gray = images.mean(axis=-1, keepdims=True)
  if gray.shape[1:3] != (FEATURE_SIZE, FEATURE_SIZE):
    gray = np.asarray(jax.image.resize(gray, (len(gray), FEATURE_SIZE, FEATURE_SIZE, 1), "bilinear"))
  return np.clip(gray, 0.0, 1.0)


def features_and_logits(params: Mapping[str, Any], images) -> tuple[np.ndarray, np.ndarray]:
  """(hidden features (N, 32), logits (N, 10)) of NHWC images (see ``network_input``), in fixed batches."""
  x = network_input(images)
  hidden, logits = [], []
  for start in range(0, len(x), FEATURE_BATCH):
    batch = x[start:start + FEATURE_BATCH]
    padded = np.concatenate([batch, np.zeros((FEATURE_BATCH - len(batch),) + batch.shape[1:], np.float32)])
    h, l = jax.device_get(_apply_jit(params, padded))
    hidden.append(h[:len(batch)])
    logits.append(l[:len(batch)])
  if not hidden:
    return np.zeros((0, HIDDEN), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
  return np.concatenate(hidden), np.concatenate(logits)


# ------------------------------------------------------------------------------------------------
# The shipped weights (trained by ``digits_features.train_feature_params``).


def load_feature_params(path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(params, metadata) of a weights file (default: the shipped one)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = path or DEFAULT_WEIGHTS
  if not os.path.exists(path):
    raise FileNotFoundError(f"digits feature weights {path!r} not found; write them with "
                            f"`python scripts/train_digits_features.py --out {path}`")
  with safe_open(path, framework="numpy") as f:
    params = {k: f.get_tensor(k) for k in f.keys()}
    metadata = dict(f.metadata() or {})
  want = set(init_params(jax.random.key(0)))
  if set(params) != want:
    raise errors.InputError(f"{path!r} is not a digits feature network (tensors {sorted(params)})")
  return params, metadata


# ------------------------------------------------------------------------------------------------
# The metric.


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of (N, d) features in float64 (unbiased covariance, N >= 2)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise errors.InputError(f"need (N >= 2, d) features, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclasses.dataclass(frozen=True)
class DigitsScore:
  """The metric of one set of images.

  Attributes:
    frechet_distance: between the Gaussian fits of their features and of the reference set's.
    coverage: share of the 10 classes predicted for at least one image.
    histogram: images predicted as each class 0..9.
    num_images: how many images were scored.
  """
  frechet_distance: float
  coverage: float
  histogram: tuple[int, ...]
  num_images: int

  def to_json(self) -> dict:
    return {"frechet_distance": self.frechet_distance, "coverage": self.coverage,
            "histogram": list(self.histogram), "num_images": self.num_images}


@dataclasses.dataclass
class DigitsMetric:
  """The metric against the validation digits of a ``config.data``, for images of a model's size.

  Attributes:
    params: the feature network.
    reference_mu, reference_cov: Gaussian fit of the reference (validation) features.
    num_reference: reference images.
    data_config: the ``config.data`` whose split is used.
    image_size: side of the model's images (the calibration images are made at this size).
    weights: the feature weights file.
  """
  params: dict
  reference_mu: np.ndarray
  reference_cov: np.ndarray
  num_reference: int
  data_config: Any
  image_size: int
  weights: str

  @classmethod
  def for_data(cls, data_config: Any, image_size: int, weights: str | None = None) -> "DigitsMetric":
    """The metric of a model trained on ``data_config``'s digits at ``image_size``."""
    params, _ = load_feature_params(weights)
    reference = cls._split_images(data_config, image_size)["validation"]
    hidden, _ = features_and_logits(params, reference)
    mu, cov = gaussian_fit(hidden)
    return cls(params, mu, cov, len(reference), data_config, int(image_size), weights or DEFAULT_WEIGHTS)

  @staticmethod
  def _split_images(data_config: Any, image_size: int) -> dict[str, np.ndarray]:
    indices = data.digits_split_indices(data.data_options(data_config))
    images = data.load_digits_images(int(image_size))
    return {split: images[idx] for split, idx in indices.items()}

  def score(self, images) -> DigitsScore:
    """The metric of NHWC images (float in [0, 1] or uint8), at least 2."""
    hidden, logits = features_and_logits(self.params, images)
    mu, cov = gaussian_fit(hidden)
    histogram = np.bincount(np.argmax(logits, axis=-1), minlength=NUM_CLASSES)
    return DigitsScore(metrics.frechet_distance(mu, cov, self.reference_mu, self.reference_cov),
                       float(np.mean(histogram > 0)), tuple(int(c) for c in histogram), len(hidden))

  def calibration_images(self, num: int, seed: int = 0) -> "collections.OrderedDict[str, np.ndarray]":
    """The calibration sets, ``num`` float32 images each at the model's size (3 equal channels).

    - "real digits": ``num`` training-split digits (a seeded draw, without replacement when
      there are enough): real digits the reference set never holds, but that the feature
      network was trained on;
    - "noisy digits (sd 0.25)": the same with Gaussian pixel noise of sd 0.25, the same on the
      3 channels, clipped to [0, 1];
    - "mean digit": the mean training digit, repeated;
    - "uniform noise": every pixel U[0, 1] (gray).
    """
    train = self._split_images(self.data_config, self.image_size)["train"].astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    real = train[rng.choice(len(train), num, replace=num > len(train))]
    shape = (num,) + real.shape[1:3] + (1,)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(NOISE_SD)
    uniform = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    channels = real.shape[-1]
    return collections.OrderedDict([
        ("real digits", real),
        (f"noisy digits (sd {NOISE_SD})", np.clip(real + noise, 0.0, 1.0)),
        ("mean digit", np.repeat(train.mean(axis=0, keepdims=True), num, axis=0)),
        ("uniform noise", np.repeat(uniform, channels, axis=-1)),
    ])

  def calibration(self, num: int, seed: int = 0) -> "collections.OrderedDict[str, DigitsScore]":
    """The scores of ``calibration_images(num, seed)``, in that order (best first)."""
    return collections.OrderedDict((name, self.score(images))
                                   for name, images in self.calibration_images(num, seed).items())


def table_lines(scores: Mapping[str, DigitsScore], label: str = "") -> list[str]:
  """A text table of scores (Frechet distance, coverage, histogram), one row per entry of ``scores``."""
  width = max([len(label)] + [len(str(k)) for k in scores])
  lines = [f"{label:>{width}} {'Frechet':>9} {'coverage':>8}  predicted classes 0..9"]
  for name, score in scores.items():
    lines.append(f"{name!s:>{width}} {score.frechet_distance:>9.2f} {score.coverage:>8.1f}  "
                 f"{' '.join(f'{c:>3d}' for c in score.histogram)}")
  return lines
