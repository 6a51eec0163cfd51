"""Memory stays bounded whatever a file declares (issue 31): image folders and Keras ``.weights.h5``.

A file can declare far more than it holds: a 440 KB PNG declares 12000 x 12000 pixels (432 MB decoded,
2.1 GB at the peak of building a folder dataset before the fix), a 170 KB HDF5 file a 2 GB dataset
of unwritten gzip chunks (8.5 GB at the peak of ``ddim-jax convert`` before the fix). The checks read
the declared sizes, refuse what no real input of the package needs, and decode large photos at
reduced scale. Peak memory is measured in subprocesses (``ru_maxrss``), each against the same
subprocess reading a normal input.
"""

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import data_fixtures
from ddim_jax import errors
from ddim_jax.data import images, options, sources
from ddim_jax.interop import keras_files

try:
  import h5py
except ImportError:  # the keras extra's; only the Keras file tests need it
  h5py = None


def _run_measured(code: str, *args) -> dict:
  """Runs ``code`` in a fresh Python; returns the JSON its last stdout line holds, plus its peak RSS."""
  wrapper = (code + "\nimport resource as _r\n"
             "result['peak_rss_mb'] = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024\n"
             "print(json.dumps(result))\n")
  proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["stderr"] = proc.stderr
  return result


# ------------------------------------------------------------------------------------------------
# Images


def write_solid_png(path, width: int, height: int, rgb=(90, 140, 60)) -> None:
  """A valid RGB PNG of one colour, written row by row (a few MB of memory whatever its size):
  12000 x 12000 compresses to about 440 KB."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  compressor = zlib.compressobj(9)
  row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
  idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def photo(height: int, width: int, seed: int, saturated: bool = False) -> np.ndarray:
  """A photo-like uint8 (height, width, 3): smooth colour, sharp-edged shapes and noise texture, in
  30..225 unless ``saturated`` (where a JPEG's colours clip, see images.ScaledImage)."""
  rng = np.random.default_rng(seed)
  small = Image.fromarray(data_fixtures.smooth_image(max(8, height // 16), max(8, width // 16), seed))
  image = np.asarray(small.resize((width, height), Image.BICUBIC)).astype(np.int16)
  for _ in range(12):  # edges: where a misplaced sampling grid would show
    top, left = rng.integers(0, height), rng.integers(0, width)
    image[top:top + rng.integers(8, height // 3), left:left + rng.integers(8, width // 3)] = rng.integers(0, 256, 3)
  image += rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
  image = np.clip(image, 0, 255)
  return (image if saturated else 30 + image * 195 // 255).astype(np.uint8)


def black_and_white(height: int, width: int, seed: int) -> np.ndarray:
  """Black and white rectangles: the sharpest edges, for the box pre-filter of a scaled decode."""
  rng = np.random.default_rng(seed)
  image = np.zeros((height, width, 3), np.uint8)
  for _ in range(40):
    top, left = rng.integers(0, height), rng.integers(0, width)
    image[top:top + rng.integers(4, height // 4), left:left + rng.integers(4, width // 4)] = 255 * rng.integers(0, 2)
  return image


def encode(image: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
  """``image`` as JPEG (quality 90) or PNG bytes, with an EXIF orientation tag if given."""
  buffer = io.BytesIO()
  extra = {}
  if orientation is not None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra["exif"] = exif.tobytes()
  options = {"quality": 90} if fmt == "JPEG" else {"compress_level": 1}
  Image.fromarray(image).save(buffer, format=fmt, **options, **extra)
  return buffer.getvalue()


_BUILD_FOLDER = """
import json, sys, warnings
from ddim_jax import data
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  cache = data.build_cache("folder", 64, folder=sys.argv[1], cache_dir=sys.argv[2])
result = {"skipped_names": cache["skipped_names"], "splits": cache["splits"],
          "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}
"""


@pytest.mark.slow  # two subprocesses and a 12000 x 12000 PNG to compress
def test_a_pixel_bomb_png_is_skipped_by_name_and_never_decoded(tmp_path):
  normal, bombed = tmp_path / "normal", tmp_path / "bombed"
  for folder in (normal, bombed):
    folder.mkdir()
    for i in range(6):
      Image.fromarray(data_fixtures.smooth_image(90, 120, i)).save(folder / f"ok{i}.png")
  write_solid_png(bombed / "huge.png", 12000, 12000)
  assert (bombed / "huge.png").stat().st_size < 600_000  # 144 MP declared in under 600 KB
  base = _run_measured(_BUILD_FOLDER, normal, tmp_path / "cache_normal")
  bomb = _run_measured(_BUILD_FOLDER, bombed, tmp_path / "cache_bombed")
  assert bomb["skipped_names"] == ["huge.png"] and sum(bomb["splits"].values()) == 6
  message = " ".join(bomb["warnings"])
  assert "skipped 1 of 7 files" in message, message
  assert "huge.png (12000 x 12000 pixels declared (144.0 MP, 432 MB decoded), over the limit of 67.1 MP" in message
  # Measured 2026-12-07: 47 MB for both (2,129 MB with the bomb before the fix, which decoded it:
  # 432 MB of uint8 pixels, then float32 copies). Decoding it at all would cost 432 MB.
  assert bomb["peak_rss_mb"] < base["peak_rss_mb"] + 300, (base["peak_rss_mb"], bomb["peak_rss_mb"])


def test_the_declared_size_is_checked_before_decoding(tmp_path):
  write_solid_png(tmp_path / "big.png", 9000, 8000)  # 72 MP: over the 67.1 MP cap, under PIL's 89.5 MP warning
  data = (tmp_path / "big.png").read_bytes()
  for decode in (lambda: images.decode_image(data), lambda: images.decode_scaled(data, 64)):
    with pytest.raises(images.BadImageError, match=r"9000 x 8000 pixels declared \(72.0 MP"):
      decode()
  # The cap allows a 64 MP phone photo (9248 x 6936) and grows with the output size.
  assert images.max_image_pixels(64) == images.max_image_pixels(1024) == 64 * 2 ** 20 > 9248 * 6936
  assert images.max_image_pixels(2048) == 64 * 2048 ** 2


def test_pils_own_decompression_bomb_limit_is_a_skip_not_a_crash(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises over 2 x 1000 pixels
  data = encode(np.zeros((60, 60, 3), np.uint8), "PNG")
  with pytest.raises(images.BadImageError, match="PIL's limit"):
    images.decode_image(data)
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "a.png").write_bytes(data)
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "b.png")  # 400 pixels: fine
  with pytest.warns(RuntimeWarning, match=r"skipped 1 of 2 files.*a\.png \(.*PIL's limit"):
    arrays, info = sources.build_folder(options.DataOptions(dataset="folder", folder=str(folder),
                                                            validation_fraction=0.0), 8)
  assert info["skipped_names"] == ["a.png"] and len(arrays["train"]) == 1


@pytest.mark.slow  # a 12 MP photo made, encoded, decoded twice and resized: 5-12 s on 2 cores
def test_a_12_mp_jpeg_decodes_whole_and_gives_exactly_the_full_pipeline(tmp_path):
  data = encode(photo(3000, 4000, 1), "JPEG", orientation=6)
  scaled = images.decode_scaled(data, 64, exif_transpose=True)
  full = images.decode_image(data, exif_transpose=True)
  assert scaled.scale == 1 and full.shape == (4000, 3000, 3)  # 12 MP <= FULL_DECODE_PIXELS: no draft
  np.testing.assert_array_equal(scaled.pixels, full)
  np.testing.assert_array_equal(images.preprocess_image(scaled, 64), images.preprocess_image(full, 64))
  # Through the folder pipeline (the decode pool), too.
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "p.jpg").write_bytes(data)
  arrays, _ = sources.build_folder(options.DataOptions(dataset="folder", folder=str(folder),
                                                       validation_fraction=0.0), 64)
  np.testing.assert_array_equal(arrays["train"], images.preprocess_image(full, 64)[None])


@pytest.mark.slow  # a 24 MP photo made, encoded, decoded whole and resized: 5-12 s on 2 cores
def test_a_24_mp_phone_jpeg_decodes_at_reduced_scale_within_1_level_of_the_full_decode():
  data = encode(photo(4000, 6000, 2), "JPEG", orientation=6)  # a portrait phone photo, stored landscape
  full = images.decode_image(data, exif_transpose=True)
  for size, scale in ((32, 8), (64, 4)):  # 4000 / 8 = 500 < 8 x 64 reduced pixels across the crop: 1/4
    scaled = images.decode_scaled(data, size, exif_transpose=True)
    assert scaled.scale == scale and scaled.full_shape == full.shape[:2] == (6000, 4000), (size, scaled.scale)
    difference = np.abs(images.preprocess_image(scaled, size).astype(int) - images.preprocess_image(full, size))
    assert difference.max() <= 1, (size, difference.max())
  with pytest.raises(ValueError, match="antialiased"):
    images.preprocess_image(images.decode_scaled(data, 32), 32, antialias=False)
  assert images.decode_scaled(data, 32, antialias=False).scale == 1  # no reduced decode without antialiasing


@pytest.mark.slow  # 16 decodes and resizes of 4.4 MP images: 5-12 s on 2 cores
def test_scaled_decodes_stay_within_the_measured_levels_and_large_full_decodes_take_the_lock(monkeypatch):
  monkeypatch.setattr(images, "FULL_DECODE_PIXELS", 1_000_000)  # 2432 x 1792 takes the large-image path
  entered = []

  class Recorder:
    def __enter__(self):
      entered.append(True)

    def __exit__(self, *exc):
      return False

  monkeypatch.setattr(images, "_LARGE_DECODES", Recorder())
  height, width = 1792, 2432  # the crop's offset, 320, is a multiple of 8
  # (content, format, the most levels a scaled decode may differ by at scales 8, 4, 2: images.ScaledImage)
  cases = [(photo(height, width, 3), "PNG", (1, 1, 1)), (photo(height, width, 3), "JPEG", (1, 1, 1)),
           (photo(height, width, 4, saturated=True), "JPEG", (3, 3, 3)),
           (black_and_white(height, width, 5), "PNG", (1, 1, 2))]
  for image, fmt, bounds in cases:
    data = encode(image, fmt)
    full = images.decode_image(data)
    for scale, bound in zip((8, 4, 2), bounds):
      size = height // scale // images.MIN_SCALED_CROP
      entered.clear()
      scaled = images.decode_scaled(data, size)
      assert scaled.scale == scale and scaled.full_shape == (height, width)
      # A JPEG decodes at reduced scale in libjpeg itself; other formats decode whole, one at a time.
      assert entered == ([] if fmt == "JPEG" else [True])
      if fmt == "PNG":  # PIL's reduce: (sum + n / 2) // n over whole blocks of n pixels
        blocks = image.reshape(height // scale, scale, width // scale, scale, 3).astype(np.int64).sum(axis=(1, 3))
        np.testing.assert_array_equal(scaled.pixels, (blocks + scale ** 2 // 2) // scale ** 2)
      difference = np.abs(images.preprocess_image(scaled, size).astype(int) - images.preprocess_image(full, size))
      assert difference.max() <= bound, (fmt, scale, difference.max())
  # An image whose crop offset is no multiple of 2 decodes whole: blocks would cross the crop's edge.
  assert images.decode_scaled(encode(photo(1600, 2402, 6), "JPEG"), 16).scale == 1


def test_exif_orientations_are_applied_as_imageops_does():
  image = photo(48, 80, 4)
  for orientation in range(1, 9):
    data = encode(image, "JPEG", orientation=orientation)
    with Image.open(io.BytesIO(data)) as opened:
      expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(images.decode_image(data, exif_transpose=True), expected, err_msg=str(orientation))


def test_16_bit_gray_scales_every_value_as_the_float_rounding():
  values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  buffer = io.BytesIO()
  Image.fromarray(values).save(buffer, format="PNG")  # opens as I;16
  decoded = images.decode_image(buffer.getvalue())
  expected = np.rint(values / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=-1))


def test_the_resize_in_column_strips_equals_the_whole_conversion(monkeypatch):
  image = np.random.default_rng(5).integers(0, 256, (301, 257, 3), dtype=np.uint8)
  whole = images.resize_bilinear(image, 24, 24)
  monkeypatch.setattr(images, "_STRIP_VALUES", 5000)  # strips of 5 columns
  strips = images.resize_bilinear(image, 24, 24)
  # Each value is the same dot product over the rows (bit-equal with this OpenBLAS, 2026-12-07);
  # a BLAS that blocks columns differently could move the last float32 bit.
  np.testing.assert_allclose(strips, whole, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Keras .weights.h5

WIDTHS, BLOCK_DEPTH, EMBEDDING_DIMS, CHANNELS = (8, 16), 1, 32, 3


def _unet_shapes(widths, block_depth, embedding_dims, channels) -> dict[str, list[tuple]]:
  """{twin module name: its Keras variables' shapes (HWIO kernels)} of the example's U-Net."""
  shapes = {"stem": [(1, 1, channels, widths[0]), (widths[0],)], "head": [(1, 1, widths[0], channels), (channels,)]}

  def block(name, c_in, width):
    shapes[f"{name}.norm"] = [(c_in,), (c_in,)]
    shapes[f"{name}.conv1"] = [(3, 3, c_in, width), (width,)]
    shapes[f"{name}.conv2"] = [(3, 3, width, width), (width,)]
    if c_in != width:
      shapes[f"{name}.proj"] = [(1, 1, c_in, width), (width,)]
    return width

  x, skips = widths[0] + embedding_dims, []
  for i, width in enumerate(widths[:-1]):
    for j in range(block_depth):
      x = block(f"down_blocks.{i}.residual_blocks.{j}", x, width)
      skips.append(x)
  for j in range(block_depth):
    x = block(f"mid_blocks.{j}", x, widths[-1])
  for i, width in enumerate(reversed(widths[:-1])):
    for j in range(block_depth):
      x = block(f"up_blocks.{i}.residual_blocks.{j}", x + skips.pop(), width)
  return shapes


def write_keras_file(path) -> None:
  """A .weights.h5 laid out as Keras 3 saves the example's DiffusionModel (small random weights),
  written with h5py alone: no TensorFlow or Keras needed."""
  rng = np.random.default_rng(0)
  names = keras_files.keras_layer_names(WIDTHS, BLOCK_DEPTH, EMBEDDING_DIMS)
  shapes = _unet_shapes(WIDTHS, BLOCK_DEPTH, EMBEDDING_DIMS, CHANNELS)
  assert set(names) == set(shapes)
  with h5py.File(path, "w") as f:
    for paths in keras_files.NETWORK_PATHS.values():
      for twin_name, group in names.items():
        variables = f.create_group(f"{paths[0]}/{group}/vars")
        for i, shape in enumerate(shapes[twin_name]):
          value = rng.uniform(0.5, 1.5, shape) if twin_name.endswith(".norm") else rng.normal(0, 0.05, shape)
          variables.create_dataset(str(i), data=value.astype(np.float32))
    norm = f.create_group(keras_files.NORMALIZER_PATHS[0])
    norm.create_dataset("0", data=np.full(CHANNELS, 0.5, np.float32))
    norm.create_dataset("1", data=np.full(CHANNELS, 0.1, np.float32))
    norm.create_dataset("2", data=np.int64(100))


def replace_dataset(src, dst, name, shape, dtype="f4", **options) -> None:
  """A copy of ``src`` with dataset ``name`` declared as ``shape``: chunked and gzip-compressed
  with nothing written, so the file stays small whatever the shape."""
  shutil.copy(src, dst)
  with h5py.File(dst, "r+") as f:
    del f[name]
    if options:
      f.create_dataset(name, shape=shape, dtype=dtype, **options)
    else:
      f.create_dataset(name, shape=shape, dtype=dtype, chunks=True, compression="gzip")


STEM = "ema_network/layers/conv2d/vars/"  # the EMA network's stem: kernel (1, 1, 3, 8), bias (8,)


@pytest.fixture(name="keras_file")
def fixture_keras_file(tmp_path):
  if h5py is None:
    pytest.skip("h5py is not installed (the keras extra: pip install 'ddim-jax[keras]'); the .weights.h5 tests "
                "write files with it")
  path = tmp_path / "valid.weights.h5"
  write_keras_file(path)
  return path


def test_a_valid_file_reads_and_huge_declared_datasets_are_refused_unread(keras_file, tmp_path):
  read = keras_files.read_keras_file(str(keras_file))
  assert read.networks["ema_network"]["conv2d"][0].shape == (1, 1, 3, 8)
  assert keras_files.infer_architecture(read.networks["ema_network"])["widths"] == WIDTHS
  cases = [  # (dataset, declared shape, options, what the one-line error says)
      (STEM + "0", (2 ** 29,), {}, "declares shape (536870912,) float32 (2.1 GB), but the package's U-Nets need"),
      (STEM + "0", (1, 1, 150_000, 150_000), {}, "declares shape (1, 1, 150000, 150000) float32 (90.0 GB)"),
      (STEM + "1", (2 ** 28,), {}, "need only the bias (8,) of the Conv2D kernel (1, 1, 3, 8)"),
      ("ema_network/layers/batch_normalization/vars/1", (2 ** 30,), {}, "BatchNormalization statistics of one shape"),
      ("layers/normalization/vars/0", (2 ** 30,), {}, "at most 8192 values"),
      (STEM + "0", (1, 1, 3, 8), {"dtype": h5py.string_dtype()}, "not a number type Keras writes"),
  ]
  for i, (name, shape, options, message) in enumerate(cases):
    bomb = tmp_path / f"bomb{i}.weights.h5"
    options = dict(options)
    replace_dataset(keras_file, bomb, name, shape, options.pop("dtype", "f4"), **options)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(errors.InputError) as caught:
      keras_files.read_keras_file(str(bomb))
    text = str(caught.value)
    assert repr(str(bomb)) in text and repr(name) in text and message in text, text
    assert "nothing was read" in text and "\n" not in text


def test_a_kernel_of_a_possible_shape_but_more_bytes_than_the_file_holds_is_refused(keras_file, tmp_path):
  # (3, 3, 8192, 4096) with its bias is a layer some U-Net of the package could have: 1.2 GB declared
  # in a file of 170 KB is what the total cap refuses.
  bomb = tmp_path / "bomb.weights.h5"
  replace_dataset(keras_file, bomb, STEM + "0", (3, 3, 8192, 4096))
  with h5py.File(bomb, "r+") as f:
    del f[STEM + "1"]
    f.create_dataset(STEM + "1", shape=(4096,), dtype="f4", chunks=True, compression="gzip")
  expected = (r"declares 1\.2 GB of values in \d+ KB \(the largest, dataset 'ema_network/layers/conv2d/vars/0' "
              r"declares shape \(3, 3, 8192, 4096\) float32 \(1\.2 GB\)\), over the 17\.\d MB such a file can hold")
  with pytest.raises(errors.InputError, match=expected):
    keras_files.read_keras_file(str(bomb))


def test_a_dataset_stored_in_another_file_is_refused(keras_file, tmp_path):
  outside = tmp_path / "outside.bin"
  outside.write_bytes(b"\0" * 96)
  bomb = tmp_path / "external.weights.h5"
  replace_dataset(keras_file, bomb, STEM + "0", (1, 1, 3, 8), external=[(str(outside), 0, 96)])
  with pytest.raises(errors.InputError, match="stored in other files"):
    keras_files.read_keras_file(str(bomb))


_CONVERT = """
import json, sys
from ddim_jax import cli
result = {"rc": cli.main(["convert", sys.argv[1], "--out", sys.argv[2], "--config.model.image_size=16"])}
"""


@pytest.mark.slow  # two `ddim-jax convert` runs in subprocesses
def test_the_convert_command_refuses_a_declared_2_gb_dataset_in_one_line_and_bounded_memory(keras_file, tmp_path):
  base = _run_measured(_CONVERT, keras_file, tmp_path / "valid.safetensors")
  assert base["rc"] == 0 and (tmp_path / "valid.safetensors").exists(), base["stderr"]
  bomb = tmp_path / "bomb.weights.h5"
  replace_dataset(keras_file, bomb, STEM + "0", (1, 1, 16384, 32768))  # 2.1 GB declared, 170 KB on disk
  result = _run_measured(_CONVERT, bomb, tmp_path / "bomb.safetensors")
  lines = result["stderr"].strip().splitlines()
  assert result["rc"] == 2 and len(lines) == 1, result["stderr"]
  assert lines[0].startswith(f"ddim-jax convert: error: Keras weights file {str(bomb)!r}: dataset "
                             f"'ema_network/layers/conv2d/vars/0' declares shape (1, 1, 16384, 32768) float32 (2.1 GB), but")
  assert not (tmp_path / "bomb.safetensors").exists()
  # Measured 2026-12-07: 221 MB, as for the valid file (8,473 MB before the fix, which read the 2.1 GB
  # of zeros and converted them before failing; 84 GB declared was a MemoryError traceback).
  assert result["peak_rss_mb"] < base["peak_rss_mb"] + 200, (base["peak_rss_mb"], result["peak_rss_mb"])
