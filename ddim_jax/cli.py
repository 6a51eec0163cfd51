"""The ``ddim-jax`` command.

  ddim-jax demo    --workdir DIR                       the offline demo: trains on the bundled digits
  ddim-jax train   --config PRESET_OR_FILE --workdir DIR [--config.a.b=value ...]
  ddim-jax export  --workdir DIR --out FILE.safetensors [--raw]
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


def cmd_train(args, overrides) -> int:
  """ddim-jax train: trains a config preset or file in a workdir (resuming from its checkpoints)."""
  from ddim_jax import configs, train  # pylint: disable=import-outside-toplevel
  config = configs.load_config(args.config, overrides)
  try:
    train.train_and_evaluate(config, args.workdir, distributed=True if args.distributed else None)
  except train.NonFiniteLossError as e:
    print(f"ddim-jax train: error: {e}", file=sys.stderr)
    return 3
  return 0


def restore_for_export(workdir: str, ema: bool = True):
  """(model, variables, normalizer, config, step) of the newest checkpoint in ``workdir`` (on one device)."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from ddim_jax import checkpointing, models, train  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory}); train first with "
                            f"`ddim-jax train --workdir {workdir}`")
  with checkpointing.Checkpointer(directory, async_save=False) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no complete checkpoint; train first")
    config = ml_collections.ConfigDict(ckpt.read_meta(step)["config"])
    model = models.create_model(**config.model)
    step_config = train.StepConfig.from_config(config)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = train._abstract_state(model, step_config, int(config.model.image_size), jax.random.key(0), sharding)  # pylint: disable=protected-access
    step, state, meta = ckpt.restore_latest(abstract)
  normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
  return model, jax.device_get(state.variables(ema=ema)), normalizer, config, step


def cmd_export(args) -> int:
  """ddim-jax export: the newest checkpoint's EMA (or raw) weights as a safetensors weight file."""
  from ddim_jax import convert  # pylint: disable=import-outside-toplevel
  model, variables, normalizer, config, step = restore_for_export(args.workdir, ema=not args.raw)
  convert.save_weights(args.out, model, variables, normalizer, int(config.model.image_size),
                       schedule=config.diffusion.schedule, min_signal_rate=config.diffusion.min_signal_rate,
                       max_signal_rate=config.diffusion.max_signal_rate, target=config.diffusion.target,
                       weights="raw" if args.raw else "ema", step=step)
  print(f"wrote {args.out} ({'raw' if args.raw else 'EMA'} weights of step {step})")
  return 0


def cmd_demo(args, overrides) -> int:
  """ddim-jax demo: trains the demo preset on the bundled digits, then writes a sample grid and weights."""
  from ddim_jax import configs, train, visualize  # pylint: disable=import-outside-toplevel
  config = configs.load_config("demo", overrides)
  start = time.time()
  state = train.train_and_evaluate(config, args.workdir)
  model, variables, normalizer, config, step = restore_for_export(args.workdir)
  del state
  weights = os.path.join(args.workdir, "demo.safetensors")
  from ddim_jax import convert  # pylint: disable=import-outside-toplevel
  convert.save_weights(weights, model, variables, normalizer, int(config.model.image_size), weights="ema", step=step,
                       schedule=config.diffusion.schedule, min_signal_rate=config.diffusion.min_signal_rate,
                       max_signal_rate=config.diffusion.max_signal_rate, target=config.diffusion.target)
  images = _sample_images(model, variables, normalizer, int(config.sample.num_images), int(config.model.image_size),
                          int(config.sample.steps), 0.0, config.seed, 64, _schedule_kwargs({}))
  out = visualize.save_grid(images, os.path.join(args.workdir, "samples.png"), upscale=4)
  print(f"demo done in {time.time() - start:.0f}s: {out} (EMA samples, step {step}); weights {weights}; "
        f"metrics {os.path.join(args.workdir, 'metrics.jsonl')}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of every subcommand."""
  parser = argparse.ArgumentParser(prog="ddim-jax", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("demo", help="the offline demo: train on the bundled digits, sample")
  p.add_argument("--workdir", default="outputs/demo")
  p.set_defaults(fn=cmd_demo, takes_overrides=True)

  p = sub.add_parser("train", help="train (resumes from the newest checkpoint in --workdir)",
                     epilog="Override any config key with --config.a.b=value, e.g. --config.train.num_steps=1000")
  p.add_argument("--config", default="default", help="a preset (default, r_variant, demo) or a config file")
  p.add_argument("--workdir", required=True)
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host; automatic when JAX_COORDINATOR_ADDRESS is set)")
  p.set_defaults(fn=cmd_train, takes_overrides=True)

  p = sub.add_parser("export", help="write a checkpoint's weights as a safetensors file")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
  p.set_defaults(fn=cmd_export)

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
  args, extra = build_parser().parse_known_args(argv)
  if extra and not getattr(args, "takes_overrides", False):
    build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
  from ddim_jax.convert import WeightFileError  # pylint: disable=import-outside-toplevel
  try:
    return args.fn(args, extra) if getattr(args, "takes_overrides", False) else args.fn(args)
  except (WeightFileError, ValueError, FileNotFoundError) as e:
    print(f"ddim-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
