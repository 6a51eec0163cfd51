"""The uint8 cache: one directory per dataset, split rule, size and preprocessing options.

Every source is decoded, centre-cropped and resized ONCE into a cache entry (``train.npy``,
``validation.npy``, ``normalizer.json``, ``meta.json``) under ``config.data.cache_dir`` (default
``~/.cache/ddim_jax``), keyed by `cache_key`. Training reads only that cache: NumPy, no
TensorFlow, no decoding, so an epoch cannot fail on a bad file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from typing import Any

import numpy as np

from ddim_jax import errors, files
from ddim_jax.data.images import compute_normalizer
from ddim_jax.data.options import CACHE_FORMAT, LOCAL_SOURCES, SPLITS, DataOptions, data_options
from ddim_jax.data.sources import build_digits, build_folder, folder_fingerprint, list_image_files
from ddim_jax.data.tfds_source import build_tfds


@dataclasses.dataclass
class CacheEntry:
  """One prepared dataset: its directory and the contents of its ``meta.json``."""
  path: str
  meta: dict
  built: bool = False  # True when this call decoded the source

  def split_path(self, split: str) -> str:
    return os.path.join(self.path, f"{split}.npy")


def cache_key(options: DataOptions, image_size: int) -> dict:
  """Everything that determines the cached bytes (the folder listing included, not the data dir)."""
  key = {"format": CACHE_FORMAT, "dataset": options.dataset, "image_size": int(image_size),
         "crop": "center", "antialias": options.antialias, "validation_fraction": options.validation_fraction}
  if options.dataset in LOCAL_SOURCES:
    key["split"] = "random"
    key["split_seed"] = options.split_seed
  else:
    key["split"] = options.split
    if options.split == "r":
      key["split_seed"] = options.split_seed
    key["tfds_splits"] = list(options.tfds_splits) if options.tfds_splits else None
    key["image_key"] = options.image_key
  if options.dataset == "folder":
    files, _ = list_image_files(options.folder) if os.path.isdir(options.folder) else ([], [])
    key["folder"] = options.folder
    key["listing"] = folder_fingerprint(options.folder, files)
  return key


def cache_path(options: DataOptions, image_size: int) -> str:
  """The cache entry directory: readable prefix plus a hash of `cache_key`."""
  key = cache_key(options, image_size)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  name = options.dataset.replace("/", "_").replace(":", "_")
  if options.dataset == "folder":
    name = f"folder-{os.path.basename(options.folder.rstrip(os.sep)) or 'root'}"
  aa = "aa" if options.antialias else "noaa"
  return os.path.join(options.cache_dir, f"{name}-{image_size}px-{key['split']}-{aa}-{digest}")


def _move_aside(path: str, parent: str) -> str | None:
  """A rebuild's old entry, renamed to a hidden name of this process; only a folder the cache wrote
  (it holds meta.json) is moved, anything else at the entry's name is refused."""
  info = files.lstat_or_none(path)
  if info is None:
    return None
  if not stat.S_ISDIR(info.st_mode) or files.lstat_or_none(os.path.join(path, "meta.json")) is None:
    raise files.unsafe(path, "the data cache entry", "not a cache entry (" + files.describe(info.st_mode) + ")",
                       "it is left alone: move it away and run again")
  old = os.path.join(parent, f".old-{os.getpid()}-{time.time_ns()}")
  os.rename(path, old)
  return old


def _write_entry(path: str, arrays: dict[str, np.ndarray], meta: dict, force: bool = False) -> None:
  """Writes a cache entry atomically: a temporary directory renamed into place.

  Several processes may build the same entry at once (multi-host on a shared file system); the
  first rename wins and the others discard their identical copy. A rebuild (``force``) swaps the new
  entry in and only then removes the old one: a failed rebuild keeps the old entry.
  """
  parent = os.path.dirname(path)
  files.ensure_folder(parent, "the data cache folder")
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)  # this process's own folder (0700 while it is written)
  try:
    for split, array in arrays.items():
      np.save(os.path.join(tmp, f"{split}.npy"), array)
    normalizer = compute_normalizer(arrays["train"])
    with open(os.path.join(tmp, "normalizer.json"), "w", encoding="utf-8") as f:
      json.dump({k: v.astype(float).tolist() for k, v in normalizer.items()}, f, indent=1)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o777 & ~files.umask())  # readable as the user's umask allows, like any folder of theirs
    old = _move_aside(path, parent) if force else None
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, "meta.json")):
        raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(path: str) -> dict | None:
  try:  # not through a link, never waiting on a FIFO: the cache folder may be shared
    return json.loads(files.read_text(os.path.join(path, "meta.json"), follow=False, max_bytes=1 << 20))
  except (OSError, ValueError, errors.Error):
    return None


MAX_CACHE_IMAGE_SIZE = 1024


def _check_cache_dir(cache_dir: str) -> None:
  """A cache folder that is a file, or sits below a file, is refused before anything is decoded."""
  where = "config.data.cache_dir / --cache-dir / DDIM_JAX_CACHE_DIR"
  path = cache_dir
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f"cache folder {cache_dir!r} ({where}) is not usable: {path!r} is a file; choose a "
                             f"folder")


def _damaged(entry: str, what: str, error: BaseException) -> errors.InputError:
  return errors.InputError(f"the data cache entry {entry!r} is damaged ({what}: {type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); delete that "
                           f"folder (or run `ddim-jax prepare-data ... --force`) to rebuild it")


def prepare_cache(config_data: Any, image_size: int, force: bool = False) -> CacheEntry:
  """Returns the cache entry of ``config_data`` at ``image_size``, building it on a miss.

  Args:
    config_data: ``config.data`` (see `data_options`).
    image_size: side S of the cached images.
    force: rebuild even when the entry exists.

  Returns:
    `CacheEntry`; ``meta["splits"]`` holds the split sizes.
  """
  options = data_options(config_data)
  if not isinstance(image_size, (int, np.integer)) or not 1 <= image_size <= MAX_CACHE_IMAGE_SIZE:
    raise errors.ConfigError(f"image size {image_size!r} of the cache is invalid: must be an integer in "
                             f"1..{MAX_CACHE_IMAGE_SIZE}")
  if not 0 <= options.split_seed < 2 ** 32:
    raise errors.ConfigError(f"config.data.split_seed={options.split_seed} (--split-seed) is invalid: must be an "
                             f"integer in 0..{2 ** 32 - 1}")
  _check_cache_dir(options.cache_dir)
  path = cache_path(options, image_size)
  meta = None if force else _read_meta(path)
  if meta is not None:
    return CacheEntry(path, meta, built=False)
  start = time.time()
  if options.dataset == "digits":
    arrays, info = build_digits(options, image_size)
  elif options.dataset == "folder":
    arrays, info = build_folder(options, image_size)
  else:
    arrays, info = build_tfds(options, image_size)
  meta = {"key": cache_key(options, image_size), "splits": {k: int(len(v)) for k, v in arrays.items()},
          "seconds": round(time.time() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
  _write_entry(path, arrays, meta, force)
  return CacheEntry(path, _read_meta(path) or meta, built=True)


def load_split(config_data: Any, split: str, image_size: int, mmap: bool = False) -> np.ndarray:
  """The preprocessed images of ``split`` ("train" or "validation"): uint8 (N, S, S, 3).

  Reads the cache (building it on a miss). On a hit this is one ``np.load``: no TFDS, no
  TensorFlow, no decoding.

  Args:
    config_data: ``config.data``.
    split: "train" or "validation".
    image_size: side S.
    mmap: memory-map the array instead of reading it (large caches, many processes per host).
  """
  if split not in SPLITS:
    raise errors.ConfigError(f"split must be one of {SPLITS}, got {split!r}")
  entry = prepare_cache(config_data, image_size)
  try:
    with files.open_regular(entry.split_path(split), follow=False):  # a FIFO or a link there is refused
      pass
    images = np.load(entry.split_path(split), mmap_mode="r" if mmap else None, allow_pickle=False)
  except (OSError, ValueError, EOFError, errors.Error) as e:
    raise _damaged(entry.path, f"{split}.npy", e) from None
  if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
      or images.shape[1:] != (image_size, image_size, 3)):
    raise _damaged(entry.path, f"{split}.npy", ValueError(
        f"holds {getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}, expected uint8 "
        f"(N, {image_size}, {image_size}, 3)"))
  return images


def load_normalizer(config_data: Any, image_size: int) -> dict[str, np.ndarray]:
  """The stored per-channel {"mean", "variance"} (float32, (3,)) of the training split."""
  entry = prepare_cache(config_data, image_size)
  try:
    stored = json.loads(files.read_text(os.path.join(entry.path, "normalizer.json"), follow=False,
                                        max_bytes=1 << 20))
    normalizer = {k: np.asarray(stored[k], np.float32) for k in ("mean", "variance")}
    if any(v.shape != (3,) or not np.all(np.isfinite(v)) for v in normalizer.values()) or np.any(
        normalizer["variance"] < 0):
      raise ValueError(f"mean {stored['mean']}, variance {stored['variance']}: need 3 finite values each, "
                       f"variances >= 0")
  except (OSError, ValueError, KeyError, TypeError, errors.Error) as e:
    raise _damaged(entry.path, "normalizer.json", e) from None
  return normalizer
