"""Sample grids from a ddim-jax weight file with the PyTorch twin (no JAX).

  python -m ddim_torch_ref.sample --weights FILE.safetensors --num-images 36 --steps 20 --seed 0 --out grid.png
  python -m ddim_torch_ref.sample --weights FILE.safetensors --noise-file noise.npy --out grid.png

The initial noise is ``np.random.default_rng(seed).standard_normal((N, H, W, C), dtype=float32)``
(NHWC, transposed to NCHW here), or a ``--noise-file`` .npy of that layout; for eta > 0 each batch
draws its per-step noise (steps, B, H, W, C) from ``np.random.default_rng(seed + 1)``. These are
exactly the draws of ``ddim-jax sample --numpy-noise`` (or ``--noise-file``), so both commands give
the same images from the same weight file (measured: within 1e-4 per pixel, float32 on CPU).
The grid is written by ``ddim_jax.inference.grids`` (NumPy + Pillow only), as ``ddim-jax sample`` does.
"""

import argparse
import math
import os
import sys

import numpy as np
import torch

from ddim_torch_ref import sampling, schedules, solvers, weight_files


def numpy_noise(seed: int, shape) -> np.ndarray:
  """The initial noise of ``--seed``: the same draw as ``ddim-jax sample --numpy-noise``."""
  return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def numpy_step_noise_generator(seed: int) -> np.random.Generator:
  """The generator of eta > 0 per-step draws: ``default_rng(seed + 1)``, as ``ddim-jax sample --numpy-noise``."""
  return np.random.default_rng(seed + 1)


def sample_images(model, normalizer, initial_noise: np.ndarray, steps: int, eta: float = 0.0, seed: int = 0,
                  batch_size: int = 64, spec=sampling.DEFAULT_SPEC, sampler=solvers.DDIM) -> np.ndarray:
  """Generates images from NHWC NumPy noise in batches; returns (N, H, W, C) float32 in [0, 1].

  For eta > 0 the per-step draws of each batch, (steps, B, H, W, C), come in batch order from
  ``np.random.default_rng(seed + 1)`` (as ``ddim_jax.inference.pipeline``).
  """
  step_rng = numpy_step_noise_generator(seed)
  out = []
  for start in range(0, len(initial_noise), batch_size):
    noise = np.asarray(initial_noise[start:start + batch_size], np.float32)
    step_noises = None
    if eta > 0:
      draws = step_rng.standard_normal((steps,) + noise.shape, dtype=np.float32)
      step_noises = torch.from_numpy(draws).permute(0, 1, 4, 2, 3).contiguous()
    result = sampling.generate(model, torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous(), normalizer,
                               step_noises=step_noises, steps=steps, eta=eta, spec=spec, sampler=sampler)
    out.append(result["images"].permute(0, 2, 3, 1).numpy())
  return np.concatenate(out)


def _number(kind, low, what):
  """An argparse type: a ``kind`` number >= ``low`` (finite), else argparse's one-line error naming the option."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not math.isfinite(value) or value < low:
      raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value
  return parse


positive_int = _number(int, 1, "a positive integer")


def load_noise_file(path: str, num: int, shape) -> np.ndarray:
  """The first ``num`` noises of an (N, H, W, C) float .npy file (ValueError naming the file and what is needed)."""
  need = f"need a .npy of float32 noises of shape (N >= {num}, {', '.join(map(str, shape))})"
  if not os.path.isfile(path):
    raise ValueError(f"--noise-file {path!r} does not exist or is not a regular file; {need}")
  try:
    noise = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError):
    raise ValueError(f"--noise-file {path!r} is not a readable .npy array; {need}") from None
  if (not isinstance(noise, np.ndarray) or not np.issubdtype(noise.dtype, np.floating) or noise.ndim != 4
      or noise.shape[1:] != tuple(shape) or len(noise) < num):
    raise ValueError(f"--noise-file {path!r} holds {getattr(noise, 'dtype', 'an .npz archive')} "
                     f"{getattr(noise, 'shape', '')}; {need}")
  noise = noise[:num].astype(np.float32)
  if not np.all(np.isfinite(noise)):
    raise ValueError(f"--noise-file {path!r} holds NaN or inf values; {need}")
  return noise


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser."""
  parser = argparse.ArgumentParser(prog="python -m ddim_torch_ref.sample", description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", required=True, help="a ddim-jax .safetensors weight file")
  parser.add_argument("--out", default="samples_torch.png")
  parser.add_argument("--num-images", type=positive_int, default=36)
  parser.add_argument("--steps", type=positive_int, default=20, help="network evaluations (Keras semantics)")
  parser.add_argument("--eta", type=_number(float, 0.0, "a finite number >= 0"), default=0.0, help="ddim only")
  parser.add_argument("--sampler", default=None, choices=solvers.SAMPLERS,
                      help="ddim or dpmpp_2m (default: the one the weight file records, else ddim), as ddim-jax sample")
  parser.add_argument("--time-grid", default=None, choices=solvers.TIME_GRIDS,
                      help="uniform or logsnr (default: the weight file's, else uniform)")
  parser.add_argument("--seed", type=_number(int, 0, "a seed >= 0"), default=0)
  parser.add_argument("--numpy-noise", action="store_true",
                      help="accepted for symmetry with ddim-jax: the noise is always drawn in NumPy here")
  parser.add_argument("--noise-file", default=None, help="initial noise from a .npy file, (N, H, W, C) float32")
  parser.add_argument("--rows", type=positive_int, default=None)
  parser.add_argument("--batch-size", type=positive_int, default=64)
  parser.add_argument("--upscale", type=positive_int, default=None,
                      help="integer pixel upscaling of the grid (default: tiles of about 64 px, as ddim-jax sample)")
  parser.add_argument("--array-out", default=None, help="also write the images as a float32 .npy (N, H, W, C)")
  return parser


def main(argv=None) -> int:
  """Entry point."""
  args = build_parser().parse_args(argv)
  from ddim_jax import files  # pylint: disable=import-outside-toplevel  (the standard library only)
  from ddim_jax.inference import grids  # pylint: disable=import-outside-toplevel  (NumPy + Pillow only, no JAX)
  try:
    model, normalizer, metadata = weight_files.load_weights(args.weights)  # every metadata key validated
    size, channels = weight_files.image_size_from_metadata(metadata), int(metadata["channels"])
    spec = schedules.DiffusionSpec.from_metadata(metadata)
    sampler = solvers.Sampler(args.sampler or metadata.get("sampler", "ddim"),
                              args.time_grid or metadata.get("time_grid", "uniform"))
    sampler.check(spec, args.eta)
    if args.noise_file:
      noise = load_noise_file(args.noise_file, args.num_images, (size, size, channels))
  except ValueError as e:
    print(f"ddim_torch_ref.sample: error: {e}", file=sys.stderr)
    return 2
  if not args.noise_file:
    noise = numpy_noise(args.seed, (args.num_images, size, size, channels))
  images = sample_images(model, normalizer, noise, args.steps, args.eta, args.seed, args.batch_size, spec, sampler)
  try:
    grids.save_grid(images, args.out, rows=args.rows, upscale=grids.default_upscale(size, args.upscale))
    if args.array_out:
      files.ensure_parent(args.array_out, "--array-out")
      files.replace_file(args.array_out, lambda f: np.save(f, images), "--array-out")
  except ValueError as e:  # ddim_jax.files' one-line errors (a link, a FIFO, a full disk at the output)
    print(f"ddim_torch_ref.sample: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({len(images)} images, {sampler.describe()}, {args.steps} steps, eta={args.eta}, torch)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
