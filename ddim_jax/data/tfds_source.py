"""TFDS datasets: preparing them (running a builder) and reading their images for the cache.

Any TFDS image dataset works by name (``oxford_flowers102``, ``oxford_iiit_pet``, ...): the image
feature is found in the builder's features (or named by ``config.data.image_key``). TensorFlow is
needed only to *prepare* a dataset (run its builder); reading a prepared dataset's ArrayRecord
files goes through ``tfds`` ``as_data_source`` without importing TensorFlow.

tensorflow_datasets and tensorflow are imported only inside the functions that need them, never
at module level: importing this package (and training from the cache) must work without them
installed, and without the seconds their import costs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import time
import urllib.parse
from typing import Any, Mapping, Sequence

import numpy as np

from ddim_jax import errors
from ddim_jax.data.decode_pool import preprocess_many, warn_skipped
from ddim_jax.data.images import decode_image
from ddim_jax.data.options import SPLITS, DataOptions
from ddim_jax.data.splits import assign_tfds_splits

_TFDS_SPLIT_ORDER = ("train", "validation", "test")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise errors.MissingDependencyError("TFDS datasets need tensorflow-datasets: pip install 'ddim-jax[tfds]' "
                      "(or use config.data.dataset='digits' or 'folder', which need nothing)") from e
  return tfds


def _require_tensorflow(what: str) -> None:
  if importlib.util.find_spec("tensorflow") is None:
    raise errors.MissingDependencyError(
        f"{what} runs the TFDS builder, which needs TensorFlow: pip install 'ddim-jax[tfds]'")


def _tfds_builder(name: str, data_dir: str | None):
  tfds = _import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError and friends
    raise errors.ConfigError(f"unknown dataset {name!r}: not 'digits', 'folder' or a TFDS dataset ({e})") from e


def _source_filenames(builder) -> list[str]:
  """Names of the original files a TFDS builder downloads (from its registered checksums)."""
  infos = type(builder).url_infos or {}
  return sorted({info.filename for info in infos.values() if getattr(info, "filename", None)})


def _unreachable_host(urls: Sequence[str], timeout: float = 5.0) -> str | None:
  """The first download host that cannot be connected to within ``timeout`` s, or None.

  Skipped (None) behind a proxy, where a direct connection says nothing.
  """
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
    return None
  for host, port in dict.fromkeys((u.hostname, u.port or (443 if u.scheme == "https" else 80))
                                  for u in map(urllib.parse.urlparse, urls) if u.hostname):
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
      return host
  return None


def missing_data_message(name: str, data_dir: str | None, filenames: Sequence[str]) -> str:
  """The error text for a TFDS dataset that is not prepared: both ways to get it."""
  files = ", ".join(filenames) if filenames else "its original files"
  data_dir_arg = f" --data-dir {data_dir}" if data_dir else ""
  return (f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS data dir'}. Either\n"
          f"  (1) with internet: ddim-jax prepare-data --dataset {name}{data_dir_arg}   (downloads it "
          f"through TFDS; training with config.data.download=True does the same), or\n"
          f"  (2) without internet: copy {files} into a directory DIR and run\n"
          f"      ddim-jax prepare-data --dataset {name} --source-dir DIR{data_dir_arg}")


def prepare_tfds(name: str, source_dir: str | None = None, data_dir: str | None = None) -> dict:
  """Runs the real TFDS builder of ``name``, from local copies of its files or by downloading.

  Offline, the builder's download manager is given ``manual_dir=source_dir``: TFDS then takes
  each file it would download from ``source_dir/<original file name>`` (e.g. 102flowers.tgz,
  imagelabels.mat, setid.mat), verifies its registered size and SHA-256, extracts it and
  generates the splits exactly as after a download. Data is written as ArrayRecord, which the
  cache builder reads without TensorFlow.

  Args:
    name: TFDS dataset name (optionally ``name/config:version``).
    source_dir: directory holding the original files; None downloads them (needs internet).
    data_dir: TFDS data dir (default: TFDS's, ``~/tensorflow_datasets``).

  Returns:
    {"name", "data_dir", "splits": {tfds split: size}, "seconds", "already_prepared"}.

  Raises:
    FileNotFoundError: ``source_dir`` is missing or lacks one of the expected files.
    ImportError: TensorFlow or tensorflow-datasets is not installed.
  """
  start = time.time()
  tfds = _import_tfds()
  builder = _tfds_builder(name, data_dir)
  already = builder.is_prepared()
  if not already:
    _require_tensorflow(f"preparing {name}")
    download_config = None
    if source_dir is not None:
      source_dir = os.path.abspath(os.path.expanduser(source_dir))
      if not os.path.isdir(source_dir):
        raise errors.MissingInputError(f"--source-dir {source_dir!r} is not a directory")
      expected = _source_filenames(builder)
      missing = [f for f in expected if not os.path.exists(os.path.join(source_dir, f))]
      if missing:
        # Without this check TFDS would silently try to download the missing files.
        raise errors.MissingInputError(f"{source_dir} lacks {', '.join(missing)} (the original files of {name}: "
                                f"{', '.join(expected)})")
      download_config = tfds.download.DownloadConfig(manual_dir=source_dir)
    else:
      unreachable = _unreachable_host(list((type(builder).url_infos or {}).keys()))
      if unreachable:
        raise errors.MissingInputError(f"cannot reach {unreachable} to download {name}.\n"
                                + missing_data_message(name, data_dir, _source_filenames(builder)))
    try:
      builder.download_and_prepare(download_config=download_config, file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ != "NonMatchingChecksumError":
        raise
      where = f"in {source_dir}" if source_dir else "downloaded"
      raise errors.InputError(f"a file {where} is not the original of {name} (size/SHA-256 differ from the ones "
                              f"TFDS registered): {e}") from e
  return {"name": name, "data_dir": str(builder.data_dir),
          "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()},
          "seconds": time.time() - start, "already_prepared": already}


def find_image_key(features: Mapping[str, Any], image_type: type, image_key: str | None = None) -> str:
  """The image feature of a TFDS FeaturesDict: ``image_key`` if given, else "image", else the only one.

  Args:
    features: name -> feature (the builder's ``info.features``).
    image_type: ``tfds.features.Image`` (passed in, so this stays a pure function).
    image_key: explicit choice (``config.data.image_key``).

  Raises:
    ValueError: no image feature, or the choice is ambiguous or not an image.
  """
  images = [k for k, f in features.items() if isinstance(f, image_type)]
  if image_key is not None:
    if image_key not in images:
      raise errors.ConfigError(f"config.data.image_key={image_key!r} is not an image feature; image features: {images}")
    return image_key
  if "image" in images:
    return "image"
  if len(images) == 1:
    return images[0]
  if not images:
    raise errors.ConfigError(f"the dataset has no image feature (features: {list(features)})")
  raise errors.ConfigError(f"the dataset has several image features {images}: set config.data.image_key")


def _ordered_tfds_splits(names: Sequence[str]) -> list[str]:
  known = [s for s in _TFDS_SPLIT_ORDER if s in names]
  return known + sorted(s for s in names if s not in _TFDS_SPLIT_ORDER)


def _tfds_split_reader(tfds, builder, split: str, image_key: str):
  """(length, fetch(indices) -> list of encoded image bytes) for one TFDS split.

  ArrayRecord data is read through ``as_data_source`` (random access, no TensorFlow); data
  prepared as TFRecord (e.g. by an earlier ``tfds.load``) is read once through tf.data.
  """
  decoders = {image_key: tfds.decode.SkipDecoding()}
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:
    source = None
  if source is not None:
    def fetch(indices):
      return [source[i][image_key] for i in indices]
    return len(source), fetch
  _require_tensorflow(f"reading {builder.name} (prepared as TFRecord)")
  dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  blobs = [ex[image_key] for ex in tfds.as_numpy(dataset)]
  return len(blobs), lambda indices: [blobs[i] for i in indices]


def build_tfds(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  """A TFDS dataset's preprocessed images: ({"train", "validation"}: uint8 arrays, cache info)."""
  tfds = _import_tfds()
  name = options.dataset
  builder = _tfds_builder(name, options.data_dir)
  if not builder.is_prepared():
    if not options.download:
      raise errors.MissingInputError(missing_data_message(name, options.data_dir, _source_filenames(builder)))
    _require_tensorflow(f"downloading {name}")
    unreachable = _unreachable_host(list((type(builder).url_infos or {}).keys()))
    if unreachable:
      # TFDS would retry for minutes before failing; say what to do now.
      raise errors.MissingInputError(f"cannot reach {unreachable} to download {name}.\n"
                              + missing_data_message(name, options.data_dir, _source_filenames(builder)))
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except  # network errors come in many types
      raise errors.MissingInputError(f"downloading {name} failed ({type(e).__name__}: {e}).\n"
                              + missing_data_message(name, options.data_dir, _source_filenames(builder))) from e
  image_key = find_image_key(builder.info.features, tfds.features.Image, options.image_key)
  split_names = list(options.tfds_splits or _ordered_tfds_splits(list(builder.info.splits.keys())))
  if not split_names:
    raise errors.ConfigError(f"TFDS dataset {name!r} reports no splits; name them in config.data.tfds_splits")
  readers = {s: _tfds_split_reader(tfds, builder, s, image_key) for s in split_names}
  assignment = assign_tfds_splits([(s, readers[s][0]) for s in split_names], options)
  arrays, skipped, upsampled = {}, [], 0
  for split in SPLITS:
    items = assignment[split]
    chunk = 512  # read a chunk of records, decode it in threads
    parts = []
    for start in range(0, len(items), chunk):
      part = items[start:start + chunk]
      blob_by_item = {}
      for s in dict.fromkeys(n for n, _ in part):  # group the chunk by TFDS split
        idx = [i for n, i in part if n == s]
        blob_by_item.update(zip([(s, i) for i in idx], readers[s][1](idx)))
      loaders = [functools.partial(decode_image, bytes(blob_by_item[item])) for item in part]
      names = [f"{s}[{i}]" for s, i in part]
      images, bad, small = preprocess_many(loaders, names, image_size, options.antialias, f"{name} {split}")
      parts.append(images)
      skipped += bad
      upsampled += small
    arrays[split] = (np.concatenate(parts) if parts else np.empty((0, image_size, image_size, 3), np.uint8))
  total = sum(readers[s][0] for s in split_names)
  warn_skipped(f"TFDS {name}", skipped, total)
  if len(arrays["train"]) == 0:
    raise errors.InputError(f"TFDS dataset {name!r}: no usable image in the training split "
                            f"({len(skipped)} of {total} records unreadable)")
  info = {"source": f"tfds:{name}", "data_dir": str(builder.data_dir), "image_key": image_key,
          "tfds_splits": {s: readers[s][0] for s in split_names}, "files": total,
          "skipped": len(skipped), "skipped_names": [n for n, _ in skipped[:20]], "upsampled": upsampled}
  return arrays, info
