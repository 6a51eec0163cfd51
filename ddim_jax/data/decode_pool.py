"""Decoding and preprocessing many images in a thread pool, and the warning about skipped ones."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import warnings
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ddim_jax.data.images import BadImageError, ScaledImage, preprocess_image
from ddim_jax.data.options import NUM_NAMES_IN_WARNING

try:
  import threadpoolctl  # a dependency; still optional here, as it only speeds things up
except ImportError:
  threadpoolctl = None


def _num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def _single_threaded_blas():
  """One BLAS thread per caller while our threads resize: the small per-image products are
  otherwise split over BLAS threads that contend with ours (measured 10x slower on 2 cores)."""
  if threadpoolctl is None:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def preprocess_many(loaders: Sequence[Callable[[], np.ndarray | ScaledImage]], names: Sequence[str],
                    image_size: int, antialias: bool, desc: str) -> tuple[np.ndarray, list[tuple[str, str]], int]:
  """Runs every loader (decode) and `preprocess_image` in a thread pool, keeping the order.

  PIL's decoders and NumPy's matrix products release the GIL, so threads scale on CPU cores. A
  loader returns uint8 (H, W, 3) or a `ScaledImage` (`images.decode_scaled`). Memory: each thread
  holds one decoded image, so the peak grows with the thread count (`_num_workers`). Images over
  `images.max_image_pixels` are refused unread and those decoded whole beyond
  `images.FULL_DECODE_PIXELS` take turns: at most one thread holds an image at the cap, the others
  at most 16.8 MP each.

  Returns:
    (uint8 (n_ok, S, S, 3) in input order, [(name, reason) of skipped items], number upsampled).
  """
  def work(loader):
    try:
      image = loader()
    except BadImageError as e:
      return None, str(e), False
    shape = image.full_shape if isinstance(image, ScaledImage) else image.shape[:2]
    return preprocess_image(image, image_size, antialias), None, min(shape) < image_size

  out = np.empty((len(loaders), image_size, image_size, 3), np.uint8)
  keep = np.zeros(len(loaders), bool)
  skipped, upsampled = [], 0
  with _single_threaded_blas(), concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool:
    results = pool.map(work, loaders)
    for i, (image, error, small) in enumerate(tqdm(results, total=len(loaders), desc=desc, unit="img",
                                                    mininterval=2.0, leave=False,
                                                    disable=len(loaders) < 500)):
      if image is None:
        skipped.append((names[i], error))
      else:
        out[i], keep[i] = image, True
        upsampled += int(small)
  return out[keep], skipped, upsampled


def warn_skipped(source: str, skipped: Sequence[tuple[str, str]], total: int) -> None:
  """One RuntimeWarning naming the first skipped (unreadable) files of ``source``, if any."""
  if not skipped:
    return
  first = "; ".join(f"{name} ({reason})" for name, reason in skipped[:NUM_NAMES_IN_WARNING])
  more = f" and {len(skipped) - NUM_NAMES_IN_WARNING} more" if len(skipped) > NUM_NAMES_IN_WARNING else ""
  message = f"{source}: skipped {len(skipped)} of {total} files that are not readable images: {first}{more}"
  warnings.warn(message, RuntimeWarning, stacklevel=3)
