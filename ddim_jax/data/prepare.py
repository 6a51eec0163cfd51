"""The two steps of ``ddim-jax prepare-data`` as library calls; printing is left to the caller.

`prepare_source` runs a TFDS dataset's builder (offline from local copies of its original
files, or by downloading them); `build_cache` then builds (or finds) the uint8 cache entry that
training reads and summarises it. They are two calls so that a caller can report the first step
before the second, which can take minutes on a large dataset, starts.
"""

from __future__ import annotations

from typing import Any

from ddim_jax import errors
from ddim_jax.data.cache import load_normalizer, prepare_cache
from ddim_jax.data.options import DEFAULT_CACHE_DIR, LOCAL_SOURCES
from ddim_jax.data.tfds_source import prepare_tfds


def prepare_source(dataset: str, source_dir: str | None = None, data_dir: str | None = None) -> dict | None:
  """Prepares the source of ``dataset``: runs its TFDS builder; nothing for "digits" and "folder".

  Args:
    dataset: a TFDS name, "digits" or "folder".
    source_dir: directory with the TFDS dataset's original files (offline); None downloads them.
    data_dir: TFDS data dir (default: TFDS's, ``~/tensorflow_datasets``).

  Returns:
    `prepare_tfds`'s summary {"name", "data_dir", "splits", "seconds", "already_prepared"}, or None
    for a local source.

  Raises:
    ValueError: TensorFlow or tensorflow-datasets is not installed (the message says what to
      install), a file in ``source_dir`` is not the original, or ``source_dir`` is given for a
      local source.
    FileNotFoundError: ``source_dir`` is missing or lacks one of the dataset's files.
  """
  if dataset not in LOCAL_SOURCES:
    try:
      return prepare_tfds(dataset, source_dir=source_dir, data_dir=data_dir)
    except ImportError as e:
      # A missing optional extra is the user's to fix: a ValueError, which the CLI reports in one line.
      raise errors.ConfigError(str(e)) from e
  if source_dir:
    raise errors.ConfigError("--source-dir is for TFDS datasets; use --folder for an image folder")
  return None


def build_cache(dataset: str, image_size: int, data_dir: str | None = None, folder: str | None = None,
                cache_dir: str | None = None, split: str = "keras", antialias: bool = True, split_seed: int = 1,
                force: bool = False) -> dict[str, Any]:
  """Builds the cache entry of ``dataset`` at ``image_size`` (unless it exists) and summarises it.

  Never downloads: a TFDS dataset must have been prepared (`prepare_source`).

  Args:
    dataset: a TFDS name, "digits" or "folder".
    image_size: side S of the cached images.
    data_dir: TFDS data dir.
    folder: the image folder of ``dataset="folder"``.
    cache_dir: cache root (None: ``$DDIM_JAX_CACHE_DIR`` or ``~/.cache/ddim_jax``).
    split: "keras" or "r" (TFDS; local sources always use the seeded random split).
    antialias: resize with antialiasing (False: the R resize).
    split_seed: seed of the random split.
    force: rebuild the entry even when it exists.

  Returns:
    {"path": the entry's directory, "built": whether this call decoded the source, "seconds": how
    long the entry's build took (when it was built), "split": the split rule of the cache key
    ("keras", "r" or "random"), "antialias", "splits": {"train", "validation"} sizes, "skipped":
    number of unreadable images, "skipped_names": the first of them, "normalizer": {"mean",
    "variance"} float32 (3,)}.
  """
  config_data = {"dataset": dataset, "data_dir": data_dir, "folder": folder,
                 "cache_dir": cache_dir or DEFAULT_CACHE_DIR, "split": split,
                 "antialias": antialias, "split_seed": split_seed, "download": False}
  entry = prepare_cache(config_data, image_size, force=force)
  meta = entry.meta
  return {"path": entry.path, "built": entry.built, "seconds": meta["seconds"], "split": meta["key"]["split"],
          "antialias": meta["key"]["antialias"], "splits": meta["splits"], "skipped": meta.get("skipped", 0),
          "skipped_names": meta.get("skipped_names", []), "normalizer": load_normalizer(config_data, image_size)}
