"""Tests of ddim_jax.data: preprocessing, sources, cache, bad input, batches, sharding.

Tests that need TensorFlow / tensorflow-datasets (the ``tfds`` extra) skip with a reason when
it is absent; everything else runs on the core dependencies. No network.
"""

import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ddim_jax.data import prepare, tfds_source
from ddim_jax.data.cache import load_normalizer, load_split, prepare_cache
from ddim_jax.data.images import (BadImageError, center_crop, compute_normalizer, decode_image, preprocess_image,
                                  resize_bilinear, resize_weights)
from ddim_jax.data.iterator import BatchIterator, create_datasets
from ddim_jax.data.options import SPLITS
from ddim_jax.data.prepare import build_cache, prepare_source
from ddim_jax.data import sources
from ddim_jax.data.sources import load_digits_images, load_digits_labels
from ddim_jax.data.splits import keras_train_count
from ddim_jax.data.tfds_source import find_image_key, prepare_tfds

sys.path.insert(0, os.path.dirname(__file__))
import data_fixtures  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tf():
  return pytest.importorskip("tensorflow", reason="TensorFlow (the tfds extra) is not installed")


def _tfds():
  return pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets (the tfds extra) is not installed")


def _indexed_images(n, size=4):
  """uint8 (n, size, size, 3) whose pixels encode the example index (i % 256, i // 256, 7)."""
  images = np.zeros((n, size, size, 3), np.uint8)
  images[..., 0] = (np.arange(n) % 256)[:, None, None]
  images[..., 1] = (np.arange(n) // 256)[:, None, None]
  images[..., 2] = 7
  return images


def _batch_indices(batch):
  """Inverse of `_indexed_images` on a float batch."""
  pixels = np.rint(batch["images"][:, 0, 0] * 255).astype(np.int64)
  return pixels[:, 0] + 256 * pixels[:, 1]


# ---------------------------------------------------------------------------------------------
# Pure preprocessing


@pytest.mark.parametrize("shape, expected_top_left", [((10, 15), (0, 2)), ((15, 10), (2, 0)), ((11, 14), (0, 1)),
                                                      ((7, 7), (0, 0)), ((4, 9), (0, 2))])
def test_center_crop_uses_keras_offsets(shape, expected_top_left):
  # Offsets worked out by hand from ((h - c) // 2, (w - c) // 2).
  h, w = shape
  image = (np.arange(h)[:, None] * 100 + np.arange(w)[None, :])[..., None]
  crop = center_crop(image)
  c = min(h, w)
  assert crop.shape[:2] == (c, c)
  top, left = expected_top_left
  assert crop[0, 0, 0] == top * 100 + left
  assert crop[-1, -1, 0] == (top + c - 1) * 100 + (left + c - 1)


def test_resize_weights_are_normalised_and_identity_at_same_size():
  for in_size, out_size in [(500, 64), (8, 16), (64, 64), (13, 64), (3, 1)]:
    for antialias in (True, False):
      weights = resize_weights(in_size, out_size, antialias)
      assert weights.shape == (out_size, in_size)
      np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
      assert (weights >= 0).all()
  np.testing.assert_array_equal(resize_weights(64, 64, True), np.eye(64))
  # Antialiasing widens the kernel when downscaling: 4x down averages 8 taps, plain bilinear 2.
  assert (resize_weights(64, 16, True)[5] > 0).sum() == 8
  assert (resize_weights(64, 16, False)[5] > 0).sum() == 2


SHAPES = [(37, 53, 16), (500, 375, 64), (8, 8, 16), (100, 100, 64), (13, 29, 64)]


@pytest.mark.parametrize("antialias", [True, False])
def test_resize_matches_tf_image_resize(antialias):
  tf = _tf()
  rng = np.random.default_rng(0)
  for h, w, size in SHAPES:
    image = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
    expected = tf.image.resize(image[None], [size, size], method="bilinear", antialias=antialias).numpy()[0]
    # Same kernel; only float32 summation order differs: ~1e-6 relative on values up to 255.
    np.testing.assert_allclose(resize_bilinear(image, size, size, antialias), expected, atol=2e-3, rtol=0)


def test_resize_without_antialias_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  for h, w, size in SHAPES:
    image = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(size, size),
                                               mode="bilinear", align_corners=False, antialias=False)
    np.testing.assert_allclose(resize_bilinear(image, size, size, antialias=False),
                               expected[0].permute(1, 2, 0).numpy(), atol=2e-3, rtol=0)


def _tf_keras_pipeline(tf, data, size, dct_method):
  """The Keras example's preprocessing in TF, quantised like the cache."""
  image = tf.io.decode_jpeg(data, channels=3, dct_method=dct_method)
  h, w = int(image.shape[0]), int(image.shape[1])
  crop = min(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - crop) // 2, (w - crop) // 2, crop, crop)
  image = tf.image.resize(image, [size, size], antialias=True)
  return np.rint(np.clip(image.numpy(), 0, 255)).astype(np.uint8)


def test_preprocess_matches_the_tf_keras_pipeline():
  tf = _tf()
  exact, fast = [], []
  for i in range(12):
    data = data_fixtures.jpeg_bytes(data_fixtures.smooth_image(50 + 9 * i, 140 - 6 * i, i))
    ours = preprocess_image(decode_image(data), 32).astype(np.int64)
    exact.append(np.abs(ours - _tf_keras_pipeline(tf, data, 32, "INTEGER_ACCURATE")))
    fast.append(np.abs(ours - _tf_keras_pipeline(tf, data, 32, "")))
  exact, fast = np.stack(exact), np.stack(fast)
  # PIL decodes JPEG with libjpeg's accurate integer IDCT, as TF's INTEGER_ACCURATE: the same
  # pixels; the resizes then agree to ~1e-4, so a uint8 rounding can flip only at a .5 tie.
  assert exact.max() <= 1 and (exact > 0).mean() < 1e-3
  # TF's default decoder (what Keras ran) uses the fast IDCT: a few levels per decoded pixel,
  # averaged down by the resize (documented in docs/data.md).
  assert fast.max() <= 8 and fast.mean() < 2.0


# ---------------------------------------------------------------------------------------------
# Decoding bad input


def _png_bytes(array, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array, **kwargs).save(buffer, format="PNG")
  return buffer.getvalue()


def test_decode_converts_gray_rgba_palette_and_16_bit():
  rgb = data_fixtures.smooth_image(20, 30, 3)
  gray = rgb[..., 0]
  decoded = decode_image(_png_bytes(gray, mode="L"))
  assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((20, 30, 1), 17, np.uint8)], -1)
  np.testing.assert_array_equal(decode_image(_png_bytes(rgba, mode="RGBA")), rgb)  # alpha dropped
  gray16 = gray.astype(np.uint16) * 257  # exact 8 -> 16 bit expansion
  np.testing.assert_array_equal(decode_image(_png_bytes(gray16)), np.repeat(gray[..., None], 3, -1))
  palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  buffer = io.BytesIO()
  palette.save(buffer, format="PNG")
  np.testing.assert_array_equal(decode_image(buffer.getvalue()), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + bytes(100)])
def test_decode_rejects_non_images(data):
  with pytest.raises(BadImageError):
    decode_image(data)


def test_decode_rejects_truncated_jpeg():
  data = data_fixtures.jpeg_bytes(data_fixtures.smooth_image(64, 64, 0))
  with pytest.raises(BadImageError, match="truncated"):
    decode_image(data[:len(data) // 2])


# ---------------------------------------------------------------------------------------------
# Image folders


def test_folder_with_every_kind_of_bad_input(tmp_path):
  layout = data_fixtures.make_bad_folder(tmp_path / "images")
  config = {"dataset": "folder", "folder": str(tmp_path / "images"), "cache_dir": str(tmp_path / "cache")}
  with pytest.warns(RuntimeWarning, match=f"skipped {len(layout['bad'])} of") as record:
    entry = prepare_cache(config, 24)
  message = str(record[0].message)
  for name in layout["bad"]:
    assert name in message  # the first names are listed (there are fewer than the limit here)
  assert entry.built
  assert entry.meta["skipped"] == len(layout["bad"])
  assert sorted(entry.meta["skipped_names"]) == sorted(layout["bad"])
  assert entry.meta["ignored_non_image_files"] == len(layout["ignored"])
  assert entry.meta["upsampled"] == 1  # tiny.png (10x14) is smaller than 24
  train, val = load_split(config, "train", 24), load_split(config, "validation", 24)
  assert len(train) + len(val) == len(layout["good"])
  # The split is drawn over all image files, bad ones included: 13 files -> floor(0.8 * 13) = 10.
  num_files = len(layout["good"]) + len(layout["bad"])
  assert entry.meta["splits"]["train"] + entry.meta["splits"]["validation"] == len(layout["good"])
  assert entry.meta["files"] == num_files
  for images in (train, val):
    assert images.dtype == np.uint8 and images.shape[1:] == (24, 24, 3)
  # Each good file, preprocessed on its own, appears in the cache.
  cached = {img.tobytes() for img in np.concatenate([train, val])}
  for name in layout["good"]:
    with open(tmp_path / "images" / name, "rb") as f:
      expected = preprocess_image(decode_image(f.read(), exif_transpose=True), 24)
    assert expected.tobytes() in cached, name


def test_folder_cache_is_reused_and_invalidated_by_changes(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(6):
    Image.fromarray(data_fixtures.smooth_image(40, 50, i)).save(folder / f"{i}.png")
  config = {"dataset": "folder", "folder": str(folder), "cache_dir": str(tmp_path / "cache")}
  first = prepare_cache(config, 16)
  again = prepare_cache(config, 16)
  assert first.built and not again.built and first.path == again.path
  Image.fromarray(data_fixtures.smooth_image(40, 50, 9)).save(folder / "new.png")
  changed = prepare_cache(config, 16)
  assert changed.built and changed.path != first.path
  assert sum(changed.meta["splits"].values()) == 7
  other_size = prepare_cache(config, 8)
  assert other_size.path != changed.path and load_split(config, "train", 8).shape[1:] == (8, 8, 3)


def test_folder_without_usable_images_is_an_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="holds no image files"):
    prepare_cache({"dataset": "folder", "folder": str(empty), "cache_dir": str(tmp_path / "c")}, 16)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.jpg").write_bytes(b"not a jpeg")
  (broken / "b.png").write_bytes(b"")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises(ValueError, match="none of its 2 image files could be read"):
      prepare_cache({"dataset": "folder", "folder": str(broken), "cache_dir": str(tmp_path / "c")}, 16)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prepare_cache({"dataset": "folder", "folder": str(tmp_path / "missing"), "cache_dir": str(tmp_path / "c")}, 16)
  with pytest.raises(ValueError, match="config.data.folder"):
    prepare_cache({"dataset": "folder", "cache_dir": str(tmp_path / "c")}, 16)


# ---------------------------------------------------------------------------------------------
# Digits, normaliser, cache


def test_bundled_digits_are_scikit_learns():
  """The shipped file is the one scikit-learn reads: same images, same labels (dev extra installs it)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  reference = load_digits()
  np.testing.assert_array_equal(load_digits_images(8)[..., 0], np.rint(reference.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(load_digits_labels(), reference.target)
  assert load_digits_labels().dtype == np.int64


def test_digits_need_no_scikit_learn():
  """A demo install has no scikit-learn: loading the digits must not import it."""
  code = ("import sys; sys.modules['sklearn'] = None\n"  # any `import sklearn` now raises ImportError
          "from ddim_jax.data import load_digits_images, load_digits_labels\n"
          "print(load_digits_images(16).shape, load_digits_labels()[:5].tolist())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.split() == ["(1797,", "16,", "16,", "3)", "[0,", "1,", "2,", "3,", "4]"]


def test_digits_images():
  raw = np.loadtxt(gzip.open(sources.DIGITS_FILE, "rt"), delimiter=",")[:, :64].reshape(-1, 8, 8)  # 0..16
  images = load_digits_images(16)
  assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # At 8x8 the resize is the identity, so the values are exactly 16 -> 255 scaled.
  native = load_digits_images(8)
  np.testing.assert_array_equal(native[..., 1], np.rint(raw * 255 / 16).astype(np.uint8))
  # Upsampling keeps the mean brightness of each digit (bilinear with clamped edges, ~).
  np.testing.assert_allclose(images[..., 0].mean(axis=(1, 2)), native[..., 0].mean(axis=(1, 2)), atol=8)


def test_normalizer_matches_float64_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 9, 9, 3), dtype=np.uint8)
  images[..., 2] //= 4  # channels with different statistics
  stats = compute_normalizer(images)
  pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
  assert stats["mean"].dtype == np.float32 and stats["mean"].shape == (3,)
  np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats["variance"], pixels.var(0), rtol=1e-6)  # biased (ddof=0)
  with pytest.raises(ValueError):
    compute_normalizer(images.astype(np.float32))


def test_digits_cache_splits_and_stored_normalizer(tmp_path):
  config = {"dataset": "digits", "cache_dir": str(tmp_path)}
  entry = prepare_cache(config, 16)
  assert entry.meta["splits"] == {"train": int(0.8 * 1797), "validation": 1797 - int(0.8 * 1797)}
  train = load_split(config, "train", 16)
  val = load_split(config, "validation", 16)
  everything = load_digits_images(16)
  # Disjoint and complete: the split is a partition of the 1,797 images (compared as byte rows,
  # as a multiset since some digits are identical).
  rows = sorted(x.tobytes() for x in np.concatenate([train, val]))
  assert rows == sorted(x.tobytes() for x in everything)
  stored = load_normalizer(config, 16)
  direct = compute_normalizer(train)
  for k in ("mean", "variance"):
    assert stored[k].dtype == np.float32
    np.testing.assert_array_equal(stored[k], direct[k])
  # A different seed gives a different split of the same images.
  other = load_split({**config, "split_seed": 2}, "train", 16)
  assert other.shape == train.shape and not np.array_equal(other, train)


def test_cache_hit_reads_without_tensorflow_or_tfds(tmp_path):
  config = {"dataset": "digits", "cache_dir": str(tmp_path)}
  expected = load_split(config, "train", 16)
  code = ("import sys, json, numpy as np\n"
          "from ddim_jax.data import BatchIterator, load_split\n"
          f"x = load_split({config!r}, 'train', 16)\n"
          "it = BatchIterator(x, 8, seed=0)\n"
          "b = next(it)['images']\n"
          "print(json.dumps({'sum': int(x.astype(np.int64).sum()), 'tf': 'tensorflow' in sys.modules,\n"
          "                  'tfds': 'tensorflow_datasets' in sys.modules, 'shape': list(b.shape)}))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"sum": int(expected.astype(np.int64).sum()), "tf": False, "tfds": False, "shape": [8, 16, 16, 3]}


# ---------------------------------------------------------------------------------------------
# BatchIterator


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_global_batches(process_count):
  images = _indexed_images(301)
  batch, repetitions = 12, 2
  iters = [BatchIterator(images, batch, seed=5, process_index=p, process_count=process_count,
                         repetitions=repetitions) for p in range(process_count)]
  single = BatchIterator(images, batch, seed=5, repetitions=repetitions)
  steps = single.steps_per_epoch
  assert steps == 301 * repetitions // batch and all(it.steps_per_epoch == steps for it in iters)
  seen = []
  for _ in range(steps):
    local = [_batch_indices(next(it)) for it in iters]
    assert all(len(part) == batch // process_count for part in local)
    union = np.concatenate(local)
    np.testing.assert_array_equal(union, _batch_indices(next(single)))  # independent of P
    seen.append(union)
  seen = np.concatenate(seen)
  counts = np.bincount(seen, minlength=301)
  # One epoch = the repeated set minus the dropped remainder: nobody appears more than
  # `repetitions` times and only the remainder is missing.
  assert counts.max() <= repetitions and counts.sum() == steps * batch
  assert repetitions * 301 - counts.sum() == (repetitions * 301) % batch
  assert all(it.get_state() == {"epoch": 1, "index": 0} for it in iters)


def test_last_partial_batch_without_drop_remainder_covers_everything():
  images = _indexed_images(50)
  iters = [BatchIterator(images, 16, seed=0, process_index=p, process_count=2, drop_remainder=False,
                         num_epochs=1) for p in range(2)]
  assert iters[0].steps_per_epoch == 4
  parts = [[_batch_indices(b) for b in it] for it in iters]
  assert [len(b) for b in parts[0]] == [8, 8, 8, 1] and [len(b) for b in parts[1]] == [8, 8, 8, 1]
  everything = np.concatenate([np.concatenate(p) for p in parts])
  np.testing.assert_array_equal(np.sort(everything), np.arange(50))


def test_batches_are_float32_in_unit_range_and_exact():
  images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
  it = BatchIterator(images, 8, seed=3, shuffle=False)
  batch = next(it)["images"]
  assert batch.dtype == np.float32 and batch.shape == (8, 6, 6, 3)
  np.testing.assert_array_equal(batch, images[:8].astype(np.float32) / np.float32(255))
  assert 0.0 <= batch.min() and batch.max() <= 1.0


def test_order_is_deterministic_and_seed_and_epoch_dependent():
  images = _indexed_images(100)

  def first_batches(seed, n):
    it = BatchIterator(images, 10, seed=seed)
    return np.stack([_batch_indices(next(it)) for _ in range(n)])

  a, b = first_batches(7, 20), first_batches(7, 20)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, first_batches(8, 20))
  # Epochs 0 and 1 (10 steps each) are different permutations of the same 100 examples.
  assert not np.array_equal(a[:10], a[10:])
  np.testing.assert_array_equal(np.sort(a[:10].ravel()), np.arange(100))
  np.testing.assert_array_equal(np.sort(a[10:].ravel()), np.arange(100))


@pytest.mark.parametrize("stop_after", [3, 7, 11, 25])
def test_resume_from_saved_state(stop_after):
  images = _indexed_images(90)
  kwargs = dict(global_batch_size=12, seed=11, process_index=1, process_count=2, repetitions=2)
  reference = BatchIterator(images, **kwargs)
  expected = [_batch_indices(next(reference)) for _ in range(stop_after + 20)]
  interrupted = BatchIterator(images, **kwargs)
  for _ in range(stop_after):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # survives a checkpoint round trip
  assert set(state) == {"epoch", "index"} and all(isinstance(v, int) for v in state.values())
  resumed = BatchIterator(images, **kwargs)
  resumed.set_state(state)
  for want in expected[stop_after:]:
    np.testing.assert_array_equal(_batch_indices(next(resumed)), want)


def test_iterator_argument_errors():
  images = _indexed_images(20)
  with pytest.raises(ValueError, match="multiple of the process count"):
    BatchIterator(images, 10, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    BatchIterator(images, 8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no full batch"):
    BatchIterator(images, 32, seed=0)
  with pytest.raises(ValueError, match="uint8"):
    BatchIterator(images.astype(np.float32), 4, seed=0)
  it = BatchIterator(images, 4, seed=0)
  with pytest.raises(ValueError, match="outside"):
    it.set_state({"epoch": 0, "index": it.steps_per_epoch})


def test_create_datasets_with_the_demo_config(tmp_path):
  from ddim_jax import configs  # pylint: disable=import-outside-toplevel
  config = configs.get_preset("demo")
  config.data.cache_dir = str(tmp_path)
  train_iter, val_images, normalizer = create_datasets(config, process_index=1, process_count=2)
  size = config.model.image_size
  batch = next(train_iter)
  assert batch["images"].shape == (config.train.batch_size // 2, size, size, 3)
  assert val_images.dtype == np.uint8 and val_images.shape[1:] == (size, size, 3)
  assert set(normalizer) == {"mean", "variance"} and normalizer["mean"].shape == (3,)
  assert 0.0 < float(normalizer["mean"][0]) < 1.0 and float(normalizer["variance"][0]) > 0.0
  assert train_iter.steps_per_epoch == len(load_split(config.data, "train", size)) // config.train.batch_size


def test_cli_prepare_data_digits(tmp_path, capsys):
  from ddim_jax import cli  # pylint: disable=import-outside-toplevel
  rc = cli.main(["prepare-data", "--dataset", "digits", "--image-size", "12", "--cache-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert rc == 0
  assert f"train {int(0.8 * 1797)}, validation {1797 - int(0.8 * 1797)}" in out and str(tmp_path) in out
  rc = cli.main(["prepare-data", "--dataset", "folder", "--folder", str(tmp_path / "nope"), "--cache-dir",
                 str(tmp_path)])
  assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_prepare_source_and_build_cache(tmp_path, monkeypatch):
  # The library steps under `ddim-jax prepare-data`: nothing to prepare for a local source...
  assert prepare_source("digits") is None
  with pytest.raises(ValueError, match="--source-dir is for TFDS datasets"):
    prepare_source("folder", source_dir=str(tmp_path))

  def without_tfds(*args, **kwargs):
    raise ImportError("TFDS datasets need tensorflow-datasets")
  monkeypatch.setattr(prepare, "prepare_tfds", without_tfds)
  with pytest.raises(ValueError, match="need tensorflow-datasets"):  # a usage error, not a crash
    prepare_source("oxford_flowers102")
  # ...and the summary of the cache entry is the entry's, with the stored normaliser.
  summary = build_cache("digits", 12, cache_dir=str(tmp_path))
  config = {"dataset": "digits", "cache_dir": str(tmp_path)}
  entry = prepare_cache(config, 12)
  assert summary["built"] and not entry.built and summary["path"] == entry.path
  assert summary["splits"] == entry.meta["splits"] == {"train": int(0.8 * 1797), "validation": 1797 - int(0.8 * 1797)}
  assert summary["split"] == "random" and summary["antialias"] is True and summary["skipped"] == 0
  for k in ("mean", "variance"):
    np.testing.assert_array_equal(summary["normalizer"][k], load_normalizer(config, 12)[k])
  again = build_cache("digits", 12, cache_dir=str(tmp_path), antialias=False)
  assert again["built"] and again["path"] != entry.path and again["antialias"] is False
  assert not build_cache("digits", 12, cache_dir=str(tmp_path))["built"]


# ---------------------------------------------------------------------------------------------
# TFDS


def test_find_image_key():
  class Image:  # stands for tfds.features.Image
    pass
  assert find_image_key({"image": Image(), "mask": Image(), "label": 1}, Image) == "image"
  assert find_image_key({"photo": Image(), "label": 1}, Image) == "photo"
  assert find_image_key({"a": Image(), "b": Image()}, Image, image_key="b") == "b"
  with pytest.raises(ValueError, match="several image features"):
    find_image_key({"a": Image(), "b": Image()}, Image)
  with pytest.raises(ValueError, match="no image feature"):
    find_image_key({"text": 1}, Image)


def test_image_feature_of_real_tfds_builders():
  tfds = _tfds()
  pets = tfds.builder("oxford_iiit_pet", data_dir="/nonexistent-tfds-dir")
  assert find_image_key(pets.info.features, tfds.features.Image) == "image"  # not segmentation_mask


def test_tfds_mock_data_reader_path(tmp_path, monkeypatch):
  tfds = _tfds()
  _tf()  # mock_data encodes its random images with TensorFlow
  # mock_data turns download_and_prepare into a no-op; skip our network probe before it too.
  monkeypatch.setattr(tfds_source, "_unreachable_host", lambda urls: None)
  config = {"dataset": "oxford_flowers102", "cache_dir": str(tmp_path),
            "tfds_splits": ("train", "validation", "test")}
  with tfds.testing.mock_data(num_examples=7):
    entry = prepare_cache(config, 16)
    train = load_split(config, "train", 16)
  per_split = keras_train_count(7)
  assert entry.meta["splits"] == {"train": 3 * per_split, "validation": 3 * (7 - per_split)}
  assert entry.meta["image_key"] == "image"
  assert train.shape == (3 * per_split, 16, 16, 3) and train.dtype == np.uint8 and train.std() > 0


def test_missing_tfds_data_names_both_ways(tmp_path):
  _tfds()
  config = {"dataset": "oxford_flowers102", "data_dir": str(tmp_path / "tfds"), "cache_dir": str(tmp_path / "c"),
            "download": False}
  with pytest.raises(FileNotFoundError) as error:
    load_split(config, "train", 64)
  message = str(error.value)
  assert "with internet" in message and "--source-dir" in message
  for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
    assert name in message


def test_prepare_data_reports_missing_source_files(tmp_path, capsys):
  _tfds()
  _tf()
  from ddim_jax import cli  # pylint: disable=import-outside-toplevel
  source = tmp_path / "src"
  source.mkdir()
  (source / "setid.mat").write_bytes(b"x")
  rc = cli.main(["prepare-data", "--dataset", "oxford_flowers102", "--source-dir", str(source), "--data-dir",
                 str(tmp_path / "tfds"), "--cache-dir", str(tmp_path / "c")])
  err = capsys.readouterr().err
  assert rc == 2 and "102flowers.tgz" in err and "imagelabels.mat" in err


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
  """The real oxford_flowers102 builder run offline on generated miniature original files."""
  tfds = _tfds()
  _tf()
  from tensorflow_datasets.core.download import checksums  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("flowers")
  source = root / "src"
  info = data_fixtures.make_flowers_source(source, split_sizes=(11, 13, 27))
  data_dir = str(root / "tfds")
  builder_cls = type(tfds.builder("oxford_flowers102", data_dir=data_dir))
  # The real files are registered with their SHA-256: our miniatures must be rejected...
  with pytest.raises(Exception, match="checksum"):
    prepare_tfds("oxford_flowers102", source_dir=str(source), data_dir=data_dir)
  # ...so the test registers the miniatures' checksums instead (the only thing mocked: the
  # download step's expectations). Extraction, .mat parsing and split generation are real.
  registered = {url: dataclasses.replace(checksums.compute_url_info(os.path.join(source, u.filename)),
                                         filename=u.filename)
                for url, u in builder_cls.url_infos.items()}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builder_cls, "url_infos", registered)
    result = prepare_tfds("oxford_flowers102", source_dir=str(source), data_dir=data_dir)
  return {"info": info, "data_dir": data_dir, "result": result, "root": root}


def test_flowers_builder_runs_offline_from_source_files(flowers):
  result, ids = flowers["result"], flowers["info"]["ids"]
  assert not result["already_prepared"]
  assert result["splits"] == {name: len(ids[name]) for name in ("train", "validation", "test")}
  again = prepare_tfds("oxford_flowers102", source_dir=None, data_dir=flowers["data_dir"])
  assert again["already_prepared"]


def _tfds_order(tfds, data_dir, split):
  """File names of a prepared TFDS split in its stored order."""
  source = tfds.builder("oxford_flowers102", data_dir=data_dir).as_data_source(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i]["file_name"].decode() for i in range(len(source))]


def test_flowers_keras_split_sizes_and_pixels(flowers):
  tfds = _tfds()
  tf = _tf()
  config = {"dataset": "oxford_flowers102", "data_dir": flowers["data_dir"], "cache_dir": str(flowers["root"] / "c"),
            "download": False}
  entry = prepare_cache(config, 16)
  # TFDS's own arithmetic for the Keras split strings, on the prepared dataset's split infos.
  splits = tfds.builder("oxford_flowers102", data_dir=flowers["data_dir"]).info.splits
  assert entry.meta["splits"] == {
      "train": splits["train[:80%]+validation[:80%]+test[:80%]"].num_examples,
      "validation": splits["train[80%:]+validation[80%:]+test[80%:]"].num_examples}
  # Pixels: the cached train set is train[:80%] + validation[:80%] + test[:80%] in TFDS order,
  # each equal to the TF Keras pipeline on the original JPEG (accurate IDCT; see above).
  names = []
  for split in ("train", "validation", "test"):
    order = _tfds_order(tfds, flowers["data_dir"], split)
    names += order[:keras_train_count(len(order))]
  train = load_split(config, "train", 16)
  assert len(train) == len(names)
  jpegs = flowers["info"]["jpegs"]
  for cached, name in zip(train, names):
    data = jpegs[int(name[len("image_"):-len(".jpg")])]
    expected = _tf_keras_pipeline(tf, data, 16, "INTEGER_ACCURATE")
    assert np.abs(cached.astype(np.int64) - expected).max() <= 1, name
  # The validation set is the rest: 51 images in all, no overlap.
  val = load_split(config, "validation", 16)
  assert len(train) + len(val) == flowers["info"]["num_images"]


def test_flowers_r_split_and_no_antialias(flowers):
  config = {"dataset": "oxford_flowers102", "data_dir": flowers["data_dir"], "cache_dir": str(flowers["root"] / "c"),
            "download": False, "split": "r", "antialias": False}
  entry = prepare_cache(config, 16)
  n = flowers["info"]["num_images"]
  assert entry.meta["splits"] == {"train": int(0.8 * n), "validation": n - int(0.8 * n)}
  assert entry.meta["key"]["antialias"] is False
  keras = prepare_cache({**config, "split": "keras", "antialias": True}, 16)
  assert keras.path != entry.path
  both = np.concatenate([load_split(config, s, 16) for s in SPLITS])
  assert len(both) == n
  # Pixels: every cached image is the R preprocessing of one source JPEG, computed here with
  # torch: centre crop, then interpolate(bilinear, align_corners=False, antialias=False) (R's
  # transform_resize), rounded. Train and validation are disjoint and together hold every image.
  import torch  # pylint: disable=import-outside-toplevel
  ids = sorted(flowers["info"]["jpegs"])
  expected, antialiased = [], []
  for image_id in ids:
    image = np.asarray(Image.open(io.BytesIO(flowers["info"]["jpegs"][image_id])).convert("RGB"))
    h, w = image.shape[:2]
    c = min(h, w)
    crop = torch.from_numpy(image[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c].copy())
    crop = crop.permute(2, 0, 1)[None].to(torch.float64)
    for out, aa in ((expected, False), (antialiased, True)):
      resized = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False,
                                                antialias=aa)
      out.append(np.rint(np.clip(resized[0].permute(1, 2, 0).numpy(), 0, 255)).astype(np.int64))
  expected, antialiased = np.stack(expected), np.stack(antialiased)
  assert np.abs(expected - antialiased).max(axis=(1, 2, 3)).min() > 2  # the two resizes differ on every image

  def source_ids(cached):
    diff = np.abs(cached.astype(np.int64)[:, None] - expected[None]).max(axis=(2, 3, 4))  # (cached, source)
    best = diff.argmin(axis=1)
    assert diff[np.arange(len(cached)), best].max() <= 1, diff.min(axis=1)  # <= 1: a float rounding tie
    assert (np.sort(diff, axis=1)[:, 1] > 2).all()  # the match is unambiguous
    return [ids[i] for i in best]

  train, val = (source_ids(load_split(config, s, 16)) for s in SPLITS)
  assert len(set(train)) == len(train) == int(0.8 * n) and len(set(val)) == len(val) == n - int(0.8 * n)
  assert not set(train) & set(val) and set(train) | set(val) == set(ids)


def test_cache_from_array_record_builds_without_tensorflow(flowers):
  """Building the cache from prepared ArrayRecord data needs tfds but not TensorFlow."""
  config = {"dataset": "oxford_flowers102", "data_dir": flowers["data_dir"],
            "cache_dir": str(flowers["root"] / "c_notf"), "download": False}
  code = ("import sys, json\n"
          "from ddim_jax.data import prepare_cache\n"
          f"entry = prepare_cache({config!r}, 8)\n"
          "print(json.dumps({'built': entry.built, 'splits': entry.meta['splits'],\n"
          "                  'tf': 'tensorflow' in sys.modules}))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  n = flowers["info"]["num_images"]
  assert result["built"] and result["tf"] is False
  assert result["splits"]["train"] + result["splits"]["validation"] == n
