"""The pure per-image steps: decode, centre crop, bilinear resize, uint8 rounding; the normaliser.

Preprocessing (Keras): centre crop to the short side with offsets ((h - c) // 2, (w - c) // 2),
bilinear resize with antialiasing (exactly TF's ``scale_and_translate`` triangle kernel, the
kernel ``tf.image.resize(..., antialias=True)`` uses), or without (``config.data.antialias =
False``: the R resize, torch ``interpolate(bilinear, align_corners=False)``), then rounding to
uint8 (at most 0.5/255 from the float Keras pipeline).
"""

from __future__ import annotations

import functools
import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps

from ddim_jax import errors


class BadImageError(errors.InputError):
  """A file or record that cannot be decoded as an image."""


def _pil_to_rgb(image) -> np.ndarray:
  """A loaded PIL image as uint8 (H, W, 3): alpha dropped, gray repeated, 16-bit scaled."""
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    # 16-bit grayscale (PNG opens as I;16, older Pillow as I): scale 0..65535 to 0..255, as
    # PIL's own convert("L") would clip instead.
    gray = np.asarray(image).astype(np.float64)
    gray = np.rint(np.clip(gray, 0, 65535) / 257.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "F":
    gray = np.asarray(image).astype(np.float64)
    scale = 255.0 if np.nanmax(gray) <= 1.0 else 1.0
    gray = np.rint(np.clip(np.nan_to_num(gray) * scale, 0, 255)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
  if image.mode != "RGB":
    image = image.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: alpha is dropped, like TF
  return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, exif_transpose: bool = False) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, WebP, ...) to uint8 RGB (H, W, 3).

  Args:
    data: the encoded file contents.
    exif_transpose: apply the EXIF orientation tag (True for image folders; False for TFDS
      records, as TF's decoder ignores it and Keras saw the unrotated pixels).

  Returns:
    uint8 array (H, W, 3).

  Raises:
    BadImageError: empty, truncated, corrupt or non-image data, or a zero-sized image.
  """
  if not data:
    raise BadImageError("empty file")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decode fully now: a truncated file fails here, never later
      if exif_transpose:
        image = ImageOps.exif_transpose(image)
      rgb = _pil_to_rgb(image)
  except Image.UnidentifiedImageError as e:
    raise BadImageError("not a recognised image format") from e
  except Exception as e:  # pylint: disable=broad-except  # PIL raises OSError, SyntaxError, ValueError, ...
    raise BadImageError(f"{type(e).__name__}: {e}") from e
  if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise BadImageError(f"unusable image shape {rgb.shape}")
  return rgb


MAX_IMAGE_BYTES = 100 * 2 ** 20  # image files larger than this are skipped (as unreadable ones are)


def read_image_file(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
  """The contents of the image file ``path``, if it is a regular file of at most ``max_bytes``.

  Never blocks on a FIFO or a device (opened non-blocking, checked with ``fstat`` before reading).

  Raises:
    BadImageError: a dangling symbolic link, a FIFO, socket, device or folder, a file over
      ``max_bytes``, or one that cannot be opened or read (the folder builders skip such files).
  """
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except FileNotFoundError:
    kind = "a dangling symbolic link" if os.path.islink(path) else "a file that vanished"
    raise BadImageError(f"{kind}, not an image file") from None
  except OSError as e:
    raise BadImageError(f"cannot open ({e.strerror or type(e).__name__})") from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise BadImageError("not a regular file (a FIFO, socket, device or folder)")
    limit = f"the limit of an image file, {max_bytes / 2 ** 20:g} MB ({max_bytes:,} bytes)"
    if info.st_size > max_bytes:
      raise BadImageError(f"{info.st_size:,} bytes, over {limit}")
    with os.fdopen(fd, "rb", closefd=False) as f:
      data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
      raise BadImageError(f"over {limit}")
    return data
  except OSError as e:
    raise BadImageError(f"cannot read ({e.strerror or type(e).__name__})") from None
  finally:
    os.close(fd)


def center_crop(image: np.ndarray) -> np.ndarray:
  """The Keras centre crop to the short side: offsets ((h - c) // 2, (w - c) // 2), c = min(h, w)."""
  height, width = image.shape[:2]
  crop = min(height, width)
  top, left = (height - crop) // 2, (width - crop) // 2
  return image[top:top + crop, left:left + crop]


@functools.lru_cache(maxsize=4096)
def _cached_weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  weights = resize_weights(in_size, out_size, antialias).astype(np.float32)
  weights.setflags(write=False)
  return weights


def resize_weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """The (out_size, in_size) float64 matrix of a 1-D bilinear resize with half-pixel centres.

  This is TF's ``scale_and_translate`` with the triangle kernel (what ``tf.image.resize``
  runs for bilinear with ``antialias=True``): output pixel i samples the input at
  (i + 0.5) * in/out; input pixel j gets weight max(0, 1 - |j + 0.5 - sample| / k) with kernel
  width k = max(in/out, 1) when antialiasing (k = 1 otherwise), and every row is normalised to
  sum 1. With k = 1 this is plain bilinear interpolation with edge clamping, i.e. torch's
  ``interpolate(mode="bilinear", align_corners=False, antialias=False)`` (the R resize).

  Args:
    in_size: input length (pixels).
    out_size: output length (pixels).
    antialias: widen the kernel by the downscaling factor.

  Returns:
    float64 array (out_size, in_size) with rows summing to 1.
  """
  if in_size <= 0 or out_size <= 0:
    raise errors.ConfigError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  kernel_scale = max(in_size / out_size, 1.0) if antialias else 1.0
  samples = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)
  distance = (np.arange(in_size, dtype=np.float64)[None, :] + 0.5 - samples[:, None]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - np.abs(distance))
  return weights / weights.sum(axis=1, keepdims=True)


def resize_bilinear(image: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
  """Separable bilinear resize of an (H, W, C) array; float32 result (same value scale).

  Args:
    image: (H, W, C) array of any real dtype.
    height: output height.
    width: output width.
    antialias: see `resize_weights`.

  Returns:
    float32 array (height, width, C).
  """
  rows = _cached_weights(image.shape[0], height, bool(antialias))
  cols = _cached_weights(image.shape[1], width, bool(antialias))
  image = np.asarray(image, dtype=np.float32)
  tmp = np.tensordot(rows, image, axes=(1, 0))  # (height, W, C)
  out = np.tensordot(tmp, cols, axes=(1, 1))  # (height, C, width)
  return np.ascontiguousarray(out.transpose(0, 2, 1))


def quantize(image: np.ndarray) -> np.ndarray:
  """Rounds float pixel values in the 0..255 scale to uint8 (clipped, round-half-even)."""
  return np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)


def unit_float(images) -> np.ndarray:
  """uint8 (0..255) or float ([0, 1]) images -> float32 in [0, 1] (what the metrics and the sampler take)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def preprocess_image(image: np.ndarray, image_size: int, antialias: bool = True) -> np.ndarray:
  """Centre crop to the short side, bilinear resize to ``image_size``, round to uint8.

  Args:
    image: uint8 (H, W, 3).
    image_size: output side S.
    antialias: see `resize_weights`.

  Returns:
    uint8 (S, S, 3).
  """
  return quantize(resize_bilinear(center_crop(image), image_size, image_size, antialias))


def compute_normalizer(images: np.ndarray) -> dict[str, np.ndarray]:
  """Per-channel mean and biased variance of uint8 images, as values in [0, 1].

  Exact: a 256-bin histogram per channel, then the moments in float64 (no float32 sums over
  millions of pixels). This is what Keras ``Normalization.adapt`` estimates over the training
  set (on float pixels; ours are the cached uint8 ones).

  Args:
    images: uint8 array (..., C).

  Returns:
    {"mean": (C,) float32, "variance": (C,) float32}.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise errors.InputError(f"compute_normalizer expects uint8 images, got {images.dtype}")
  channels = images.shape[-1]
  flat = images.reshape(-1, channels)
  if flat.shape[0] == 0:
    raise errors.InputError("compute_normalizer needs at least one image")
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, variance = np.zeros(channels), np.zeros(channels)
  for c in range(channels):
    counts = np.bincount(flat[:, c], minlength=256).astype(np.float64)
    total = counts.sum()
    mean[c] = (counts * values).sum() / total
    variance[c] = (counts * (values - mean[c]) ** 2).sum() / total
  return {"mean": mean.astype(np.float32), "variance": variance.astype(np.float32)}
