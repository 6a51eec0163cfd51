"""The ``ddim-jax`` command.

  ddim-jax demo    --workdir DIR                       the offline demo: trains on the bundled digits
  ddim-jax train   --config PRESET_OR_FILE --workdir DIR [--config.a.b=value ...]
  ddim-jax export  --workdir DIR --out FILE.safetensors [--raw]
  ddim-jax sample  --weights FILE | --workdir DIR --out grid.png [--num-images N --steps S --eta E --seed K]
                   [--out-dir DIR] [--trajectory strip.png] [--numpy-noise | --noise-file noise.npy]
  ddim-jax figures --weights FILE | --workdir DIR --out-dir DIR    the blog's forward/reverse/sample figures
  ddim-jax invert  --weights FILE | --workdir DIR --steps 10,20,50,100   DDIM inversion reconstruction error
  ddim-jax interpolate --weights FILE | --workdir DIR --out strip.png     spherical interpolation of noises
  ddim-jax evaluate --workdir DIR --steps 5,10,20,50 [--inception-weights FILE]   KID per step count
  ddim-jax info    --weights FILE.safetensors          what a weight file holds
  ddim-jax prepare-data --dataset NAME ...             prepare a TFDS dataset offline
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def numpy_noise(seed: int, shape) -> np.ndarray:
  """Initial noise drawn in NumPy (``--numpy-noise``): the same numbers in both twins' CLIs."""
  return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def numpy_step_noise_generator(seed: int) -> np.random.Generator:
  """The generator of eta > 0 per-step draws under ``--numpy-noise``/``--noise-file``: seed + 1.

  Each batch then draws (steps, batch, H, W, C) from it, in batch order (as ``ddim_torch_ref.sample``).
  """
  return np.random.default_rng(seed + 1)


def _sample_images(model, variables, normalizer, num_images, image_size, steps, eta, seed, batch_size, schedule_kwargs,
                   initial_noise=None):
  """Generates ``num_images`` images in batches (with a progress bar); returns (N, H, W, C) in [0, 1].

  Without ``initial_noise`` each batch's noise (and eta > 0 draws) come from JAX keys folded from
  ``seed``; with it (N, H, W, C) (``--numpy-noise``, ``--noise-file``) the eta > 0 draws come from
  ``numpy_step_noise_generator(seed)``, so that the torch twin can reproduce the run.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from ddim_jax import sampling  # pylint: disable=import-outside-toplevel
  key = jax.random.key(seed)
  step_rng = numpy_step_noise_generator(seed) if initial_noise is not None else None
  out = []
  with tqdm(total=num_images, desc=f"sampling ({steps} steps)", unit="img", disable=num_images <= batch_size) as bar:
    for start in range(0, num_images, batch_size):
      n = min(batch_size, num_images - start)
      noise_key, step_key = jax.random.split(jax.random.fold_in(key, start))
      step_noises = None
      if initial_noise is not None:
        noise = np.asarray(initial_noise[start:start + n], np.float32)
        if eta > 0:
          step_noises = step_rng.standard_normal((steps,) + noise.shape, dtype=np.float32)
      else:
        noise = jax.random.normal(noise_key, (n, image_size, image_size, model.channels))
      result = sampling.generate(model, variables, noise, normalizer, step_noises=step_noises,
                                 key=step_key if eta > 0 and step_noises is None else None,
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


class Source:
  """A model to sample from: a weight file (``--weights``) or a run's newest checkpoint (``--workdir``).

  Attributes:
    model, variables, normalizer: the UNet, its EMA variables (NumPy) and the data normaliser.
    image_size: training image side.
    sampler_kwargs: schedule, min_signal_rate, max_signal_rate, target.
    data_config: the ``config.data`` of the real images (the run's; for a weight file, that of
      ``--config``, by default the demo preset's bundled digits).
    description: for messages.
  """

  def __init__(self, args):
    from ddim_jax import configs, convert, evaluation  # pylint: disable=import-outside-toplevel
    if args.workdir:
      self.model, self.variables, self.normalizer, config, step = restore_for_export(args.workdir)
      self.image_size = int(config.model.image_size)
      self.sampler_kwargs = evaluation.schedule_kwargs(config)
      self.data_config = config.data
      self.description = f"{args.workdir} step {step} (EMA)"
      self.step = step
    else:
      self.model, self.variables, self.normalizer, metadata = convert.load_weights(args.weights)
      self.image_size = int(metadata.get("image_size", 64))
      self.sampler_kwargs = _schedule_kwargs(metadata)
      self.data_config = configs.load_config(getattr(args, "config", None) or "demo").data
      self.description = f"{args.weights} ({metadata.get('weights', 'unknown')} weights)"
      self.step = int(metadata["step"]) if "step" in metadata else None

  @property
  def channels(self) -> int:
    return int(self.model.channels)

  def real_images(self, split: str, num: int | None = None, start: int = 0) -> np.ndarray:
    """Real images of ``split`` (uint8 (N, S, S, C)) from the input pipeline's cache."""
    from ddim_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    images = input_pipeline.load_split(self.data_config, split, self.image_size)
    return np.asarray(images[start:None if num is None else start + num])


def _initial_noise(args, num: int, source: Source) -> np.ndarray | None:
  """The initial noise of ``--noise-file`` (NHWC .npy) or ``--numpy-noise``; None: JAX keys."""
  shape = (num, source.image_size, source.image_size, source.channels)
  if getattr(args, "noise_file", None):
    noise = np.load(args.noise_file)
    if noise.ndim != 4 or noise.shape[1:] != shape[1:] or len(noise) < num:
      raise ValueError(f"--noise-file {args.noise_file!r} holds shape {noise.shape}; need (N >= {num}, "
                       f"{shape[1]}, {shape[2]}, {shape[3]}) (NHWC float32)")
    return noise[:num].astype(np.float32)
  if getattr(args, "numpy_noise", False):
    return numpy_noise(args.seed, shape)
  return None


def _upscale(args, image_size: int) -> int:
  """``--upscale``, or by default enough to make tiles about 64 px."""
  return args.upscale if args.upscale else max(1, 64 // image_size)


def trajectory_rows(model, variables, normalizer, initial_noise, steps: int, max_columns: int = 20, eta: float = 0.0,
                    key=None, **sampler_kwargs) -> list[np.ndarray]:
  """Rows of the noise-to-image figure: per sample, the noisy images the network sees, then its predictions.

  Returns:
    2 * B rows of (K, H, W, C) images in [0, 1], K = min(steps, max_columns) evenly spaced steps
    (always the first and the last): noisy images are shown through ``denormalize`` (clipped).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddim_jax import sampling, visualize  # pylint: disable=import-outside-toplevel
  out = sampling.generate(model, variables, jnp.asarray(initial_noise), normalizer, key=key, steps=steps, eta=eta,
                          return_trajectory=True, **sampler_kwargs)
  columns = visualize.pick_columns(steps, max_columns)

  def shown(trajectory):  # (S, B, H, W, C) -> the chosen columns, denormalised (a 4-D call: no rank promotion)
    chosen = np.asarray(trajectory)[columns]
    return np.asarray(sampling.denormalize(chosen.reshape((-1,) + chosen.shape[2:]), normalizer)).reshape(chosen.shape)

  noisy = shown(out["noisy_trajectory"][:-1])  # the inputs of each network evaluation
  preds = shown(out["pred_trajectory"])
  rows = []
  for b in range(noisy.shape[1]):
    rows += [noisy[:, b], preds[:, b]]
  return rows


def cmd_sample(args) -> int:
  """ddim-jax sample: a grid of EMA samples (and each image, and a trajectory strip)."""
  from ddim_jax import visualize  # pylint: disable=import-outside-toplevel
  source = Source(args)
  noise = _initial_noise(args, args.num_images, source)
  images = _sample_images(source.model, source.variables, source.normalizer, args.num_images, source.image_size,
                          args.steps, args.eta, args.seed, args.batch_size, source.sampler_kwargs, initial_noise=noise)
  visualize.save_grid(images, args.out, rows=args.rows, upscale=args.upscale or 1)
  print(f"wrote {args.out} ({len(images)} images of {source.description}, {args.steps} steps, eta={args.eta})")
  if args.array_out:
    np.save(args.array_out, images)
    print(f"wrote {args.array_out} (float32 images in [0, 1], NHWC)")
  if args.out_dir:
    paths = visualize.save_images(images, args.out_dir, upscale=args.upscale or 1)
    print(f"wrote {len(paths)} PNG files to {args.out_dir}")
  if args.trajectory:
    import jax  # pylint: disable=import-outside-toplevel
    k = min(args.trajectory_images, args.num_images)
    if noise is not None:
      first = noise[:k]
    else:  # the first batch's noise of _sample_images: the strip ends in the grid's first images
      first = jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(args.seed), 0))[0],
                                (min(args.batch_size, args.num_images), source.image_size, source.image_size,
                                 source.channels))[:k]
    rows = trajectory_rows(source.model, source.variables, source.normalizer, first, args.steps, eta=args.eta,
                           key=jax.random.key(args.seed + 1) if args.eta > 0 else None, **source.sampler_kwargs)
    visualize.save_rows(rows, args.trajectory, upscale=_upscale(args, source.image_size))
    print(f"wrote {args.trajectory} ({k} samples: rows of noisy images and predicted images)")
  return 0


def forward_figure_rows(image, seed: int, num_columns: int = 11) -> list[np.ndarray]:
  """The blog's forward-process figure: rows cosine and linear, t = 0, 0.1, ..., 1, one noise per column.

  As the blog (seed_spec section 9, figure 1) both schedules are the unclipped ones
  (``diffusion_schedule(type, 0, 1)``: cosine angle from 0 to pi/2, linear alpha_bar unclipped), so
  t = 0 is the clean image and the columns of both rows share their noise.

  Args:
    image: (H, W, C) NORMALISED image.
    seed: seed of the NumPy noise.

  Returns:
    Two rows of (num_columns, H, W, C) noisy images in normalised space.
  """
  from ddim_jax import schedules, visualize  # pylint: disable=import-outside-toplevel
  times = np.linspace(0.0, 1.0, num_columns)
  noises = numpy_noise(seed, (num_columns,) + tuple(np.shape(image)))
  rows = []
  for fn in (schedules.offset_cosine_schedule, schedules.linear_schedule):
    noise_rates, signal_rates = fn(times, 0.0, 1.0, xp=np)
    rows.append(visualize.forward_process(image, noises, noise_rates, signal_rates))
  return rows


def cmd_figures(args) -> int:
  """ddim-jax figures: the blog's forward process, reverse process and 6x6 sample grid."""
  from ddim_jax import sampling, schedules, visualize  # pylint: disable=import-outside-toplevel
  source = Source(args)
  upscale = _upscale(args, source.image_size)
  os.makedirs(args.out_dir, exist_ok=True)
  real = source.real_images("train", 1, start=args.image_index).astype(np.float32) / 255.0
  image = np.asarray(sampling.normalize(real, source.normalizer))[0]
  denorm = lambda x: np.asarray(sampling.denormalize(np.asarray(x, np.float32), source.normalizer))  # noqa: E731

  forward = os.path.join(args.out_dir, "forward.png")
  visualize.save_rows([denorm(r) for r in forward_figure_rows(image, args.seed)], forward, upscale=upscale)

  # Reverse process (blog figure 2): the top row noises the image at t = 0, 0.1, ..., 1 with the
  # model's schedule (independent noise per column); the bottom row starts from the top row's
  # t = 1 image and runs 10 deterministic steps, shown noise -> image: the states at t = 1, 0.9,
  # ..., 0 (the last is the re-mix at t = 0, as the blog).
  times = np.linspace(0.0, 1.0, 11)
  kwargs = source.sampler_kwargs
  noise_rates, signal_rates = schedules.rate_table(times, kwargs["schedule"], kwargs["min_signal_rate"],
                                                   kwargs["max_signal_rate"])
  top = visualize.forward_process(image, numpy_noise(args.seed + 1, (11,) + image.shape), noise_rates, signal_rates)
  out = sampling.generate(source.model, source.variables, top[-1:], source.normalizer, steps=10,
                          return_trajectory=True, **kwargs)
  bottom = np.asarray(out["noisy_trajectory"])[:, 0]
  reverse = os.path.join(args.out_dir, "reverse.png")
  visualize.save_rows([denorm(top), denorm(bottom)], reverse, upscale=upscale)

  samples = os.path.join(args.out_dir, "samples.png")
  images = _sample_images(source.model, source.variables, source.normalizer, 36, source.image_size, args.steps, 0.0,
                          args.seed, 64, kwargs)
  visualize.save_grid(images, samples, rows=6, upscale=upscale)
  print(f"wrote {forward} (forward process, rows cosine/linear), {reverse} (reverse process), {samples} "
        f"(6x6 samples, {args.steps} steps) from {source.description}")
  return 0


def _parse_steps(text: str) -> list[int]:
  try:
    steps = [int(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise ValueError(f"--steps {text!r}: expected comma-separated integers such as 10,20,50") from e
  if not steps or min(steps) < 1:
    raise ValueError(f"--steps {text!r}: expected positive step counts")
  return steps


def _write_json(path: str, record: dict) -> None:
  text = json.dumps(record, indent=2, sort_keys=True)
  if path == "-":
    print(text)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text + "\n")
    print(f"wrote {path}")


# The DDIM paper's Table 2 (CIFAR10, per-dimension MSE of pixels in [0, 1]).
DDIM_PAPER_RECONSTRUCTION = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


def cmd_invert(args) -> int:
  """ddim-jax invert: DDIM inversion image -> noise -> image, reconstruction error per step count."""
  from ddim_jax import evaluation, sampling, visualize  # pylint: disable=import-outside-toplevel
  source = Source(args)
  steps_list = _parse_steps(args.steps)
  images = source.real_images(args.split, args.num_images)
  start = time.time()
  errors = evaluation.reconstruction_errors(source.model, source.variables, source.normalizer, images, steps_list,
                                            batch_size=args.batch_size, **source.sampler_kwargs)
  print(f"DDIM inversion reconstruction error of {len(images)} {args.split} images ({source.description}), "
        f"MSE of pixels in [0, 1]:")
  print(f"{'steps':>6} {'MSE':>10} {'DDIM paper (CIFAR10)':>22}")
  for steps, value in errors.items():
    paper = DDIM_PAPER_RECONSTRUCTION.get(steps)
    print(f"{steps:>6} {value:>10.6f} {'' if paper is None else paper:>22}")
  if args.json:
    _write_json(args.json, {"reconstruction_mse": {str(k): v for k, v in errors.items()}, "steps": steps_list,
                            "num_images": int(len(images)), "split": args.split, "seconds": time.time() - start})
  if args.out:
    # Rows: originals, their latent noises (shown through denormalize), the reconstructions per step count.
    shown = evaluation.as_float_images(images[:args.show])
    rows = [shown]
    for steps in steps_list:
      noises = sampling.invert(source.model, source.variables, shown, source.normalizer, steps=steps,
                               **source.sampler_kwargs)["noises"]
      if steps == steps_list[-1]:
        rows.append(np.asarray(sampling.denormalize(noises, source.normalizer)))
      rows.append(np.asarray(sampling.generate(source.model, source.variables, noises, source.normalizer, steps=steps,
                                               **source.sampler_kwargs)["images"]))
    visualize.save_rows(rows, args.out, upscale=_upscale(args, source.image_size))
    print(f"wrote {args.out} (rows: originals, reconstructions at {steps_list[:-1]} steps, the noise at "
          f"{steps_list[-1]} steps and its reconstruction)")
  return 0


def cmd_interpolate(args) -> int:
  """ddim-jax interpolate: samples along a spherical interpolation between two initial noises."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddim_jax import sampling, visualize  # pylint: disable=import-outside-toplevel
  source = Source(args)
  if args.num_frames < 2:
    raise ValueError(f"--num-frames must be >= 2, got {args.num_frames}")
  noise = _initial_noise(args, 2 * args.pairs, source)
  if noise is None:
    noise = np.asarray(jax.random.normal(jax.random.key(args.seed), (2 * args.pairs, source.image_size,
                                                                      source.image_size, source.channels)))
  weights = np.linspace(0.0, 1.0, args.num_frames, dtype=np.float32)
  rows = []
  for p in range(args.pairs):
    frames = sampling.slerp(noise[2 * p], noise[2 * p + 1], weights)
    rows.append(np.asarray(sampling.generate(source.model, source.variables, frames, source.normalizer,
                                             steps=args.steps, **source.sampler_kwargs)["images"]))
  visualize.save_rows(rows, args.out, upscale=_upscale(args, source.image_size))
  print(f"wrote {args.out} ({args.pairs} x {args.num_frames} frames, {args.steps} steps, from {source.description})")
  return 0


def cmd_evaluate(args) -> int:
  """ddim-jax evaluate: KID of EMA samples against the validation split, per step count."""
  from ddim_jax import evaluation  # pylint: disable=import-outside-toplevel
  source = Source(args)
  steps_list = _parse_steps(args.steps)
  weights = evaluation.resolve_inception_weights(args.inception_weights)
  reals = source.real_images("validation", args.num_images)
  batch = evaluation.kid_batch_size(len(reals), args.batch_size)
  used = len(reals) // batch * batch
  feature_fn = evaluation.kid_feature_fn(weights, args.image_size)
  start = time.time()
  results = evaluation.kid_for_steps(source.model, source.variables, source.normalizer, reals, feature_fn, steps_list,
                                     batch_size=batch, seed=args.seed, progress=True, **source.sampler_kwargs)
  print(f"KID of {source.description} against {used} validation images (batches of {batch}, Inception at "
        f"{args.image_size} px, {os.path.basename(weights)}):")
  print(f"{'steps':>6} {'KID':>10}")
  for steps, value in results.items():
    print(f"{steps:>6} {value:>10.5f}")
  if args.json:
    _write_json(args.json, {"kid": {str(k): v for k, v in results.items()}, "steps": steps_list, "num_images": used,
                            "batch_size": batch, "image_size": args.image_size, "inception_weights": weights,
                            "checkpoint_step": source.step, "seed": args.seed, "seconds": time.time() - start})
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
    abstract = train.abstract_train_state(model, step_config, int(config.model.image_size), jax.random.key(0), sharding)
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
  from ddim_jax import configs, evaluation, train, visualize  # pylint: disable=import-outside-toplevel
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
                          int(config.sample.steps), 0.0, config.seed, 64, evaluation.schedule_kwargs(config))
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

  def add_source(p, config_help=True):
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--weights", help="a .safetensors file written by `ddim-jax export`")
    group.add_argument("--workdir", help="a training workdir: its newest checkpoint's EMA weights")
    if config_help:
      p.add_argument("--config", default=None,
                     help="with --weights: the preset or config file whose data gives the real images (default: "
                          "demo, the bundled digits)")

  def add_noise(p):
    p.add_argument("--seed", type=int, default=0)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--numpy-noise", action="store_true",
                       help="draw the initial noise as np.random.default_rng(seed).standard_normal((N, H, W, C), "
                            "dtype=float32): the same images as `python -m ddim_torch_ref.sample`")
    group.add_argument("--noise-file", help="initial noise from a .npy file, (N, H, W, C) float32")

  p = sub.add_parser("sample", help="a grid of EMA samples from a weight file or a workdir")
  add_source(p, config_help=False)
  p.add_argument("--out", default="samples.png")
  p.add_argument("--num-images", type=int, default=36)
  p.add_argument("--steps", type=int, default=20, help="network evaluations (Keras semantics)")
  p.add_argument("--eta", type=float, default=0.0, help="0: deterministic DDIM, 1: DDPM-like")
  add_noise(p)
  p.add_argument("--rows", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--upscale", type=int, default=None, help="integer pixel upscaling of the PNGs (grid default 1)")
  p.add_argument("--out-dir", default=None, help="also write every image as out-dir/sample_00000.png, ...")
  p.add_argument("--array-out", default=None, help="also write the images as a float32 .npy (N, H, W, C) in [0, 1]")
  p.add_argument("--trajectory", default=None, help="write the noise-to-image strip of the first samples here")
  p.add_argument("--trajectory-images", type=int, default=3, help="samples in the trajectory strip")
  p.set_defaults(fn=cmd_sample)

  p = sub.add_parser("figures", help="the blog's figures: forward process, reverse process, 6x6 samples")
  add_source(p)
  p.add_argument("--out-dir", required=True)
  p.add_argument("--steps", type=int, default=20, help="sampler steps of the 6x6 grid")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image-index", type=int, default=0, help="which training image the process figures show")
  p.add_argument("--upscale", type=int, default=None, help="pixel upscaling (default: tiles of about 64 px)")
  p.set_defaults(fn=cmd_figures)

  p = sub.add_parser("invert", help="DDIM inversion: reconstruction error per step count")
  add_source(p)
  p.add_argument("--steps", default="10,20,50,100", help="comma-separated step counts")
  p.add_argument("--num-images", type=int, default=64)
  p.add_argument("--split", default="validation", choices=("train", "validation"))
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--json", default=None, help="write the errors as JSON to this path ('-': stdout)")
  p.add_argument("--out", default=None, help="a PNG of originals, reconstructions and the noise")
  p.add_argument("--show", type=int, default=8, help="images in the --out figure")
  p.add_argument("--upscale", type=int, default=None)
  p.set_defaults(fn=cmd_invert)

  p = sub.add_parser("interpolate", help="samples along a spherical interpolation of two noises, as a strip")
  add_source(p, config_help=False)
  p.add_argument("--out", default="interpolation.png")
  p.add_argument("--num-frames", type=int, default=9)
  p.add_argument("--pairs", type=int, default=1, help="noise pairs (one strip row each)")
  p.add_argument("--steps", type=int, default=20)
  add_noise(p)
  p.add_argument("--upscale", type=int, default=None)
  p.set_defaults(fn=cmd_interpolate)

  p = sub.add_parser("evaluate", help="KID against the validation split for each step count")
  add_source(p)
  p.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
  p.add_argument("--num-images", type=int, default=None, help="validation images (default: all)")
  p.add_argument("--batch-size", type=int, default=64, help="images per KID batch (Keras 64, R 128)")
  p.add_argument("--inception-weights", default=None,
                 help="torchvision's inception_v3_google-0cc3c7bd.pth or pytorch-fid's pt_inception-2015-12-05-"
                      "6726825d.pth (default: the torch hub cache)")
  p.add_argument("--image-size", type=int, default=75, choices=(75, 299), help="Inception input: 75 Keras, 299 R")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the results as JSON to this path ('-': stdout)")
  p.set_defaults(fn=cmd_evaluate)

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
