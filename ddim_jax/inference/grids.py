"""Image grids, strips and the blog's figures as PNG files.

NumPy + Pillow only (no JAX): the PyTorch twin's ``ddim_torch_ref.sample`` writes its grids with
this module too, so that both CLIs produce byte-comparable PNGs. Files are written through
``etils.epath``, so that a path may be a bucket (``gs://...``) as well as a local file.
"""

import io
import math
import os

import numpy as np
from etils import epath
from PIL import Image

from ddim_jax import files


def to_uint8(images) -> np.ndarray:
  """[0, 1] float images -> uint8 (values outside [0, 1] are clipped)."""
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def grid_shape(num_images: int, rows: int | None = None) -> tuple[int, int]:
  """(rows, cols) of a near-square grid holding ``num_images`` (cols >= rows)."""
  if num_images < 1:
    raise ValueError("a grid needs at least one image")
  if rows is None:
    rows = max(1, int(math.floor(math.sqrt(num_images))))
    while num_images % rows and rows > 1 and num_images / rows <= 2 * rows:
      rows -= 1
  cols = int(math.ceil(num_images / rows))
  return rows, cols


def make_grid(images, rows: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
  """(N, H, W, C) images in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 grid."""
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = images.shape
  rows, cols = grid_shape(n, rows)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return grid


def save_png(array: np.ndarray, path: str) -> str:
  """Writes a uint8 (H, W, 3) array as PNG (a local path or ``gs://...``), creating the parent folder."""
  # Encoded in memory, then written whole: a bucket has no seekable files for PIL, and a local file
  # is replaced atomically (a full disk leaves the old PNG, a link or a FIFO at the path is refused).
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  if "://" in os.fspath(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
  else:
    files.ensure_parent(path)
    files.replace_file(path, buffer.getvalue())
  return path


def save_grid(images, path: str, rows: int | None = None, upscale: int = 1) -> str:
  """Saves (N, H, W, C) images in [0, 1] as one PNG grid; returns the path."""
  return save_png(make_grid(images, rows, upscale=upscale), path)


def make_rows(rows, pad: int = 2, upscale: int = 1) -> np.ndarray:
  """A sequence of (K_i, H, W, C) image rows in [0, 1] -> one uint8 figure, row i on line i.

  Rows may differ in length (shorter rows are left blank on the right).
  """
  rows = [np.asarray(r, np.float32) for r in rows]
  if not rows:
    raise ValueError("make_rows needs at least one row")
  cols = max(len(r) for r in rows)
  h, w, c = rows[0].shape[1:]
  blank = np.ones((1, h, w, c), np.float32)  # white, as the padding
  filled = [np.concatenate([r] + [blank] * (cols - len(r))) for r in rows]
  return make_grid(np.concatenate(filled), rows=len(rows), pad=pad, upscale=upscale)


def save_rows(rows, path: str, upscale: int = 1) -> str:
  """Saves ``make_rows(rows)`` as a PNG; returns the path."""
  return save_png(make_rows(rows, upscale=upscale), path)


def save_images(images, out_dir: str, prefix: str = "sample", start: int = 0, upscale: int = 1) -> list[str]:
  """Saves each of (N, H, W, C) images in [0, 1] as ``out_dir/<prefix>_<index:05d>.png``."""
  images = to_uint8(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(save_png(image, os.path.join(out_dir, f"{prefix}_{start + i:05d}.png")))  # gs:// joins too
  return paths


def forward_process(image, noises, noise_rates, signal_rates) -> np.ndarray:
  """The noisy images s_k * image + n_k * noise_k of one normalised image at K noise levels.

  Args:
    image: (H, W, C) normalised image.
    noises: (K, H, W, C) standard normal draws (one per column of the figure).
    noise_rates, signal_rates: (K,) rates.

  Returns:
    (K, H, W, C) noisy images in normalised space (float64 arithmetic, float32 result).
  """
  image, noises = np.asarray(image, np.float64), np.asarray(noises, np.float64)
  n = np.asarray(noise_rates, np.float64).reshape(-1, 1, 1, 1)
  s = np.asarray(signal_rates, np.float64).reshape(-1, 1, 1, 1)
  return (s * image[None] + n * noises).astype(np.float32)


def default_upscale(image_size: int, upscale: int | None = None) -> int:
  """``upscale`` if given, else enough integer upscaling to make tiles of about 64 px."""
  return upscale if upscale else max(1, 64 // image_size)


def pick_columns(num_steps: int, max_columns: int) -> np.ndarray:
  """Indices of at most ``max_columns`` evenly spaced steps of ``num_steps``, always the first and last."""
  if num_steps <= max_columns:
    return np.arange(num_steps)
  return np.unique(np.round(np.linspace(0, num_steps - 1, max_columns)).astype(int))
