"""The pure per-image steps: decode, centre crop, bilinear resize, uint8 rounding; the normaliser.

Preprocessing (Keras): centre crop to the short side with offsets ((h - c) // 2, (w - c) // 2),
bilinear resize with antialiasing (exactly TF's ``scale_and_translate`` triangle kernel, the
kernel ``tf.image.resize(..., antialias=True)`` uses), or without (``config.data.antialias =
False``: the R resize, torch ``interpolate(bilinear, align_corners=False)``), then rounding to
uint8 (at most 0.5/255 from the float Keras pipeline).

Memory stays bounded whatever a file declares (a 440 KB PNG can declare 12000 x 12000 pixels, 432 MB
decoded): an image is opened lazily and its declared size checked before a byte of pixels is
decoded. Over `max_image_pixels` it is refused (skipped and named, like an unreadable file). Up to
`FULL_DECODE_PIXELS` it is decoded whole, exactly as above. Larger ones, when the pipeline knows the
output size (`decode_scaled`), are decoded at 1/2, 1/4 or 1/8 scale (a JPEG through libjpeg's
scaled IDCT, ``draft``; other formats box-reduced right after decoding) when that still leaves
`MIN_SCALED_CROP` input pixels per output pixel; the crop and the resize then run on the reduced
pixels in the full image's coordinates (`preprocess_image` of a `ScaledImage`); the result is within
1/255 of resizing the whole decode, up to 3/255 where a JPEG's colours clip (measured, see
`ScaledImage`). Decodes that stay large take their memory one at a time (`_LARGE_DECODES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import stat
import threading

import numpy as np
from PIL import Image

from ddim_jax import errors


class BadImageError(errors.InputError):
  """A file or record that cannot be decoded as an image."""


# Refused unread above this many declared pixels: 64 Mi pixels (67.1 MP) keeps every camera and phone
# photo up to 64 MP (9248 x 6936) and costs about 200 MB decoded as uint8 RGB (PIL holds RGB as 4
# bytes a pixel: 256 MB), once per decode thread at most (see _LARGE_DECODES). PIL itself only warns
# from 89.5 MP and refuses from 179 MP. A larger output size raises the cap (`max_image_pixels`).
MAX_IMAGE_PIXELS = 64 * 2 ** 20
PIXELS_PER_OUTPUT_PIXEL = 64  # the cap is at least this many input pixels per output pixel
# Images up to this many pixels (16.8 MP: a 4000 x 3000 photo, every Oxford flower) are decoded
# whole, so the data of the Keras pipeline is unchanged; larger ones may be decoded scaled down.
FULL_DECODE_PIXELS = 16 * 2 ** 20
# A scaled decode must leave at least this many reduced pixels per output pixel along the crop (the
# antialiased resize's triangle kernel then spans 16 or more of them): the box pre-filter of the
# reduction then moves the result by at most 1/255 (2/255 at scale 2; measured, see ScaledImage).
# At 4 it moved sharp black-and-white edges by up to 5/255.
MIN_SCALED_CROP = 8
# Full decodes of images over FULL_DECODE_PIXELS run one at a time: the decode pool has up to 8
# threads, and each such decode holds ~270 MB at the cap (measured: a folder with two 8192 x 8192
# PNGs peaks at 318 MB, 1,566 MB before this change); the other threads keep decoding smaller
# images meanwhile.
_LARGE_DECODES = threading.Lock()


def max_image_pixels(image_size: int | None = None) -> int:
  """The most pixels an image may declare to be decoded for output side ``image_size`` (None: any)."""
  return max(MAX_IMAGE_PIXELS, PIXELS_PER_OUTPUT_PIXEL * int(image_size or 0) ** 2)


@dataclasses.dataclass(frozen=True)
class ScaledImage:
  """An image decoded at 1/``scale`` of its size: ``pixels`` uint8 (H / scale, W / scale, 3).

  Reduced pixel (i, j) is the mean of full pixels [i s, (i + 1) s) x [j s, (j + 1) s) (a JPEG's
  scaled IDCT approximates that mean; ``scale`` divides both sides and the crop's offset, so no
  block is partial or crosses the crop's edge, in any EXIF orientation). `preprocess_image` crops
  and resizes it in the full image's coordinates: only the box pre-filter, and the rounding of the
  reduced pixels to uint8, differ from resizing the whole decode.

  Measured against resizing the whole decode (2026-12-07; MIN_SCALED_CROP 8; scales 2, 4, 8;
  outputs 28..512; photo-like images of 2432 x 1792 to 8192 x 6144 with sharp-edged shapes and
  noise texture, black-and-white shapes, white noise; EXIF orientations 1, 3, 6): PNG at most
  1/255 per value, 2/255 at scale 2 (black-and-white edges: the rounding of the 2 x 2
  means); JPEG at most 1/255 where no colour clips, up to 3/255 where saturated colours do (the
  whole decode clips each pixel's YCbCr -> RGB, the scaled one the means'); a few % of values differ.
  """
  pixels: np.ndarray
  scale: int = 1

  @property
  def full_shape(self) -> tuple[int, int]:
    """(H, W) of the whole image."""
    return self.pixels.shape[0] * self.scale, self.pixels.shape[1] * self.scale


def _to_8bit(image) -> Image.Image:
  """A loaded PIL image as mode "L" or "RGB", pixel by pixel: alpha dropped, 16-bit scaled."""
  mode = image.mode
  if mode.startswith("I;16") or mode == "I" or mode == "F":
    gray = np.asarray(image)
    if mode == "F":
      gray = gray.astype(np.float64)
      scale = 255.0 if np.nanmax(gray) <= 1.0 else 1.0
      gray = np.rint(np.clip(np.nan_to_num(gray) * scale, 0, 255)).astype(np.uint8)
    else:
      # 16-bit grayscale (PNG opens as I;16, older Pillow as I): 0..65535 to 0..255 by rounding
      # g / 257 (PIL's own convert("L") would clip instead). In integers, (2 g + 257) // 514 is that
      # rounding exactly (g / 257 is never a tie) at 4 bytes a pixel instead of float64's 8.
      wide = np.clip(gray, 0, 65535).astype(np.uint32)
      wide *= 2
      wide += 257
      wide //= 514
      gray = wide.astype(np.uint8)
    return Image.fromarray(gray)  # mode "L"
  if mode == "L" or mode == "RGB":
    return image
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
  return image.convert("RGB")  # LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: alpha is dropped, like TF


# ImageOps.exif_transpose's table: EXIF orientation -> the transposition that shows the image upright.
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _reduction(width: int, height: int, target_size: int | None) -> int:
  """The scale (1, 2, 4 or 8) to decode a ``width`` x ``height`` image at for output side ``target_size``.

  1 up to FULL_DECODE_PIXELS (or with no target); else the largest of 8, 4, 2 that divides both
  sides and the centre crop's offset (no partial blocks, none across the crop's edge: the reduced
  pixels sit on an exact grid of the crop, whatever the EXIF orientation; camera sizes such as
  4032 x 3024 or 6000 x 4000 allow 8) and leaves at least MIN_SCALED_CROP reduced pixels per output
  pixel across the crop.
  """
  if not target_size or width * height <= FULL_DECODE_PIXELS:
    return 1
  offset = abs(width - height) // 2  # center_crop's offset along the longer side
  for scale in (8, 4, 2):
    if (width % scale == 0 and height % scale == 0 and offset % scale == 0
        and min(width, height) // scale >= MIN_SCALED_CROP * target_size):
      return scale
  return 1


def _over_cap(width: int, height: int, cap: int) -> str:
  return (f"{width} x {height} pixels declared ({width * height / 1e6:.1f} MP, {3 * width * height / 1e6:,.0f} MB "
          f"decoded), over the limit of {cap / 1e6:.1f} MP per image: downscale it or remove it")


def _decode(data: bytes, exif_transpose: bool, target_size: int | None, scaling: bool) -> ScaledImage:
  """`decode_scaled`; without ``scaling`` (or a ``target_size``), the whole image (scale 1)."""
  if not data:
    raise BadImageError("empty file")
  cap = max_image_pixels(target_size)
  try:
    with Image.open(io.BytesIO(data)) as image:  # reads the header only: nothing is decoded yet
      width, height = image.size
      if width * height > cap:
        raise BadImageError(_over_cap(width, height, cap))
      scale = _reduction(width, height, target_size) if scaling else 1
      # A JPEG decodes at 1/2, 1/4, 1/8 scale in libjpeg itself (never whole); draft returns None
      # for other formats, which are decoded whole and then reduced.
      drafted = scale > 1 and image.draft(image.mode, (width // scale, height // scale)) is not None
      if drafted and image.size != (width // scale, height // scale):
        raise BadImageError(f"JPEG draft gave {image.size} for {width} x {height} at 1/{scale}")  # not expected
      large = width * height > FULL_DECODE_PIXELS and not drafted
      with _LARGE_DECODES if large else contextlib.nullcontext():
        image.load()  # decode fully now: a truncated file fails here, never later
        orientation = image.getexif().get(0x0112, 1) if exif_transpose else 1  # EXIF Orientation
        pixels = _to_8bit(image)
        if scale > 1 and not drafted:
          pixels = pixels.reduce(scale)  # box means, (sum + n / 2) // n, over whole blocks
        if orientation in _ORIENTATIONS:
          pixels = pixels.transpose(_ORIENTATIONS[orientation])
        rgb = np.asarray(pixels, dtype=np.uint8)
        if rgb.ndim == 2:
          rgb = np.repeat(rgb[..., None], 3, axis=-1)
  except BadImageError:
    raise
  except Image.DecompressionBombError as e:  # PIL's own cap (Image.MAX_IMAGE_PIXELS), if lower than ours
    raise BadImageError(f"{e} (PIL's limit): downscale it or remove it") from e
  except Image.UnidentifiedImageError as e:
    raise BadImageError("not a recognised image format") from e
  except Exception as e:  # pylint: disable=broad-except  # PIL raises OSError, SyntaxError, ValueError, ...
    raise BadImageError(f"{type(e).__name__}: {e}") from e
  if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise BadImageError(f"unusable image shape {rgb.shape}")
  return ScaledImage(rgb, scale)


def decode_image(data: bytes, exif_transpose: bool = False) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, WebP, ...) to uint8 RGB (H, W, 3), whole.

  Args:
    data: the encoded file contents.
    exif_transpose: apply the EXIF orientation tag (True for image folders; False for TFDS
      records, as TF's decoder ignores it and Keras saw the unrotated pixels).

  Returns:
    uint8 array (H, W, 3).

  Raises:
    BadImageError: empty, truncated, corrupt or non-image data, a zero-sized image, or one that
      declares more than `max_image_pixels` pixels (refused before decoding).
  """
  return _decode(data, exif_transpose, None, scaling=False).pixels


def decode_scaled(data: bytes, target_size: int, exif_transpose: bool = False, antialias: bool = True
                  ) -> ScaledImage:
  """Decodes image bytes to be cropped and resized to ``target_size``, scaled down if it is large.

  Images up to FULL_DECODE_PIXELS come back whole (scale 1, the same pixels as `decode_image`);
  larger ones at 1/2, 1/4 or 1/8 scale where that leaves MIN_SCALED_CROP pixels per output pixel.
  Pass the result to `preprocess_image` with the same ``antialias``.

  Args:
    data: the encoded file contents.
    target_size: the output side S the image will be resized to.
    exif_transpose: see `decode_image`.
    antialias: whether that resize antialiases; without, the image is decoded whole (a plain
      bilinear resize samples single pixels, which a reduced decode would change).

  Raises:
    BadImageError: as `decode_image`, with the pixel cap `max_image_pixels(target_size)`.
  """
  return _decode(data, exif_transpose, int(target_size), scaling=bool(antialias))


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
  return _separable(image, rows, cols)


# Inputs of more values than this are converted to float32 a strip of columns at a time.
_STRIP_VALUES = 4 * 2 ** 20


def _separable(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """rows (h, H) @ image (H, W, C) @ cols (w, W)^T in float32: (h, w, C)."""
  if image.dtype == np.float32 or image.size <= _STRIP_VALUES:
    tmp = np.tensordot(rows, np.asarray(image, dtype=np.float32), axes=(1, 0))  # (height, W, C)
  else:
    # A large uint8 crop (a 4000 x 3000 photo's is 27 M values): a whole float32 copy would take 4x
    # its memory in every decode thread. Each value of tmp is the same dot product over the rows
    # either way; only which columns go into one matrix product changes.
    tmp = np.empty((rows.shape[0],) + image.shape[1:], np.float32)
    step = max(1, _STRIP_VALUES // (image.shape[0] * int(np.prod(image.shape[2:]))))
    for start in range(0, image.shape[1], step):
      strip = np.asarray(image[:, start:start + step], dtype=np.float32)
      tmp[:, start:start + step] = np.tensordot(rows, strip, axes=(1, 0))
  out = np.tensordot(tmp, cols, axes=(1, 1))  # (height, C, width)
  return np.ascontiguousarray(out.transpose(0, 2, 1))


def _resize_scaled(image: ScaledImage, image_size: int) -> np.ndarray:
  """The centre crop and antialiased resize of a `ScaledImage`, float32 (S, S, 3).

  `resize_weights` in the full image's coordinates: output pixel i samples the full axis at
  start + (i + 0.5) c / S (c the crop side, start its offset, as in `center_crop`) with kernel
  width c / S; reduced pixel j stands at its block's centre (j + 0.5) scale and counts if that
  centre lies in the crop.
  """
  full_height, full_width = image.full_shape
  crop = min(full_height, full_width)

  def weights(full_size):  # (S, full_size / scale) float32
    start = (full_size - crop) // 2
    samples = start + (np.arange(image_size, dtype=np.float64) + 0.5) * (crop / image_size)
    kernel = max(crop / image_size, 1.0)
    centres = (np.arange(full_size // image.scale, dtype=np.float64) + 0.5) * image.scale
    weights = np.maximum(0.0, 1.0 - np.abs(centres[None, :] - samples[:, None]) / kernel)
    weights[:, (centres < start) | (centres >= start + crop)] = 0.0
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)

  return _separable(image.pixels, weights(full_height), weights(full_width))


def quantize(image: np.ndarray) -> np.ndarray:
  """Rounds float pixel values in the 0..255 scale to uint8 (clipped, round-half-even)."""
  return np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)


def unit_float(images) -> np.ndarray:
  """uint8 (0..255) or float ([0, 1]) images -> float32 in [0, 1] (what the metrics and the sampler take)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def preprocess_image(image: np.ndarray | ScaledImage, image_size: int, antialias: bool = True) -> np.ndarray:
  """Centre crop to the short side, bilinear resize to ``image_size``, round to uint8.

  Args:
    image: uint8 (H, W, 3), or a `ScaledImage` of `decode_scaled` (cropped and resized in the
      full image's coordinates).
    image_size: output side S.
    antialias: see `resize_weights`.

  Returns:
    uint8 (S, S, 3).
  """
  if isinstance(image, ScaledImage):
    if image.scale > 1:
      if not antialias:  # decode_scaled's callers pass antialiased resizes only
        raise ValueError("an image decoded at reduced scale needs the antialiased resize")
      return quantize(_resize_scaled(image, image_size))
    image = image.pixels
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
