"""The ``ddim-jax`` command.

  ddim-jax demo    --workdir DIR                       the offline demo (writes DIR/samples.png)
  ddim-jax sample  --weights FILE.safetensors --out grid.png [--num-images N --steps S --eta E --seed K]
  ddim-jax info    --weights FILE.safetensors          what a weight file holds
  ddim-jax prepare-data --dataset NAME ...             prepare a TFDS dataset offline
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def _sample_images(model, variables, normalizer, num_images, image_size, steps, eta, seed, batch_size, schedule_kwargs):
  """Generates ``num_images`` images in batches (with a progress bar); returns (N, H, W, C) in [0, 1]."""
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from ddim_jax import sampling  # pylint: disable=import-outside-toplevel
  key = jax.random.key(seed)
  out = []
  with tqdm(total=num_images, desc=f"sampling ({steps} steps)", unit="img", disable=num_images <= batch_size) as bar:
    for start in range(0, num_images, batch_size):
      n = min(batch_size, num_images - start)
      noise_key, step_key = jax.random.split(jax.random.fold_in(key, start))
      noise = jax.random.normal(noise_key, (n, image_size, image_size, model.channels))
      result = sampling.generate(model, variables, noise, normalizer, key=step_key if eta > 0 else None,
                                 steps=steps, eta=eta, **schedule_kwargs)
      out.append(np.asarray(result["images"]))
      bar.update(n)
  return np.concatenate(out)


def _schedule_kwargs(metadata):
  from ddim_jax import schedules  # pylint: disable=import-outside-toplevel
  return dict(schedule=metadata.get("schedule", "cosine"),
              min_signal_rate=float(metadata.get("min_signal_rate", schedules.MIN_SIGNAL_RATE)),
              max_signal_rate=float(metadata.get("max_signal_rate", schedules.MAX_SIGNAL_RATE)),
              target=metadata.get("target", "noise"))


def cmd_sample(args) -> int:
  """ddim-jax sample: a grid of samples from a weight file."""
  from ddim_jax import convert, visualize  # pylint: disable=import-outside-toplevel
  model, variables, normalizer, metadata = convert.load_weights(args.weights)
  image_size = int(metadata.get("image_size", 64))
  images = _sample_images(model, variables, normalizer, args.num_images, image_size, args.steps, args.eta, args.seed,
                          args.batch_size, _schedule_kwargs(metadata))
  visualize.save_grid(images, args.out, rows=args.rows, upscale=args.upscale)
  print(f"wrote {args.out} ({len(images)} images, {args.steps} steps, eta={args.eta})")
  return 0


def cmd_info(args) -> int:
  """ddim-jax info: metadata and tensor count of a weight file."""
  from ddim_jax import convert, models  # pylint: disable=import-outside-toplevel
  model, variables, normalizer, metadata = convert.load_weights(args.weights)
  print(convert.metadata_json(metadata))
  print(f"parameters: {models.count_parameters(variables['params']):,}  "
        f"batch statistics: {models.count_parameters(variables.get('batch_stats', {})):,}")
  print(f"normalizer mean {np.round(normalizer['mean'], 4).tolist()} variance "
        f"{np.round(normalizer['variance'], 4).tolist()}")
  return 0


def cmd_demo(args) -> int:
  """ddim-jax demo: samples a grid from a freshly initialised demo-config model (no data, no network)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddim_jax import configs, convert, models, visualize  # pylint: disable=import-outside-toplevel
  config = configs.get_preset("demo")
  os.makedirs(args.workdir, exist_ok=True)
  model = models.create_model(**config.model)
  variables = models.init_variables(model, jax.random.key(config.seed), config.model.image_size)
  normalizer = {"mean": np.full((3,), 0.5, np.float32), "variance": np.full((3,), 0.25, np.float32)}
  weights_path = os.path.join(args.workdir, "init.safetensors")
  convert.save_weights(weights_path, model, variables, normalizer, config.model.image_size, weights="init")
  start = time.time()
  images = _sample_images(model, variables, normalizer, config.sample.num_images, config.model.image_size,
                          config.sample.steps, 0.0, config.seed, 64, _schedule_kwargs({}))
  out = visualize.save_grid(images, os.path.join(args.workdir, "samples.png"), upscale=4)
  print(f"wrote {out} and {weights_path} in {time.time() - start:.1f}s. The model is freshly initialised "
        f"(training arrives with `ddim-jax train`), so the samples are noise.")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of every subcommand."""
  parser = argparse.ArgumentParser(prog="ddim-jax", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("demo", help="the offline demo")
  p.add_argument("--workdir", default="outputs/demo")
  p.set_defaults(fn=cmd_demo)

  p = sub.add_parser("sample", help="a grid of samples from a weight file")
  p.add_argument("--weights", required=True, help="a .safetensors file written by `ddim-jax export`")
  p.add_argument("--out", default="samples.png")
  p.add_argument("--num-images", type=int, default=36)
  p.add_argument("--steps", type=int, default=20, help="network evaluations (Keras semantics)")
  p.add_argument("--eta", type=float, default=0.0, help="0: deterministic DDIM, 1: DDPM-like")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rows", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--upscale", type=int, default=1, help="integer pixel upscaling of the PNG")
  p.set_defaults(fn=cmd_sample)

  p = sub.add_parser("info", help="what a weight file holds")
  p.add_argument("--weights", required=True)
  p.set_defaults(fn=cmd_info)

  try:
    from ddim_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    register = getattr(input_pipeline, "register_cli", None)
  except ImportError:
    register = None
  if register is not None:
    register(sub)
  return parser


def main(argv=None) -> int:
  """Entry point of the ``ddim-jax`` console script."""
  args = build_parser().parse_args(argv)
  from ddim_jax.convert import WeightFileError  # pylint: disable=import-outside-toplevel
  try:
    return args.fn(args)
  except (WeightFileError, ValueError, FileNotFoundError) as e:
    print(f"ddim-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
