"""Input pipeline: TFDS datasets, image folders, the bundled digits, normaliser statistics.

Data flow. Every source is decoded, centre-cropped and resized ONCE into a uint8 cache entry
(``train.npy``, ``validation.npy``, ``normalizer.json``, ``meta.json``) under
``config.data.cache_dir`` (default ``~/.cache/ddim_jax``), keyed by dataset, split rule, size and
preprocessing options. Training reads only that cache: NumPy, no TensorFlow, no decoding, so an
epoch cannot fail on a bad file. TensorFlow is needed only to *prepare* a TFDS dataset (run its
builder); building the cache from a prepared TFDS dataset reads its ArrayRecord files through
``tfds`` ``as_data_source`` without importing TensorFlow.

Sources (``config.data.dataset``):
  - any TFDS image dataset by name (``oxford_flowers102``, ``oxford_iiit_pet``, ...): the image
    feature is found in the builder's features (or named by ``config.data.image_key``);
  - ``"folder"``: every .jpg/.jpeg/.png/.webp under ``config.data.folder``, recursively;
  - ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), no download of any kind.

Splits. ``config.data.split = "keras"`` (TFDS only): train = the first 80% of every TFDS split
(``train[:80%]+validation[:80%]+test[:80%]``, TFDS's rounding), validation = the rest; for
oxford_flowers102 that is 6,551 / 1,638. ``"r"``: a seeded random 80/20 split over all images
(R's ``sample.int(N, 0.8 N)``: 6,551 / 1,638, a different draw since NumPy is not R's RNG).
Folders and digits always use the seeded random split (they have no predefined splits).

Preprocessing (Keras): centre crop to the short side with offsets ((h - c) // 2, (w - c) // 2),
bilinear resize with antialiasing (exactly TF's ``scale_and_translate`` triangle kernel, the
kernel ``tf.image.resize(..., antialias=True)`` uses), or without (``config.data.antialias =
False``: the R resize, torch ``interpolate(bilinear, align_corners=False)``), then rounding to
uint8 (at most 0.5/255 from the float Keras pipeline). Batches are float32 in [0, 1].

Public API:
  load_split(config_data, split, image_size) -> uint8 (N, S, S, 3)
  load_normalizer(config_data, image_size) -> {"mean": (3,) f32, "variance": (3,) f32}
  prepare_cache(config_data, image_size) -> CacheEntry (builds the cache entry on a miss)
  compute_normalizer(images_uint8) -> {"mean", "variance"}
  load_digits_images(image_size) -> uint8 (1797, S, S, 3)
  BatchIterator(images, global_batch_size, seed, process_index, process_count, ...)
  create_datasets(config, image_size, process_index, process_count) -> (train_iter, val_images, normalizer)
  prepare_tfds(name, source_dir=None, data_dir=None): run a TFDS builder (offline from local files)
  register_cli(subparsers): the ``ddim-jax prepare-data`` subcommand
  decode_image, center_crop, resize_bilinear, resize_weights, preprocess_image: the pure steps
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

CACHE_FORMAT = 1  # bump when the cached bytes for the same key would change
DEFAULT_CACHE_DIR = "~/.cache/ddim_jax"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = ("train", "validation")
LOCAL_SOURCES = ("digits", "folder")
_NUM_NAMES_IN_WARNING = 5
_TFDS_SPLIT_ORDER = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------
# Options


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
    raise ValueError(f"config.data.split must be 'keras' or 'r', got {options.split!r}")
  if not 0.0 <= options.validation_fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction must be in [0, 1), got {options.validation_fraction}")
  if options.dataset == "folder" and not options.folder:
    raise ValueError("config.data.dataset='folder' needs config.data.folder=PATH (a directory of images)")
  return options


# ----------------------------------------------------------------------------------------------
# Pure image steps


class BadImageError(ValueError):
  """A file or record that cannot be decoded as an image."""


def _pil_to_rgb(image) -> np.ndarray:
  """A loaded PIL image as uint8 (H, W, 3): alpha dropped, gray repeated, 16-bit scaled."""
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    # 16-bit grayscale (PNG opens as I;16, older Pillow as I): scale 0..65535 to 0..255, as
    # PIL's own convert("L") would clip instead.
    gray = np.asarray(image).astype(np.float64)
    gray = np.rint(np.clip(gray, 0, 65535) / 257.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "F":
    gray = np.asarray(image).astype(np.float64)
    scale = 255.0 if np.nanmax(gray) <= 1.0 else 1.0
    gray = np.rint(np.clip(np.nan_to_num(gray) * scale, 0, 255)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
  if image.mode != "RGB":
    image = image.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: alpha is dropped, like TF
  return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, exif_transpose: bool = False) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, WebP, ...) to uint8 RGB (H, W, 3).

  Args:
    data: the encoded file contents.
    exif_transpose: apply the EXIF orientation tag (True for image folders; False for TFDS
      records, as TF's decoder ignores it and Keras saw the unrotated pixels).

  Returns:
    uint8 array (H, W, 3).

  Raises:
    BadImageError: empty, truncated, corrupt or non-image data, or a zero-sized image.
  """
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  if not data:
    raise BadImageError("empty file")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decode fully now: a truncated file fails here, never later
      if exif_transpose:
        image = ImageOps.exif_transpose(image)
      rgb = _pil_to_rgb(image)
  except Image.UnidentifiedImageError as e:
    raise BadImageError("not a recognised image format") from e
  except Exception as e:  # pylint: disable=broad-except  # PIL raises OSError, SyntaxError, ValueError, ...
    raise BadImageError(f"{type(e).__name__}: {e}") from e
  if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise BadImageError(f"unusable image shape {rgb.shape}")
  return rgb


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
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
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
  image = np.asarray(image, dtype=np.float32)
  tmp = np.tensordot(rows, image, axes=(1, 0))  # (height, W, C)
  out = np.tensordot(tmp, cols, axes=(1, 1))  # (height, C, width)
  return np.ascontiguousarray(out.transpose(0, 2, 1))


def quantize(image: np.ndarray) -> np.ndarray:
  """Rounds float pixel values in the 0..255 scale to uint8 (clipped, round-half-even)."""
  return np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)


def preprocess_image(image: np.ndarray, image_size: int, antialias: bool = True) -> np.ndarray:
  """Centre crop to the short side, bilinear resize to ``image_size``, round to uint8.

  Args:
    image: uint8 (H, W, 3).
    image_size: output side S.
    antialias: see `resize_weights`.

  Returns:
    uint8 (S, S, 3).
  """
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
    raise ValueError(f"compute_normalizer expects uint8 images, got {images.dtype}")
  channels = images.shape[-1]
  flat = images.reshape(-1, channels)
  if flat.shape[0] == 0:
    raise ValueError("compute_normalizer needs at least one image")
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, variance = np.zeros(channels), np.zeros(channels)
  for c in range(channels):
    counts = np.bincount(flat[:, c], minlength=256).astype(np.float64)
    total = counts.sum()
    mean[c] = (counts * values).sum() / total
    variance[c] = (counts * (values - mean[c]) ** 2).sum() / total
  return {"mean": mean.astype(np.float32), "variance": variance.astype(np.float32)}


def load_digits_images(image_size: int) -> np.ndarray:
  """scikit-learn's bundled digits (1,797 8x8, values 0..16) as uint8 RGB (1797, S, S, 3).

  Bilinear upsampling (half-pixel centres, edges clamped; antialiasing only matters below 8
  pixels), value 16 -> 255, gray repeated over 3 channels. No download of any kind.

  Args:
    image_size: output side S.

  Returns:
    uint8 array (1797, S, S, 3).
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits().images.astype(np.float64)  # (1797, 8, 8) in 0..16
  weights = resize_weights(digits.shape[1], image_size, antialias=True)
  upsampled = weights @ digits @ weights.T  # (S, 8) @ (N, 8, 8) @ (8, S)
  gray = quantize(upsampled * (255.0 / 16.0))
  return np.repeat(gray[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------------------------
# Splits


def keras_train_count(num_examples: int, train_percent: float = 80.0) -> int:
  """Size of ``split[:train_percent%]`` with TFDS's "closest" rounding: round(p * n / 100)."""
  return int(round(train_percent * num_examples / 100.0))


def random_split(num_examples: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random split (R's ``sample.int(N, train_fraction * N)``, truncated), indices sorted.

  Returns:
    (train_indices, validation_indices), int64, disjoint, covering range(num_examples).
  """
  num_train = int(math.floor(num_examples * train_fraction + 1e-9))
  num_train = min(num_examples, max(num_train, 1 if num_examples else 0))
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[:num_train]), np.sort(order[num_train:])


def assign_tfds_splits(split_sizes: Sequence[tuple[str, int]], options: DataOptions) -> dict[str, list]:
  """Which (tfds_split, index) goes to our train and validation sets.

  Args:
    split_sizes: ordered (tfds split name, number of examples).
    options: ``split`` ("keras" or "r"), ``validation_fraction``, ``split_seed``.

  Returns:
    {"train": [(name, index), ...], "validation": [...]}, in source order.
  """
  train_percent = 100.0 * (1.0 - options.validation_fraction)
  if options.split == "keras":
    out = {"train": [], "validation": []}
    for name, size in split_sizes:
      boundary = keras_train_count(size, train_percent)
      out["train"] += [(name, i) for i in range(boundary)]
      out["validation"] += [(name, i) for i in range(boundary, size)]
    return out
  everything = [(name, i) for name, size in split_sizes for i in range(size)]
  train, validation = random_split(len(everything), 1.0 - options.validation_fraction, options.split_seed)
  return {"train": [everything[i] for i in train], "validation": [everything[i] for i in validation]}


# ----------------------------------------------------------------------------------------------
# The cache


@dataclasses.dataclass
class CacheEntry:
  """One prepared dataset: its directory and the contents of its ``meta.json``."""
  path: str
  meta: dict
  built: bool = False  # True when this call decoded the source

  def split_path(self, split: str) -> str:
    return os.path.join(self.path, f"{split}.npy")


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


def _folder_fingerprint(folder: str, files: Sequence[str]) -> str:
  """Changes when a file is added, removed, resized or touched (so the cache is rebuilt)."""
  digest = hashlib.sha256()
  for rel in files:
    stat = os.stat(os.path.join(folder, rel))
    digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


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
    key["listing"] = _folder_fingerprint(options.folder, files)
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


def _write_entry(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """Writes a cache entry atomically: a temporary directory renamed into place.

  Several processes may build the same entry at once (multi-host on a shared file system); the
  first rename wins and the others discard their identical copy.
  """
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    for split, array in arrays.items():
      np.save(os.path.join(tmp, f"{split}.npy"), array)
    normalizer = compute_normalizer(arrays["train"])
    with open(os.path.join(tmp, "normalizer.json"), "w", encoding="utf-8") as f:
      json.dump({k: v.astype(float).tolist() for k, v in normalizer.items()}, f, indent=1)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, "meta.json")):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(path: str) -> dict | None:
  try:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------------------------
# Decoding many images


def _num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def _single_threaded_blas():
  """One BLAS thread per caller while our threads resize: the small per-image products are
  otherwise split over BLAS threads that contend with ours (measured 10x slower on 2 cores)."""
  try:
    import threadpoolctl  # pylint: disable=import-outside-toplevel  # comes with scikit-learn
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def _preprocess_many(loaders: Sequence[Callable[[], np.ndarray]], names: Sequence[str], image_size: int,
                     antialias: bool, desc: str) -> tuple[np.ndarray, list[tuple[str, str]], int]:
  """Runs every loader (decode) and `preprocess_image` in a thread pool, keeping the order.

  PIL's decoders and NumPy's matrix products release the GIL, so threads scale on CPU cores.

  Returns:
    (uint8 (n_ok, S, S, 3) in input order, [(name, reason) of skipped items], number upsampled).
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  def work(loader):
    try:
      image = loader()
    except BadImageError as e:
      return None, str(e), False
    return preprocess_image(image, image_size, antialias), None, min(image.shape[:2]) < image_size

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


def _warn_skipped(source: str, skipped: Sequence[tuple[str, str]], total: int) -> None:
  if not skipped:
    return
  first = "; ".join(f"{name} ({reason})" for name, reason in skipped[:_NUM_NAMES_IN_WARNING])
  more = f" and {len(skipped) - _NUM_NAMES_IN_WARNING} more" if len(skipped) > _NUM_NAMES_IN_WARNING else ""
  message = f"{source}: skipped {len(skipped)} of {total} files that are not readable images: {first}{more}"
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read_file(path: str) -> Callable[[], np.ndarray]:
  def load():
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadImageError(f"{type(e).__name__}: {e}") from e
    return decode_image(data, exif_transpose=True)
  return load


def _build_folder(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  folder = options.folder
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist (config.data.folder)")
  files, others = list_image_files(folder)
  if not files:
    raise ValueError(f"image folder {folder!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, searched "
                     f"recursively; {len(others)} other files ignored)")
  train_idx, val_idx = random_split(len(files), 1.0 - options.validation_fraction, options.split_seed)
  arrays, skipped, upsampled = {}, [], 0
  for split, idx in (("train", train_idx), ("validation", val_idx)):
    names = [files[i] for i in idx]
    loaders = [_read_file(os.path.join(folder, name)) for name in names]
    arrays[split], bad, small = _preprocess_many(loaders, names, image_size, options.antialias, f"folder {split}")
    skipped += bad
    upsampled += small
  _warn_skipped(f"image folder {folder}", skipped, len(files))
  if len(arrays["train"]) + len(arrays["validation"]) == 0:
    raise ValueError(f"image folder {folder!r}: none of its {len(files)} image files could be read "
                     f"(first: {', '.join(n for n, _ in skipped[:_NUM_NAMES_IN_WARNING])})")
  if len(arrays["train"]) == 0:
    raise ValueError(f"image folder {folder!r}: no readable image landed in the training split")
  info = {"source": folder, "files": len(files), "ignored_non_image_files": len(others),
          "skipped": len(skipped), "skipped_names": [n for n, _ in skipped[:20]], "upsampled": upsampled}
  return arrays, info


def _build_digits(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  images = load_digits_images(image_size)
  train_idx, val_idx = random_split(len(images), 1.0 - options.validation_fraction, options.split_seed)
  arrays = {"train": images[train_idx], "validation": images[val_idx]}
  return arrays, {"source": "sklearn.datasets.load_digits", "files": len(images), "skipped": 0,
                  "skipped_names": [], "upsampled": len(images) if image_size > 8 else 0}


# ----------------------------------------------------------------------------------------------
# TFDS


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("TFDS datasets need tensorflow-datasets: pip install 'ddim-jax[tfds]' "
                      "(or use config.data.dataset='digits' or 'folder', which need nothing)") from e
  return tfds


def _require_tensorflow(what: str) -> None:
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(f"{what} runs the TFDS builder, which needs TensorFlow: pip install 'ddim-jax[tfds]'")


def _tfds_builder(name: str, data_dir: str | None):
  tfds = _import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError and friends
    raise ValueError(f"unknown dataset {name!r}: not 'digits', 'folder' or a TFDS dataset ({e})") from e


def _source_filenames(builder) -> list[str]:
  """Names of the original files a TFDS builder downloads (from its registered checksums)."""
  infos = type(builder).url_infos or {}
  return sorted({info.filename for info in infos.values() if getattr(info, "filename", None)})


def _unreachable_host(urls: Sequence[str], timeout: float = 5.0) -> str | None:
  """The first download host that cannot be connected to within ``timeout`` s, or None.

  Skipped (None) behind a proxy, where a direct connection says nothing.
  """
  import socket  # pylint: disable=import-outside-toplevel
  import urllib.parse  # pylint: disable=import-outside-toplevel
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
        raise FileNotFoundError(f"--source-dir {source_dir!r} is not a directory")
      expected = _source_filenames(builder)
      missing = [f for f in expected if not os.path.exists(os.path.join(source_dir, f))]
      if missing:
        # Without this check TFDS would silently try to download the missing files.
        raise FileNotFoundError(f"{source_dir} lacks {', '.join(missing)} (the original files of {name}: "
                                f"{', '.join(expected)})")
      download_config = tfds.download.DownloadConfig(manual_dir=source_dir)
    else:
      unreachable = _unreachable_host(list((type(builder).url_infos or {}).keys()))
      if unreachable:
        raise FileNotFoundError(f"cannot reach {unreachable} to download {name}.\n"
                                + missing_data_message(name, data_dir, _source_filenames(builder)))
    try:
      builder.download_and_prepare(download_config=download_config, file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ != "NonMatchingChecksumError":
        raise
      where = f"in {source_dir}" if source_dir else "downloaded"
      raise ValueError(f"a file {where} is not the original of {name} (size/SHA-256 differ from the ones "
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
      raise ValueError(f"config.data.image_key={image_key!r} is not an image feature; image features: {images}")
    return image_key
  if "image" in images:
    return "image"
  if len(images) == 1:
    return images[0]
  if not images:
    raise ValueError(f"the dataset has no image feature (features: {list(features)})")
  raise ValueError(f"the dataset has several image features {images}: set config.data.image_key")


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


def _build_tfds(options: DataOptions, image_size: int) -> tuple[dict, dict]:
  tfds = _import_tfds()
  name = options.dataset
  builder = _tfds_builder(name, options.data_dir)
  if not builder.is_prepared():
    if not options.download:
      raise FileNotFoundError(missing_data_message(name, options.data_dir, _source_filenames(builder)))
    _require_tensorflow(f"downloading {name}")
    unreachable = _unreachable_host(list((type(builder).url_infos or {}).keys()))
    if unreachable:
      # TFDS would retry for minutes before failing; say what to do now.
      raise FileNotFoundError(f"cannot reach {unreachable} to download {name}.\n"
                              + missing_data_message(name, options.data_dir, _source_filenames(builder)))
    try:
      builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except  # network errors come in many types
      raise FileNotFoundError(f"downloading {name} failed ({type(e).__name__}: {e}).\n"
                              + missing_data_message(name, options.data_dir, _source_filenames(builder))) from e
  image_key = find_image_key(builder.info.features, tfds.features.Image, options.image_key)
  split_names = list(options.tfds_splits or _ordered_tfds_splits(list(builder.info.splits.keys())))
  if not split_names:
    raise ValueError(f"TFDS dataset {name!r} reports no splits; name them in config.data.tfds_splits")
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
      images, bad, small = _preprocess_many(loaders, names, image_size, options.antialias, f"{name} {split}")
      parts.append(images)
      skipped += bad
      upsampled += small
    arrays[split] = (np.concatenate(parts) if parts else np.empty((0, image_size, image_size, 3), np.uint8))
  total = sum(readers[s][0] for s in split_names)
  _warn_skipped(f"TFDS {name}", skipped, total)
  if len(arrays["train"]) == 0:
    raise ValueError(f"TFDS dataset {name!r}: no usable image in the training split "
                     f"({len(skipped)} of {total} records unreadable)")
  info = {"source": f"tfds:{name}", "data_dir": str(builder.data_dir), "image_key": image_key,
          "tfds_splits": {s: readers[s][0] for s in split_names}, "files": total,
          "skipped": len(skipped), "skipped_names": [n for n, _ in skipped[:20]], "upsampled": upsampled}
  return arrays, info


# ----------------------------------------------------------------------------------------------
# Public loading


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
  path = cache_path(options, image_size)
  meta = None if force else _read_meta(path)
  if meta is not None:
    return CacheEntry(path, meta, built=False)
  if force and os.path.exists(path):
    shutil.rmtree(path)
  start = time.time()
  if options.dataset == "digits":
    arrays, info = _build_digits(options, image_size)
  elif options.dataset == "folder":
    arrays, info = _build_folder(options, image_size)
  else:
    arrays, info = _build_tfds(options, image_size)
  meta = {"key": cache_key(options, image_size), "splits": {k: int(len(v)) for k, v in arrays.items()},
          "seconds": round(time.time() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
  _write_entry(path, arrays, meta)
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
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  entry = prepare_cache(config_data, image_size)
  return np.load(entry.split_path(split), mmap_mode="r" if mmap else None)


def load_normalizer(config_data: Any, image_size: int) -> dict[str, np.ndarray]:
  """The stored per-channel {"mean", "variance"} (float32, (3,)) of the training split."""
  entry = prepare_cache(config_data, image_size)
  with open(os.path.join(entry.path, "normalizer.json"), encoding="utf-8") as f:
    stored = json.load(f)
  return {k: np.asarray(stored[k], np.float32) for k in ("mean", "variance")}


# ----------------------------------------------------------------------------------------------
# Batches


class BatchIterator:
  """Batches of a uint8 image array: repeat, shuffle, batch, shard over processes; resumable.

  Keras order of operations: cache -> repeat(repetitions) -> shuffle -> batch(drop_remainder).
  An epoch is one pass over the repeated set (N * repetitions examples). Instead of tf.data's
  640-element shuffle buffer, every epoch is a full permutation of the repeated set drawn from
  ``np.random.default_rng([seed, epoch])`` (a better shuffle; the order is not tf.data's).

  Global batch k of an epoch is positions [k B, (k + 1) B) of that permutation; process p of P
  yields its local part, positions [p B/P, (p + 1) B/P) of the global batch. So the processes
  read disjoint examples, their union is the global batch (and over an epoch the whole
  repeated set), and the global batch does not depend on P. Batches are
  {"images": float32 (B/P, S, S, 3) in [0, 1]} (x / 255, exactly).

  The position is (epoch, index): `get_state` / `set_state` save and restore it, and a restored
  iterator continues with the batches the saved one would have yielded.
  """

  def __init__(self, images: np.ndarray, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, repetitions: int = 1, shuffle: bool = True, drop_remainder: bool = True,
               num_epochs: int | None = None):
    """Args:
      images: uint8 (N, S, S, C), the whole dataset (every process holds it; a memmap works).
      global_batch_size: B, summed over processes; must be divisible by ``process_count``.
      seed: shuffling seed (the same on every process).
      process_index: this process, in [0, process_count).
      process_count: number of processes P.
      repetitions: copies of the dataset per epoch (Keras ``repeat(5)``).
      shuffle: permute every epoch; False keeps the stored order.
      drop_remainder: drop the last incomplete global batch (Keras); otherwise it is yielded and
        split as evenly as possible over the processes.
      num_epochs: stop after this many epochs; None iterates forever.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                       f"process count {process_count}")
    if repetitions < 1:
      raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    self.images = images
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.repetitions = int(repetitions)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.num_epochs = num_epochs
    self.epoch_size = len(images) * self.repetitions
    if self.drop_remainder:
      self.steps_per_epoch = self.epoch_size // self.global_batch_size
    else:
      self.steps_per_epoch = -(-self.epoch_size // self.global_batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(images)} images x {repetitions} repetitions make no full batch of "
                       f"{global_batch_size}")
    self._epoch = 0
    self._index = 0
    self._order_epoch = None
    self._order = None
    # x / 255 as a lookup table: the same float32 values as the division, one gather per pixel.
    self._to_float = np.arange(256, dtype=np.float32) / np.float32(255.0)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The global order of example indices (into ``images``) of ``epoch`` (all processes agree)."""
    if self._order_epoch != epoch:
      order = np.tile(np.arange(len(self.images), dtype=np.int64), self.repetitions)
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(order)
      self._order_epoch, self._order = epoch, order
    return self._order

  def local_indices(self, epoch: int, index: int) -> np.ndarray:
    """Indices into ``images`` of this process's part of global batch ``index`` of ``epoch``."""
    start = index * self.global_batch_size
    batch = self.epoch_order(epoch)[start:start + self.global_batch_size]
    n, p, count = len(batch), self.process_index, self.process_count
    return batch[p * n // count:(p + 1) * n // count]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    indices = self.local_indices(self._epoch, self._index)
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return {"images": self._to_float[self.images[indices]]}

  def get_state(self) -> dict[str, int]:
    """The position: {"epoch", "index"} (next global batch), plain ints for a checkpoint."""
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position saved by `get_state` (from an iterator with the same arguments)."""
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < self.steps_per_epoch:
      raise ValueError(f"iterator state {dict(state)} is outside [0, {self.steps_per_epoch}) steps per epoch")
    self._epoch, self._index = epoch, index


def create_datasets(config: Any, image_size: int | None = None, process_index: int = 0,
                    process_count: int = 1) -> tuple[BatchIterator, np.ndarray, dict[str, np.ndarray]]:
  """The training iterator, the validation images and the normaliser of ``config``.

  Args:
    config: the full config (``config.data``, ``config.train.batch_size`` (global), ``config.seed``).
    image_size: side S (default ``config.model.image_size``).
    process_index: ``jax.process_index()`` of the caller.
    process_count: ``jax.process_count()``.

  Returns:
    (train BatchIterator yielding this process's part of each global batch, validation uint8
    (N, S, S, 3) (whole; shard it with a BatchIterator if needed), {"mean", "variance"}).
  """
  image_size = int(image_size or config.model.image_size)
  train_images = load_split(config.data, "train", image_size)
  val_images = load_split(config.data, "validation", image_size)
  normalizer = load_normalizer(config.data, image_size)
  train_iter = BatchIterator(train_images, int(config.train.batch_size), seed=int(config.seed),
                             process_index=process_index, process_count=process_count,
                             repetitions=int(config.data.get("repetitions", 1)), shuffle=True, drop_remainder=True)
  return train_iter, val_images, normalizer


# ----------------------------------------------------------------------------------------------
# CLI


def cmd_prepare_data(args) -> int:
  """``ddim-jax prepare-data``: prepare a TFDS dataset (offline with --source-dir) and build the cache."""
  start = time.time()
  if args.dataset not in LOCAL_SOURCES:
    try:
      result = prepare_tfds(args.dataset, source_dir=args.source_dir, data_dir=args.data_dir)
    except ImportError as e:
      raise ValueError(str(e)) from e
    state = "already prepared" if result["already_prepared"] else f"prepared in {result['seconds']:.1f}s"
    print(f"{args.dataset}: TFDS {state} at {result['data_dir']}; TFDS splits {result['splits']}")
  elif args.source_dir:
    raise ValueError("--source-dir is for TFDS datasets; use --folder for an image folder")
  if args.image_size <= 0:
    return 0
  config_data = {"dataset": args.dataset, "data_dir": args.data_dir, "folder": args.folder,
                 "cache_dir": args.cache_dir or DEFAULT_CACHE_DIR, "split": args.split,
                 "antialias": not args.no_antialias, "split_seed": args.split_seed, "download": False}
  entry = prepare_cache(config_data, args.image_size, force=args.force)
  meta = entry.meta
  normalizer = load_normalizer(config_data, args.image_size)
  how = f"built in {meta['seconds']:.1f}s" if entry.built else "already cached"
  print(f"cache {how}: {entry.path}")
  print(f"  {args.image_size}x{args.image_size}, split={meta['key']['split']}, antialias={not args.no_antialias}: "
        f"train {meta['splits']['train']}, validation {meta['splits']['validation']} images")
  if meta.get("skipped"):
    print(f"  skipped {meta['skipped']} unreadable images (first: {', '.join(meta['skipped_names'][:5])})")
  print(f"  normalizer mean {[round(float(v), 4) for v in normalizer['mean']]} "
        f"variance {[round(float(v), 4) for v in normalizer['variance']]}")
  print(f"done in {time.time() - start:.1f}s")
  return 0


def register_cli(subparsers) -> None:
  """Adds the ``prepare-data`` subcommand to the ``ddim-jax`` argparse subparsers."""
  p = subparsers.add_parser(
      "prepare-data", help="prepare a dataset (TFDS offline from local files) and its preprocessed cache",
      description="Prepares a TFDS dataset (downloading it, or offline from local copies of its original "
                  "files with --source-dir) and builds the uint8 cache that training reads.")
  p.add_argument("--dataset", default="oxford_flowers102", help="a TFDS name, 'digits' or 'folder'")
  p.add_argument("--source-dir", default=None,
                 help="directory with the dataset's original files (oxford_flowers102: 102flowers.tgz, "
                      "imagelabels.mat, setid.mat); without it TFDS downloads them")
  p.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
  p.add_argument("--folder", default=None, help="image folder for --dataset folder")
  p.add_argument("--image-size", type=int, default=64, help="cache size; 0 prepares TFDS only")
  p.add_argument("--cache-dir", default=None, help=f"preprocessed-image cache (default {DEFAULT_CACHE_DIR})")
  p.add_argument("--split", default="keras", choices=("keras", "r"))
  p.add_argument("--no-antialias", action="store_true", help="the R resize (bilinear without antialiasing)")
  p.add_argument("--split-seed", type=int, default=1)
  p.add_argument("--force", action="store_true", help="rebuild the cache entry")
  p.set_defaults(fn=cmd_prepare_data)
