"""Small generated datasets for the data tests (no network, no real data).

`make_flowers_source` writes miniature copies of the three original Oxford Flowers 102 files in
their original formats, the ones the oxford_flowers102 builder of tensorflow-datasets parses:

- ``102flowers.tgz``: a gzipped tar holding ``jpg/image_00001.jpg`` ... (1-based, 5 digits);
- ``imagelabels.mat``: ``labels`` of shape (1, N), 1-based class ids (uint8 in the original);
- ``setid.mat``: ``trnid``, ``valid``, ``tstid`` of shape (1, n), 1-based image ids (uint16).

`make_bad_folder` writes an image folder with every kind of bad input the pipeline must survive.
"""

import io
import os
import tarfile

import numpy as np
from PIL import Image


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
  """A uint8 (height, width, 3) image with gradients and blobs (so resizing has something to do)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  channels = []
  for _ in range(3):
    fy, fx, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
    channels.append(np.sin(fy * np.pi * y / height + phase) * np.cos(fx * np.pi * x / width))
  image = 127.5 + 100.0 * np.stack(channels, axis=-1)
  image += rng.normal(0.0, 12.0, image.shape)  # texture, so antialiasing matters
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  """JPEG encoding of a uint8 (H, W, 3) array."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def make_flowers_source(directory, split_sizes=(11, 13, 27), seed=0) -> dict:
  """Writes miniature 102flowers.tgz, imagelabels.mat and setid.mat into ``directory``.

  Args:
    directory: where the three files go (created if missing).
    split_sizes: numbers of images in (trnid, valid, tstid).
    seed: image contents, sizes and the assignment of ids to splits.

  Returns:
    dict with ``ids`` ({"train"|"validation"|"test": 1-based ids}), ``images`` ({id: uint8 array}),
    ``jpegs`` ({id: the JPEG bytes in the archive}), ``num_images``.
  """
  import scipy.io  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  num_images = int(sum(split_sizes))
  images, jpegs = {}, {}
  with tarfile.open(os.path.join(directory, "102flowers.tgz"), "w:gz") as tar:
    for image_id in range(1, num_images + 1):
      # Portrait, landscape and square shapes, some smaller than 64 on the short side.
      height, width = int(rng.integers(40, 130)), int(rng.integers(40, 130))
      image = smooth_image(height, width, seed * 1000 + image_id)
      data = jpeg_bytes(image)
      info = tarfile.TarInfo(f"jpg/image_{image_id:05d}.jpg")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
      images[image_id], jpegs[image_id] = image, data
  order = rng.permutation(np.arange(1, num_images + 1))
  bounds = np.cumsum((0,) + tuple(split_sizes))
  ids = {name: np.sort(order[bounds[i]:bounds[i + 1]]).astype(np.uint16)
         for i, name in enumerate(("train", "validation", "test"))}
  labels = rng.integers(1, 103, size=num_images).astype(np.uint8)
  scipy.io.savemat(os.path.join(directory, "imagelabels.mat"), {"labels": labels[None, :]})
  scipy.io.savemat(os.path.join(directory, "setid.mat"),
                   {"trnid": ids["train"][None, :], "valid": ids["validation"][None, :],
                    "tstid": ids["test"][None, :]})
  return {"ids": ids, "images": images, "jpegs": jpegs, "num_images": num_images}


def make_bad_folder(directory) -> dict:
  """Writes an image folder mixing good, convertible and unreadable files.

  Returns:
    dict with ``good`` (relative paths of files that must be used), ``bad`` (files with an image
    extension that must be skipped) and ``ignored`` (files without an image extension).
  """
  os.makedirs(os.path.join(directory, "sub", "deeper"), exist_ok=True)
  rng = np.random.default_rng(1)
  good, bad, ignored = [], [], []

  def path(name):
    return os.path.join(directory, name)

  rgb = smooth_image(80, 60, 1)
  Image.fromarray(rgb).save(path("rgb.jpg"), quality=95)
  good.append("rgb.jpg")
  Image.fromarray(smooth_image(50, 90, 2)).save(path("sub/rgb.png"))
  good.append("sub/rgb.png")
  Image.fromarray(smooth_image(70, 70, 3)).save(path("sub/deeper/rgb.webp"), lossless=True)
  good.append("sub/deeper/rgb.webp")
  Image.fromarray(smooth_image(64, 64, 4)).save(path("UPPER.JPEG"), quality=95)
  good.append("UPPER.JPEG")
  Image.fromarray(smooth_image(60, 80, 5)[..., 0], mode="L").save(path("gray.png"))
  good.append("gray.png")
  rgba = np.concatenate([smooth_image(66, 66, 6), rng.integers(0, 256, (66, 66, 1), dtype=np.uint8)], -1)
  Image.fromarray(rgba, mode="RGBA").save(path("rgba.png"))
  good.append("rgba.png")
  Image.fromarray(smooth_image(72, 72, 7)).convert("P", palette=Image.Palette.ADAPTIVE).save(path("palette.png"))
  good.append("palette.png")
  gray16 = (smooth_image(64, 48, 8)[..., 0].astype(np.uint16) * 257)
  Image.fromarray(gray16).save(path("gray16.png"))  # mode I;16
  good.append("gray16.png")
  Image.fromarray(smooth_image(10, 14, 9)).save(path("tiny.png"))  # smaller than the target size
  good.append("tiny.png")

  full = jpeg_bytes(smooth_image(90, 90, 10))
  with open(path("truncated.jpg"), "wb") as f:
    f.write(full[:len(full) // 2])
  bad.append("truncated.jpg")
  with open(path("corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
  bad.append("corrupt.png")
  with open(path("sub/notes.jpg"), "w", encoding="utf-8") as f:
    f.write("this is not an image\n")
  bad.append("sub/notes.jpg")
  with open(path("empty.webp"), "wb"):
    pass
  bad.append("empty.webp")
  with open(path("readme.txt"), "w", encoding="utf-8") as f:
    f.write("not an image either, and not named like one\n")
  ignored.append("readme.txt")
  return {"good": good, "bad": bad, "ignored": ignored}
