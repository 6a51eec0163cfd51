"""Training data: TFDS datasets, image folders, the bundled digits; uint8 cache; batches.

Every source is decoded, centre-cropped and resized ONCE into a uint8 cache entry; training reads
only that cache (NumPy: no TensorFlow, no decoding). Importing this package never imports
TensorFlow or tensorflow-datasets. Modules, each importing only those above it:

  options      `DataOptions` (the ``config.data`` fields) and the constants
  images       the pure per-image steps: decode, centre crop, bilinear resize, uint8; the normaliser
  decode_pool  decoding and preprocessing many images in a thread pool
  splits       the Keras and the seeded random train/validation split rules
  sources      image folders and the bundled digits (assets/digits.csv.gz)
  tfds_source  TFDS: preparing a dataset (its builder, offline or online) and reading it
  cache        the cache entries: `prepare_cache`, `load_split`, `load_normalizer`
  iterator     `BatchIterator` (shuffle, repeat, shard over processes, resume), `create_datasets`
  prepare      the steps of ``ddim-jax prepare-data``: `prepare_source`, `build_cache`

Names with a leading underscore stay in their module; the names these modules share (such as
`preprocess_many`, `build_folder`) are public there, but only those imported below are the package's API.

Entry points:
  create_datasets(config, image_size, process_index, process_count) -> (train_iter, val_images, normalizer)
  load_split(config_data, split, image_size) -> uint8 (N, S, S, 3)
  load_normalizer(config_data, image_size) -> {"mean": (3,) f32, "variance": (3,) f32}
  unit_float(images) -> float32 in [0, 1] (from uint8 or float images)
  prepare_cache(config_data, image_size) -> CacheEntry (builds the cache entry on a miss)
  load_digits_images(image_size) -> uint8 (1797, S, S, 3)
  load_digits_labels() -> int64 (1797,); digits_split_indices(options) -> {"train", "validation"}: indices
  BatchIterator(images, global_batch_size, seed, process_index, process_count, ...)
  prepare_tfds(name, source_dir=None, data_dir=None): run a TFDS builder (offline from local files)
  prepare_source(dataset, ...), build_cache(dataset, image_size, ...): ``ddim-jax prepare-data``
"""

from ddim_jax.data.cache import CacheEntry, load_normalizer, load_split, prepare_cache
from ddim_jax.data.images import BadImageError, compute_normalizer, unit_float
from ddim_jax.data.iterator import BatchIterator, create_datasets
from ddim_jax.data.options import DEFAULT_CACHE_DIR, SPLITS, DataOptions, data_options
from ddim_jax.data.prepare import build_cache, prepare_source
from ddim_jax.data.sources import digits_split_indices, load_digits_images, load_digits_labels
from ddim_jax.data.tfds_source import prepare_tfds

__all__ = [
    "DEFAULT_CACHE_DIR", "SPLITS", "BadImageError", "BatchIterator", "CacheEntry", "DataOptions", "build_cache",
    "compute_normalizer", "create_datasets", "data_options", "digits_split_indices", "load_digits_images",
    "load_digits_labels", "load_normalizer", "load_split",
    "prepare_cache", "prepare_source", "prepare_tfds", "unit_float",
]
