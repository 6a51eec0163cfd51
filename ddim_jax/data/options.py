"""The ``config.data`` options the data pipeline reads, and the package's constants."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ddim_jax import errors

CACHE_FORMAT = 1  # bump when the cached bytes for the same key would change
DEFAULT_CACHE_DIR = "~/.cache/ddim_jax"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = ("train", "validation")
LOCAL_SOURCES = ("digits", "folder")
NUM_NAMES_IN_WARNING = 5  # unreadable files named in a warning or an error (then a count)


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """The ``config.data`` fields the pipeline reads, with their defaults filled in."""
  dataset: str = "oxford_flowers102"
  data_dir: str | None = None
  folder: str | None = None
  cache_dir: str = DEFAULT_CACHE_DIR
  split: str = "keras"
  antialias: bool = True
  split_seed: int = 1
  validation_fraction: float = 0.2
  tfds_splits: tuple[str, ...] | None = None
  image_key: str | None = None
  download: bool = True


def data_options(config_data: Any) -> DataOptions:
  """Reads a ``config.data`` ConfigDict (or a plain dict) into a validated `DataOptions`.

  Args:
    config_data: ``config.data`` or any mapping with a subset of the `DataOptions` fields.

  Returns:
    The options, defaults filled in, paths expanded.

  Raises:
    ValueError: for an unknown split rule, a bad validation fraction, or a folder dataset
      without ``folder``.
  """
  def get(name):
    default = getattr(DataOptions, name)
    if isinstance(config_data, Mapping) or hasattr(config_data, "get"):
      value = config_data.get(name, default)
    else:
      value = getattr(config_data, name, default)
    return default if value is None else value

  tfds_splits = get("tfds_splits")
  if isinstance(tfds_splits, str):
    tfds_splits = tuple(s.strip() for s in tfds_splits.split(",") if s.strip()) or None
  elif tfds_splits is not None:
    tfds_splits = tuple(tfds_splits) or None
  cache_dir = os.environ.get("DDIM_JAX_CACHE_DIR") if get("cache_dir") == DEFAULT_CACHE_DIR else None
  options = DataOptions(
      dataset=str(get("dataset")),
      data_dir=os.path.expanduser(get("data_dir")) if get("data_dir") else None,
      folder=os.path.abspath(os.path.expanduser(get("folder"))) if get("folder") else None,
      cache_dir=os.path.abspath(os.path.expanduser(cache_dir or get("cache_dir"))),
      split=str(get("split")),
      antialias=bool(get("antialias")),
      split_seed=int(get("split_seed")),
      validation_fraction=float(get("validation_fraction")),
      tfds_splits=tfds_splits,
      image_key=get("image_key") or None,
      download=bool(get("download")),
  )
  if options.split not in ("keras", "r"):
    raise errors.ConfigError(f"config.data.split must be 'keras' or 'r', got {options.split!r}")
  if not 0.0 <= options.validation_fraction < 1.0:
    raise errors.ConfigError(f"config.data.validation_fraction must be in [0, 1), got {options.validation_fraction}")
  if options.dataset == "folder" and not options.folder:
    raise errors.ConfigError("config.data.dataset='folder' needs config.data.folder=PATH (a directory of images)")
  return options
