"""The local sources: image folders (``config.data.dataset = "folder"``) and the bundled digits.

  - ``"folder"``: every .jpg/.jpeg/.png/.webp under ``config.data.folder``, recursively;
  - ``"digits"``: the 8x8 digits bundled with this package (1,797 images, the file scikit-learn
    ships: ``ddim_jax/assets/DIGITS_LICENSE.md``), no download of any kind.

Each builder returns ``(arrays, info)``: {"train", "validation"} uint8 (N, S, S, 3) arrays and
the source's fields for the cache entry's ``meta.json``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from typing import Callable, Sequence

import numpy as np

from ddim_jax import errors
from ddim_jax.data.decode_pool import preprocess_many, warn_skipped
from ddim_jax.data.images import ScaledImage, decode_scaled, quantize, read_image_file, resize_weights
from ddim_jax.data.options import IMAGE_EXTENSIONS, NUM_NAMES_IN_WARNING, DataOptions
from ddim_jax.data.splits import random_split


def list_image_files(folder: str) -> tuple[list[str], list[str]]:
  """Image files under ``folder`` (recursive, sorted relative paths) and the other files.

  Returns:
    (image_paths, other_paths), relative to ``folder``; an image path is one whose extension
    (any case) is in IMAGE_EXTENSIONS. Hidden directories are not searched.
  """
  images, others = [], []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), folder)
      (images if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else others).append(rel)
  return sorted(images), sorted(others)


def folder_fingerprint(folder: str, files: Sequence[str]) -> str:
  """Changes when a file is added, removed, resized or touched (so the cache is rebuilt)."""
  digest = hashlib.sha256()
  for rel in files:
    try:
      stat = os.stat(os.path.join(folder, rel))
    except OSError:  # a dangling symbolic link: skipped when the images are read
      stat = os.lstat(os.path.join(folder, rel))
    digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


def _read_file(path: str, image_size: int, antialias: bool) -> Callable[[], ScaledImage]:
  def load():  # a FIFO, device, dangling link or oversized file raises BadImageError (skipped)
    # Decoded for its output size: a large photo at reduced scale, a pixel bomb refused unread.
    return decode_scaled(read_image_file(path), image_size, exif_transpose=True, antialias=antialias)
  return load


def build_folder(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  """The preprocessed images of an image folder: ({"train", "validation"}: uint8 arrays, cache info)."""
  folder = options.folder
  if not os.path.isdir(folder):
    if os.path.exists(folder):
      raise errors.InputError(f"image folder {folder!r} is not a folder (config.data.folder, --folder): give the "
                              f"folder that holds the images")
    raise errors.MissingInputError(f"image folder {folder!r} does not exist (config.data.folder)")
  files, others = list_image_files(folder)
  if not files:
    raise errors.InputError(f"image folder {folder!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, searched "
                            f"recursively; {len(others)} other files ignored)")
  train_idx, val_idx = random_split(len(files), 1.0 - options.validation_fraction, options.split_seed)
  arrays, skipped, upsampled = {}, [], 0
  for split, idx in (("train", train_idx), ("validation", val_idx)):
    names = [files[i] for i in idx]
    loaders = [_read_file(os.path.join(folder, name), image_size, options.antialias) for name in names]
    arrays[split], bad, small = preprocess_many(loaders, names, image_size, options.antialias, f"folder {split}")
    skipped += bad
    upsampled += small
  warn_skipped(f"image folder {folder}", skipped, len(files))
  if len(arrays["train"]) + len(arrays["validation"]) == 0:
    raise errors.InputError(f"image folder {folder!r}: none of its {len(files)} image files could be read "
                            f"(first: {', '.join(n for n, _ in skipped[:NUM_NAMES_IN_WARNING])})")
  if len(arrays["train"]) == 0:
    raise errors.InputError(f"image folder {folder!r}: no readable image landed in the training split")
  info = {"source": folder, "files": len(files), "ignored_non_image_files": len(others),
          "skipped": len(skipped), "skipped_names": [n for n, _ in skipped[:20]], "upsampled": upsampled}
  return arrays, info


# The package data folder ddim_jax/assets, two levels above this module.
DIGITS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits.csv.gz")
NUM_DIGITS = 1797  # images in the bundled digits


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
  """The rows of ``DIGITS_FILE``: int64 (1797, 65), 64 pixels (0..16) then the label (0..9)."""
  try:
    with gzip.open(DIGITS_FILE, "rt", encoding="ascii") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  except (OSError, ValueError) as e:
    raise errors.InputError(f"the bundled digits {DIGITS_FILE!r} cannot be read ({e}); reinstall ddim-jax") from e
  if table.shape != (NUM_DIGITS, 65):
    raise errors.InputError(f"the bundled digits {DIGITS_FILE!r} hold {table.shape}, expected ({NUM_DIGITS}, 65); "
                            "reinstall ddim-jax")
  table.setflags(write=False)  # cached: shared by every caller
  return table


def load_digits_images(image_size: int) -> np.ndarray:
  """The bundled digits (1,797 8x8, values 0..16) as uint8 RGB (1797, S, S, 3).

  Bilinear upsampling (half-pixel centres, edges clamped; antialiasing only matters below 8
  pixels), value 16 -> 255, gray repeated over 3 channels. No download of any kind.

  Args:
    image_size: output side S.

  Returns:
    uint8 array (1797, S, S, 3).
  """
  digits = _digits_table()[:, :64].reshape(NUM_DIGITS, 8, 8).astype(np.float64)  # in 0..16
  weights = resize_weights(digits.shape[1], image_size, antialias=True)
  upsampled = weights @ digits @ weights.T  # (S, 8) @ (N, 8, 8) @ (8, S)
  gray = quantize(upsampled * (255.0 / 16.0))
  return np.repeat(gray[..., None], 3, axis=-1)


def load_digits_labels() -> np.ndarray:
  """The labels (0..9) of the digits of ``load_digits_images``, int64 (1797,)."""
  return _digits_table()[:, 64].copy()


def digits_split_indices(options: DataOptions) -> dict[str, np.ndarray]:
  """{"train", "validation"}: the indices into ``load_digits_images`` of the digits' splits."""
  train_idx, val_idx = random_split(NUM_DIGITS, 1.0 - options.validation_fraction, options.split_seed)
  return {"train": train_idx, "validation": val_idx}


def build_digits(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  """The bundled digits at ``image_size``: ({"train", "validation"}: uint8 arrays, cache info)."""
  images = load_digits_images(image_size)
  indices = digits_split_indices(options)
  arrays = {split: images[idx] for split, idx in indices.items()}
  return arrays, {"source": "sklearn.datasets.load_digits", "files": len(images), "skipped": 0,
                  "skipped_names": [], "upsampled": len(images) if image_size > 8 else 0}
