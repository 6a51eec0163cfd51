"""Data pipeline throughput: cold (decode + crop + resize into the cache) and warm (batches from the cache).

  .venv/bin/python scripts/benchmark_data.py [--num-files 2000] [--json out.json]

Cold: a generated folder of JPEGs (64x64, and flower-sized 500x375) and the bundled digits, each
prepared into a fresh cache (the one-off cost; TFDS sources add the TFDS read on top). Warm:
``BatchIterator`` over a cached 64x64 uint8 array, batches of 64 including the float32
conversion, after a warm-up; the median of repeats. Numbers are for the machine it runs on.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position
from ddim_jax.data import BatchIterator, load_split, prepare_cache  # pylint: disable=wrong-import-position


def _write_jpegs(folder, count, height, width, seed=0):
  """``count`` JPEGs with smooth content plus noise (realistic decode cost) in ``folder``."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([np.sin(y / 17.0), np.cos(x / 23.0), np.sin((x + y) / 31.0)], -1) * 90 + 128
  for i in range(count):
    noise = rng.normal(0, 20, (height, width, 3))
    image = np.clip(base + noise + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def bench_cold_folder(root, count, height, width, image_size):
  folder = os.path.join(root, f"jpeg_{height}x{width}")
  _write_jpegs(folder, count, height, width)
  config = {"dataset": "folder", "folder": folder, "cache_dir": os.path.join(root, "cache")}
  start = time.perf_counter()
  entry = prepare_cache(config, image_size)
  seconds = time.perf_counter() - start
  n = sum(entry.meta["splits"].values())
  return {"what": f"cold: folder of {count} {height}x{width} JPEGs -> {image_size}px cache", "images": n,
          "seconds": seconds, "images_per_s": n / seconds}


def bench_cold_digits(root, image_size):
  config = {"dataset": "digits", "cache_dir": os.path.join(root, "cache")}
  start = time.perf_counter()
  entry = prepare_cache(config, image_size)
  seconds = time.perf_counter() - start
  n = sum(entry.meta["splits"].values())
  return {"what": f"cold: digits -> {image_size}px cache", "images": n, "seconds": seconds,
          "images_per_s": n / seconds}


def bench_warm(root, image_size, batch_size, num_batches, repeats, process_count=1):
  config = {"dataset": "digits", "cache_dir": os.path.join(root, "cache")}
  prepare_cache(config, image_size)
  start = time.perf_counter()
  images = load_split(config, "train", image_size)
  load_seconds = time.perf_counter() - start
  iterator = BatchIterator(images, batch_size * process_count, seed=0, process_count=process_count,
                           repetitions=5)
  for _ in range(20):  # warm-up
    next(iterator)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    total = 0
    for _ in range(num_batches):
      total += len(next(iterator)["images"])
    rates.append(total / (time.perf_counter() - start))
  return {"what": f"warm: {image_size}x{image_size} float32 batches of {batch_size} from the cache",
          "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
          "cache_load_seconds": load_seconds, "cached_images": len(images)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num-files", type=int, default=2000, help="64x64 JPEGs in the cold folder benchmark")
  parser.add_argument("--num-large", type=int, default=500, help="500x375 JPEGs in the second cold benchmark")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--num-batches", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  results = []
  with tempfile.TemporaryDirectory() as root:
    results.append(bench_cold_folder(root, args.num_files, 64, 64, args.image_size))
    results.append(bench_cold_folder(root, args.num_large, 375, 500, args.image_size))
    results.append(bench_cold_digits(root, args.image_size))
    results.append(bench_warm(root, args.image_size, args.batch_size, args.num_batches, args.repeats))
  print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"numpy {np.__version__}")
  for r in results:
    extra = f"  ({r['images']} images in {r['seconds']:.2f}s)" if "seconds" in r else (
        f"  (min {r['min']:,.0f}, max {r['max']:,.0f}; np.load of {r['cached_images']} images "
        f"{r['cache_load_seconds'] * 1e3:.1f} ms)")
    print(f"{r['what']:<62} {r['images_per_s']:>12,.0f} images/s{extra}")
  if args.json:
    from ddim_jax import files  # pylint: disable=import-outside-toplevel
    files.ensure_parent(args.json, "--json")
    rows = [dict(r, images_per_second=r["images_per_s"]) for r in results]
    record = {"rows": rows, "config": vars(args), "provenance": provenance.collect()}
    files.replace_text(args.json, json.dumps(record, indent=1) + "\n", "--json")


if __name__ == "__main__":
  main()
