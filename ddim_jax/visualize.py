"""Image grids and strips as PNG files (NumPy + Pillow only)."""

import math
import os

import numpy as np
from PIL import Image


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
  """Writes a uint8 (H, W, 3) array as PNG, creating the parent folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def save_grid(images, path: str, rows: int | None = None, upscale: int = 1) -> str:
  """Saves (N, H, W, C) images in [0, 1] as one PNG grid; returns the path."""
  return save_png(make_grid(images, rows, upscale=upscale), path)
