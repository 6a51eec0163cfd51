"""Kernel Inception Distance (KID), exactly as the Keras DDIM example computes it.

Per batch: the unbiased MMD^2 between real and generated Inception features under the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, d the feature dimension (2048):

  KID_batch = mean_offdiag(K_rr) + mean_offdiag(K_gg) - 2 mean(K_rg),

where the off-diagonal means divide by B(B - 1). The reported KID is the equal-weight mean of the
per-batch values (Keras' ``keras.metrics.Mean`` over ``update_state`` calls), not the estimate over
all images at once; so it depends on the batch size (the Keras example uses 64, the R port 128).

Features come from ``ddim_jax.quality.inception_weights`` (``inception_feature_fn``); any ``images -> features``
function works.

``frechet_distance``: the Frechet distance between two Gaussians (FID's formula); on the Gaussian
fits (``feature_statistics``) of Inception pool features it is FID (``fid_from_features``, over all
images at once, as pytorch-fid computes it), on those of ``digits_metric``'s small digit
classifier the digits metric.

Names (``fid_name``): ``fid`` is only the standard FID, the number pytorch-fid, clean-fid and
torchmetrics report: the 2015 FID Inception (weights flavour "fid", pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``) at 299 px. FID with other settings is named by them,
``fid_<weights>_<side>px``: ``fid_torchvision_75px`` (torchvision's ImageNet Inception at 75 px),
``fid_inception2015_75px`` (the FID Inception at 75 px). See docs/metrics.md.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors

FeatureFn = Callable[[jax.Array], jax.Array]

# The standard FID's Inception: the weights flavour (inception.FLAVOURS) and the input side.
STANDARD_FID_FLAVOUR = "fid"
STANDARD_FID_IMAGE_SIZE = 299
# How a FID at other settings names its weights flavour (``fid_name``).
FLAVOUR_NAMES = {"torchvision": "torchvision", "fid": "inception2015"}


def fid_name(flavour: str, image_size: int) -> str:
  """The metric name of FID with the Inception of weights ``flavour`` at ``image_size`` px.

  ``"fid"`` for the standard settings (flavour "fid" at 299 px, pytorch-fid's), else
  ``fid_<weights>_<side>px``, e.g. ``fid_torchvision_75px``, ``fid_inception2015_75px``.
  """
  if flavour not in FLAVOUR_NAMES:
    raise errors.ConfigError(f"unknown Inception flavour {flavour!r}; choose one of {tuple(FLAVOUR_NAMES)}")
  if (flavour, int(image_size)) == (STANDARD_FID_FLAVOUR, STANDARD_FID_IMAGE_SIZE):
    return "fid"
  return f"fid_{FLAVOUR_NAMES[flavour]}_{int(image_size)}px"


def polynomial_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
  """The KID kernel matrix ``(a @ b.T / d + 1) ** 3``.

  Args:
    a: (M, d) features.
    b: (N, d) features.

  Returns:
    (M, N) kernel values, in at least float32.
  """
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  feature_dim = a.shape[-1]
  # HIGHEST: on GPUs the default float32 matmul may use TF32 (10-bit mantissa), which would put
  # ~1e-3 relative noise into kernel values whose differences KID measures.
  dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return (dots / feature_dim + 1.0) ** 3


def _mean_offdiagonal(kernel: jax.Array) -> jax.Array:
  n = kernel.shape[0]
  # Masking rather than sum - trace: the diagonal is the largest entry, so subtracting it after
  # summing would cancel digits.
  off_diagonal = 1.0 - jnp.eye(n, dtype=kernel.dtype)
  return jnp.sum(kernel * off_diagonal) / (n * (n - 1))


@jax.jit
def kid_batch(real_features: jax.Array, generated_features: jax.Array) -> jax.Array:
  """The unbiased MMD^2 estimate of one batch (the Keras example's per-batch KID).

  Args:
    real_features: (M, d), M >= 2.
    generated_features: (N, d), N >= 2 (Keras uses N = M).

  Returns:
    A scalar; about 0 for equal distributions, and it can be slightly negative.
  """
  for name, f in (("real", real_features), ("generated", generated_features)):
    if f.ndim != 2 or f.shape[0] < 2:
      raise errors.InputError(f"{name} features must be (B >= 2, d), got shape {f.shape}")
  k_rr = polynomial_kernel(real_features, real_features)
  k_gg = polynomial_kernel(generated_features, generated_features)
  k_rg = polynomial_kernel(real_features, generated_features)
  return _mean_offdiagonal(k_rr) + _mean_offdiagonal(k_gg) - 2.0 * jnp.mean(k_rg)


class KIDAccumulator:
  """Equal-weight running mean of per-batch KID, the Keras ``KID`` metric's state.

  Example:
    acc = KIDAccumulator(feature_fn)
    for real, generated in batches:
      acc.update(real, generated)
    kid = acc.result()

  Args:
    feature_fn: images -> features. None: ``update`` takes features directly.
  """

  def __init__(self, feature_fn: Optional[FeatureFn] = None):
    self._feature_fn = feature_fn
    self.reset()

  def reset(self) -> None:
    """Forgets all batches."""
    self._total = jnp.zeros((), jnp.float32)  # on device: no host sync per batch
    self._count = 0

  def update(self, real: jax.Array, generated: jax.Array) -> jax.Array:
    """Adds one batch (images if a feature_fn was given, else features); returns its KID."""
    if self._feature_fn is not None:
      real, generated = self._feature_fn(real), self._feature_fn(generated)
    value = kid_batch(real, generated)
    self._total = self._total + value
    self._count += 1
    return value

  @property
  def count(self) -> int:
    """The number of batches seen."""
    return self._count

  def result(self) -> float:
    """The mean per-batch KID.

    Raises:
      ValueError: before the first update.
    """
    if self._count == 0:
      raise ValueError("KIDAccumulator.result() before any update()")
    return float(self._total) / self._count


def kid(real_images, generated_images, feature_fn: FeatureFn, batch_size: int = 64) -> float:
  """KID over paired batches of real and generated images, as the Keras example evaluates it.

  Batch i of the real images is paired with batch i of the generated ones; a final partial batch
  is dropped (the Keras validation set is batched with ``drop_remainder=True``).

  Args:
    real_images: (N, H, W, C) in [0, 1].
    generated_images: (N, H, W, C) in [0, 1], as many as the real ones.
    feature_fn: images -> (B, d) features, e.g. ``inception_weights.inception_feature_fn(path)``.
    batch_size: images per batch (Keras 64, R 128); >= 2.

  Returns:
    The mean per-batch KID.
  """
  n = len(real_images)
  if len(generated_images) != n:
    raise errors.ConfigError(f"{n} real images but {len(generated_images)} generated ones")
  if batch_size < 2 or n < batch_size:
    raise errors.ConfigError(f"need batch_size >= 2 and at least one full batch; got {n} images, batch {batch_size}")
  accumulator = KIDAccumulator(feature_fn)
  for start in range(0, n - batch_size + 1, batch_size):
    batch = slice(start, start + batch_size)
    accumulator.update(np.asarray(real_images[batch]), np.asarray(generated_images[batch]))
  return accumulator.result()


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """The Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), FID's formula.

  ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``, in float64. The trace of
  the square root is computed from symmetric matrices only: with s = cov1^(1/2) (``eigh``), the
  eigenvalues of s cov2 s are those of cov1 cov2, and s cov2 s is symmetric positive
  semi-definite, so its eigenvalues are real; round-off below 0 is clipped (no complex
  ``sqrtm`` and no imaginary parts to drop). Singular covariances (fewer samples than
  dimensions, a constant feature) are fine.

  Args:
    mu1, mu2: (d,) means.
    cov1, cov2: (d, d) symmetric positive semi-definite covariances.

  Returns:
    The squared distance (>= 0; 0 for identical Gaussians up to round-off).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise errors.InputError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")

  def psd_sqrt(matrix):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T

  root1 = psd_sqrt(cov1)
  middle = root1 @ cov2 @ root1
  trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None))))
  value = float(np.sum(np.square(mu1 - mu2)) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)
  return max(value, 0.0)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """The mean and covariance of (N, d) features in float64: pytorch-fid's
  ``calculate_activation_statistics`` (``np.mean(axis=0)``, ``np.cov(rowvar=False)``: ddof 1)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise errors.InputError(f"feature statistics need (N >= 2, d) features, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_features(real_features, generated_features) -> float:
  """FID: ``frechet_distance`` of the Gaussian fits (``feature_statistics``) of two feature sets
  (Inception pool features for FID proper; pytorch-fid's number on the same features).

  With no more images than feature dimensions (a validation split of a few thousand images, 2048
  Inception features) the same number comes cheaper from the centred features X1 (n1, d) and X2
  (n2, d): the non-zero eigenvalues of cov1 cov2 = X1'X1 X2'X2 / ((n1-1)(n2-1)) are the squared
  singular values of X1 X2' / sqrt((n1-1)(n2-1)), so tr((cov1 cov2)^(1/2)) is that matrix's
  nuclear norm: an (n1, n2) SVD instead of two (d, d) eigendecompositions.
  """
  a, b = np.asarray(real_features, np.float64), np.asarray(generated_features, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise errors.InputError(f"FID needs (N >= 2, d) features of the same d, got {a.shape} and {b.shape}")
  if max(len(a), len(b)) > a.shape[1]:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
  xa, xb = a - a.mean(axis=0), b - b.mean(axis=0)
  scale = np.sqrt((len(a) - 1) * (len(b) - 1))
  trace_sqrt = float(np.sum(np.linalg.svd(xa @ xb.T / scale, compute_uv=False)))
  value = float(np.sum(np.square(a.mean(axis=0) - b.mean(axis=0))) + np.sum(np.square(xa)) / (len(a) - 1)
                + np.sum(np.square(xb)) / (len(b) - 1) - 2.0 * trace_sqrt)
  return max(value, 0.0)
