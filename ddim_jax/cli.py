"""The ``ddim-jax`` command.

  ddim-jax demo    --workdir DIR                       the offline demo: trains on the bundled digits
  ddim-jax train   --config PRESET_OR_FILE --workdir DIR [--config.a.b=value ...]
  ddim-jax export  --workdir DIR --out FILE.safetensors [--raw] [--checkpoint latest|best|N]
  ddim-jax sample  --weights FILE | --workdir DIR --out grid.png [--num-images N --steps S --eta E --seed K]
                   [--out-dir DIR] [--trajectory strip.png] [--numpy-noise | --noise-file noise.npy]
  ddim-jax figures --weights FILE | --workdir DIR --out-dir DIR    the blog's forward/reverse/sample figures
  ddim-jax invert  --weights FILE | --workdir DIR --steps 10,20,50,100   DDIM inversion reconstruction error
  ddim-jax interpolate --weights FILE | --workdir DIR --out strip.png     spherical interpolation of noises
  ddim-jax evaluate --workdir DIR --steps 5,10,20,50 [--inception-weights FILE] [--metric auto|kid|digits]
                   KID per step count (the digits metric for the bundled digits)
  ddim-jax info    --weights FILE.safetensors          what a weight file holds
  ddim-jax parity  --weights FILE | --workdir DIR [--layers] [--keras FILE.weights.h5]   JAX vs the torch twin
                   (and Keras) on that model: a verdict
  ddim-jax convert FILE.safetensors --out FILE.pt | FILE.weights.h5   the weight file as a torch file of the
                   twin or as the Keras example's weights, and back (a plain state dict: --config PRESET_OR_FILE
                   [--config.a.b=value ...]; a Keras file: [--network ema|raw])
  ddim-jax prepare-data --dataset NAME ...             prepare a TFDS dataset offline

Every command reading a workdir takes ``--checkpoint latest|best|N``; every command takes ``--debug``.
This module parses and prints; each command calls the library (``training``, ``inference``,
``interop``, ``data``). It is over 400 lines because it holds every command with its parser, so
that a command's options and what it prints read together; nothing else lives here.
"""

import argparse
import os
import shlex
import sys
import time

# Only light modules here: `ddim-jax --help` must not wait for JAX (each command imports what it
# runs, inside its function).
import ddim_jax
from ddim_jax import errors, files
from ddim_jax.infra import compilation_cache, preemption
from ddim_jax.arguments import (positive_int, nonnegative_int, seed_int, step_count, upscale_int, frame_count,
                                cache_image_size, eta_float, step_counts, cpu_devices_arg, check_output, writing,
                                check_environment, one_line, join_override_values,
                                cpu_devices_override, emit_record, human_text_to_stderr, DefaultOnceHelpFormatter,
                                decoded_metadata_value)

# evaluation.DIGITS_METRIC_IMAGES, for the help text without importing JAX (a test holds them equal).
DIGITS_METRIC_IMAGES = 500

# The DDIM paper's Table 2 (CIFAR10, per-dimension MSE of pixels in [0, 1]).
DDIM_PAPER_RECONSTRUCTION = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}

STEP_HELP = ("with --workdir: which checkpoint: latest, best (the lowest KID logged in training) or a step "
             "number (--step is the old name of this option; --steps counts sampler steps)")

# Expected failures: one line and exit status 2 (3 for a non-finite loss), no traceback. Paths that
# do not exist or cannot be read are the user's input too; every other exception is a bug.
EXPECTED_ERRORS = (errors.Error, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# ------------------------------------------------------------------------------------------------
# Subcommands.


def cmd_train(args, overrides) -> int:
  """ddim-jax train: trains a config preset or file in a workdir (resuming from its checkpoints)."""
  from ddim_jax import configs
  from ddim_jax.infra import object_store
  # An unknown key or a bad value, then a bucket workdir that cannot be reached: one line within a second or
  # seconds, before JAX and the storage libraries start (the configs are ml_collections only).
  config = configs.load_config(args.config, cpu_devices_override(args, overrides))
  object_store.check_access(args.workdir)
  from ddim_jax.training import trainer
  trainer.train_and_evaluate(config, args.workdir, distributed=True if args.distributed else None,
                             config_source=shlex.join([args.config, *overrides]), fresh=args.fresh)
  return 0


def cmd_export(args) -> int:
  """ddim-jax export: the newest checkpoint's EMA (or raw) weights as a safetensors weight file."""
  from ddim_jax.infra import object_store
  check_output("--out", args.out)
  object_store.check_access(args.workdir)  # a bucket that cannot be reached: one line, before JAX starts
  from ddim_jax.inference import pipeline
  step, how = pipeline.export_weights(args.workdir, args.out, raw=args.raw, step=args.step)
  print(f"wrote {args.out} ({'raw' if args.raw else 'EMA'} weights of step {step}, {how})")
  return 0


def cmd_demo(args, overrides) -> int:
  """ddim-jax demo: trains the demo preset on the bundled digits, then writes a sample grid and weights."""
  from ddim_jax import configs
  config = configs.load_config("demo", cpu_devices_override(args, overrides))  # before JAX starts
  from ddim_jax.quality import digits_metric
  from ddim_jax.training import demo
  result = demo.run_demo(config, args.workdir, config_source=shlex.join(["demo", *overrides]), fresh=args.fresh)
  if result.scores is not None:
    print(f"digits metric of {result.num_images} EMA samples against the {result.num_reference} validation digits "
          f"(as `ddim-jax evaluate --workdir {args.workdir} --steps {result.steps} --seed {result.seed}`), then the "
          f"calibration points:")
    print("\n".join(digits_metric.table_lines(result.scores)))
  print(f"demo done in {result.seconds:.0f}s: {result.grid} (EMA samples, step {result.step}); weights "
        f"{result.weights}; metrics {result.metrics}")
  return 0


def cmd_sample(args) -> int:
  """ddim-jax sample: a grid of EMA samples (and each image, and a trajectory strip)."""
  import jax
  import numpy as np
  from ddim_jax.inference import figures
  from ddim_jax.inference import grids
  from ddim_jax.inference import pipeline
  from ddim_jax.inference import sharded
  for option, path in (("--out", args.out), ("--array-out", args.array_out), ("--trajectory", args.trajectory)):
    check_output(option, path)
  check_output("--out-dir", args.out_dir, folder=True)
  source = pipeline.load_model(args.workdir, args.weights, cpu_devices=args.cpu_devices, step=args.step)
  sampler = source.choose_sampler(args.sampler, args.time_grid)  # eta is checked with it by source.sample
  noise = pipeline.initial_noise(args.seed, args.num_images, source.image_shape, args.noise_file, args.numpy_noise)
  images = source.sample(args.num_images, args.steps, args.eta, args.seed, args.batch_size, initial_noise=noise,
                         sampler=sampler)
  with writing("--out", args.out):
    grids.save_grid(images, args.out, rows=args.rows,
                        upscale=grids.default_upscale(source.image_size, args.upscale))
  devices = sharded.devices_for(min(args.batch_size, args.num_images))
  print(f"wrote {args.out} ({len(images)} images of {source.description}, {sampler.describe()}, {args.steps} steps, "
        f"eta={args.eta}, batches split over {devices} device{'s' * (devices > 1)})")
  if args.array_out:
    files.ensure_parent(args.array_out, "--array-out")
    files.replace_file(args.array_out, lambda f: np.save(f, images), "--array-out")
    print(f"wrote {args.array_out} (float32 images in [0, 1], NHWC)")
  if args.out_dir:
    with writing("--out-dir", args.out_dir):
      paths = grids.save_images(images, args.out_dir, upscale=args.upscale or 1)
    print(f"wrote {len(paths)} PNG files to {args.out_dir}")
  if args.trajectory:
    k = min(args.trajectory_images, args.num_images)
    # The strip starts from the grid's first noises, so that it ends in the grid's first images.
    first = noise[:k] if noise is not None else source.first_noise(args.seed, k, args.num_images, args.batch_size)
    rows = figures.trajectory_rows(source.model, source.variables, source.normalizer, first, args.steps, eta=args.eta,
                                   key=jax.random.key(args.seed + 1) if args.eta > 0 else None, spec=source.spec,
                                   sampler=sampler)
    with writing("--trajectory", args.trajectory):
      grids.save_rows(rows, args.trajectory, upscale=grids.default_upscale(source.image_size, args.upscale))
    print(f"wrote {args.trajectory} ({k} samples: rows of noisy images and predicted images)")
  return 0


def cmd_figures(args, overrides) -> int:
  """ddim-jax figures: the blog's forward process, reverse process and 6x6 sample grid."""
  import numpy as np
  from ddim_jax.inference import figures
  from ddim_jax.inference import grids
  from ddim_jax.inference import pipeline
  check_output("--out-dir", args.out_dir, folder=True)
  source = pipeline.load_model(args.workdir, args.weights, args.config, args.cpu_devices, args.step, overrides)
  upscale = grids.default_upscale(source.image_size, args.upscale)
  train_images = source.real_images("train")
  if args.image_index >= len(train_images):
    raise errors.ConfigError(f"--image-index {args.image_index} is out of range: the training split of "
                             f"{source.data_config.dataset!r} holds {len(train_images)} images (0.."
                             f"{len(train_images) - 1})")
  real = np.asarray(train_images[args.image_index:args.image_index + 1]).astype(np.float32) / 255.0
  with writing("--out-dir", args.out_dir):
    os.makedirs(args.out_dir, exist_ok=True)
  image = figures.normalized(real, source.normalizer)[0]
  forward = os.path.join(args.out_dir, "forward.png")
  rows = [figures.denormalized(r, source.normalizer) for r in figures.forward_figure_rows(image, args.seed)]
  grids.save_rows(rows, forward, upscale=upscale)
  reverse = os.path.join(args.out_dir, "reverse.png")
  grids.save_rows(figures.reverse_figure_rows(source.model, source.variables, source.normalizer, image, args.seed,
                                                  source.spec), reverse, upscale=upscale)
  samples = os.path.join(args.out_dir, "samples.png")
  sampler = source.choose_sampler(args.sampler, args.time_grid)
  grids.save_grid(source.sample(36, args.steps, 0.0, args.seed, 64, sampler=sampler), samples, rows=6, upscale=upscale)
  print(f"wrote {forward} (forward process, rows cosine/linear), {reverse} (reverse process, DDIM), {samples} "
        f"(6x6 samples, {sampler.describe()}, {args.steps} steps) from {source.description}")
  return 0


def cmd_invert(args, overrides) -> int:
  """ddim-jax invert: DDIM inversion image -> noise -> image, reconstruction error per step count."""
  from ddim_jax.inference import grids, inversion
  check_output("--json", args.json)
  check_output("--out", args.out)
  result = inversion.invert_model(args.workdir, args.weights, args.config, args.cpu_devices, args.step, overrides,
                                  steps_list=args.steps, num_images=args.num_images, split=args.split,
                                  batch_size=args.batch_size, figure_images=args.show if args.out else 0)
  print(f"DDIM inversion reconstruction error of {result.num_images} {args.split} images ({result.description}; "
        f"{result.devices} device{'s' * (result.devices > 1)}), MSE of pixels in [0, 1]:")
  print(f"{'steps':>6} {'MSE':>10} {'DDIM paper (CIFAR10)':>22}")
  for steps, value in result.mse.items():
    paper = DDIM_PAPER_RECONSTRUCTION.get(steps)
    print(f"{steps:>6} {value:>10.6f} {'' if paper is None else paper:>22}")
  emit_record(args, result.record())
  if args.out:
    with writing("--out", args.out):
      grids.save_rows(result.rows, args.out, upscale=grids.default_upscale(result.image_size, args.upscale))
    print(f"wrote {args.out} (rows: originals, reconstructions at {args.steps[:-1]} steps, the noise at "
          f"{args.steps[-1]} steps and its reconstruction)")
  return 0


def cmd_interpolate(args) -> int:
  """ddim-jax interpolate: samples along a spherical interpolation between two initial noises."""
  from ddim_jax.inference import grids
  from ddim_jax.inference import pipeline
  from ddim_jax.inference import sharded
  check_output("--out", args.out)
  source = pipeline.load_model(args.workdir, args.weights, cpu_devices=args.cpu_devices, step=args.step)
  rows = source.interpolate(args.pairs, args.num_frames, args.steps, args.seed, args.noise_file, args.numpy_noise)
  devices = sharded.devices_for(args.num_frames)
  with writing("--out", args.out):
    grids.save_rows(rows, args.out, upscale=grids.default_upscale(source.image_size, args.upscale))
  print(f"wrote {args.out} ({args.pairs} x {args.num_frames} frames, {args.steps} steps, from {source.description}; "
        f"{devices} device{'s' * (devices > 1)})")
  return 0


def cmd_evaluate(args, overrides) -> int:
  """ddim-jax evaluate: KID (the digits metric for the bundled digits) of EMA samples, per step count."""
  from ddim_jax.inference import evaluation
  check_output("--json", args.json)
  result = evaluation.evaluate_model(
      args.workdir, args.weights, args.config, args.cpu_devices, args.step, overrides, steps_list=args.steps,
      metric=args.metric,
      num_images=args.num_images, batch_size=args.batch_size, inception_weights=args.inception_weights,
      image_size=args.image_size, fid=args.fid, fid_weights=args.fid_weights, fid_image_size=args.fid_image_size,
      seed=args.seed, sampler=args.sampler, time_grid=args.time_grid)
  if isinstance(result, evaluation.DigitsEvaluation):
    return cmd_evaluate_digits(args, result)
  print("\n".join(result.table_lines()))
  if result.fid_note:  # FID not computed (where to get its weights), or not the standard one
    print(result.fid_note, file=sys.stderr)
  emit_record(args, result.record())
  return 0


def cmd_evaluate_digits(args, result) -> int:
  """ddim-jax evaluate on the bundled digits: prints the digits metric per step count, then its calibration points."""
  from ddim_jax.quality import digits_metric
  print(f"digits metric of {result.description}: {result.num_images} {result.sampler.describe()} samples (seed "
        f"{result.seed}) against the {result.num_reference} validation digits, features of "
        f"{os.path.basename(result.feature_weights)}:")
  print("\n".join(digits_metric.table_lines(result.scores, "steps")))
  print(f"calibration ({result.num_images} images each; real digits from the training split):")
  print("\n".join(digits_metric.table_lines(result.calibration)))
  emit_record(args, result.record())
  return 0


def cmd_info(args) -> int:
  """ddim-jax info: what a weight file holds (its metadata decoded, parameter counts, normaliser)."""
  import numpy as np
  from ddim_jax.core import models
  from ddim_jax.interop import weight_files
  check_output("--json", args.json)
  _, variables, normalizer, metadata = weight_files.load_weights(args.weights)
  record = {
      "weights": args.weights,
      "metadata": {key: decoded_metadata_value(value) for key, value in sorted(metadata.items())},
      "parameters": models.count_parameters(variables["params"]),
      "batch_statistics": models.count_parameters(variables.get("batch_stats", {})),
      "normalizer": {k: np.asarray(normalizer[k], np.float64).tolist() for k in ("mean", "variance")},
  }
  width = max(len(key) for key in [*record["metadata"], "normalizer variance"])
  print(f"{args.weights}: a ddim-jax weight file")
  for key, value in record["metadata"].items():
    if isinstance(value, dict):
      value = ", ".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, list):
      value = ",".join(map(str, value))
    print(f"  {key:{width}s}  {value}")
  print(f"  {'parameters':{width}s}  {record['parameters']:,} trainable, {record['batch_statistics']:,} batch "
        f"statistics")
  for key in ("mean", "variance"):
    print(f"  {'normalizer ' + key:{width}s}  {', '.join(f'{v:.4f}' for v in record['normalizer'][key])}")
  emit_record(args, record)
  return 0


def cmd_parity(args) -> int:
  """ddim-jax parity: the model through JAX and the torch twin; exit 0 within the bounds, 1 outside."""
  from ddim_jax.inference import pipeline
  from ddim_jax.interop import parity_check
  check_output("--json", args.json)
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    raise errors.ConfigError("ddim-jax parity runs the torch twin: install PyTorch (pip install 'ddim-jax[torch]')")
  source = pipeline.load_model(args.workdir, args.weights, None, args.cpu_devices, args.step)
  result = parity_check.check_model(source.model, source.variables, source.image_size, steps=args.steps,
                                    batch=args.batch_size, seed=args.seed, precision=args.precision,
                                    layers=args.layers, keras_path=args.keras)
  device = result.device
  bf16 = args.precision == "bf16"
  print(f"parity of {source.description}: JAX on {device['backend']} ({device['device_kind']}), precision "
        f"{'highest' if bf16 else args.precision}; torch {device['torch']} on the CPU, float32; {args.batch_size} "
        f"images at {source.image_size}x{source.image_size}, trajectories of {args.steps} steps")
  if bf16:
    print("then bfloat16: JAX with the computation in bfloat16 (model.dtype=bfloat16), torch under "
          "autocast(bfloat16); each against the float32 JAX output and against each other")
  if args.keras:
    print(f"Keras {device['keras']} on {device['keras_backend']}: the EMA network of {args.keras}")
  width = max([38] + [len(row.name) for row in result.rows])
  print(f"{'comparison':{width}s} {'max |diff|':>11s} {'relative':>10s} {'bound':>8s}")
  for row in result.rows:
    print(f"{row.name:{width}s} {row.max_abs:11.2e} {row.max_rel:10.2e} {row.bound:8.0e} "
          f"{'ok' if row.ok else 'OUTSIDE'}")
  if result.layers is not None:
    print(f"every module both twins share, in torch's order (relative bound {parity_check.LAYER_BOUND:.0e}):")
    for row in result.layers:
      print(f"  {row.name:48s} {row.max_abs:11.2e} {row.max_rel:10.2e} {'ok' if row.ok else 'OUTSIDE'}")
    first = result.first_divergence
    print(f"first module past the bound: {first.name}" if first else "no module past the bound")
  emit_record(args, result.record())
  bounds = "float32 and bfloat16 bounds" if bf16 else "float32 bounds"
  print("verdict: " + (f"within the {bounds}" if result.passed else f"OUTSIDE the {bounds} (exit 1)"))
  return 0 if result.passed else 1


def cmd_convert(args, overrides) -> int:
  """ddim-jax convert: a weight file to a torch file (.pt/.pth) of the twin or a Keras .weights.h5, or back."""
  from ddim_jax.interop import conversion
  check_output("--out", args.out)
  result = conversion.convert(args.source, args.out, args.config, overrides, args.network)
  meta = result["metadata"]
  model = ", ".join(f"{k}={meta[k]}" for k in ("variant", "widths", "block_depth", "embedding_dims", "channels"))
  print(f"wrote {args.out} ({model}, image_size={meta.get('image_size')}; normaliser {result['normalizer']})")
  if "model" in result:
    print(f"the Keras file's {meta.get('weights')} network; the architecture from {result['model']}, the image size, "
          f"diffusion and data from {'the file' if result['model'] == 'recorded in the file' else 'the config'}")
  kind = conversion.file_kind(args.out, "--out")
  if kind == "torch":
    print("load it in PyTorch: model = ddim_torch_ref.models.create_model(...); "
          "model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])")
  elif kind == "keras":
    print("load it in the Keras example: model = DiffusionModel(image_size, widths, block_depth); "
          "model.normalizer.build((None, image_size, image_size, 3)); model.built = True; model.load_weights(path) "
          "(before compile(); after it, load_weights(path, skip_mismatch=True): the file holds the two networks "
          "(both these weights) and the normaliser, not the KID's Inception)")
  return 0


def cmd_prepare_data(args) -> int:
  """ddim-jax prepare-data: prepare a TFDS dataset (offline with --source-dir) and build the cache."""
  from ddim_jax import data
  start = time.time()
  result = data.prepare_source(args.dataset, source_dir=args.source_dir, data_dir=args.data_dir)
  if result is not None:
    state = "already prepared" if result["already_prepared"] else f"prepared in {result['seconds']:.1f}s"
    print(f"{args.dataset}: TFDS {state} at {result['data_dir']}; TFDS splits {result['splits']}")
  if args.image_size <= 0:
    return 0
  cache = data.build_cache(args.dataset, args.image_size, data_dir=args.data_dir, folder=args.folder,
                           cache_dir=args.cache_dir, split=args.split, antialias=not args.no_antialias,
                           split_seed=args.split_seed, force=args.force)
  how = f"built in {cache['seconds']:.1f}s" if cache["built"] else "already cached"
  print(f"cache {how}: {cache['path']}")
  print(f"  {args.image_size}x{args.image_size}, split={cache['split']}, antialias={not args.no_antialias}: "
        f"train {cache['splits']['train']}, validation {cache['splits']['validation']} images")
  if cache["skipped"]:
    print(f"  skipped {cache['skipped']} unreadable images (first: {', '.join(cache['skipped_names'][:5])})")
  normalizer = cache["normalizer"]
  print(f"  normalizer mean {[round(float(v), 4) for v in normalizer['mean']]} "
        f"variance {[round(float(v), 4) for v in normalizer['variance']]}")
  print(f"done in {time.time() - start:.1f}s")
  return 0


# ------------------------------------------------------------------------------------------------
# The parser: one small function per subcommand.


def add_source_arguments(p, config_help: bool = True) -> None:
  """--weights FILE | --workdir DIR (and --config, whose data gives the real images of a weight file)."""
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--weights", help="a .safetensors file written by `ddim-jax export`")
  group.add_argument("--workdir", help="a training workdir: the EMA weights of its --checkpoint")
  p.add_argument("--checkpoint", "--step", dest="step", default="latest", help=STEP_HELP)
  p.add_argument("--cpu-devices", default="auto", type=cpu_devices_arg,
                 help="JAX CPU devices to split every batch over: 'auto' (one per core, default) or a count; "
                      "the images are the same. No effect on GPU/TPU, which use every local device")
  if config_help:
    p.add_argument("--config", default=None,
                   help="with --weights: the preset or config file whose data gives the real images (default: the "
                        "data the weight file records). --config.data.KEY=VALUE overrides where they are (e.g. "
                        "--config.data.data_dir=DIR), for a --workdir too")


def add_training_device_arguments(p, default: str) -> None:
  """--cpu-devices for the training commands: the same option as the inference commands', setting
  ``config.cpu_devices``."""
  p.add_argument("--cpu-devices", default=None, type=cpu_devices_arg,
                 help=f"JAX CPU devices to train on: 'auto' (one per core) or a count (default: {default} "
                      "cpu_devices); the same as --config.cpu_devices. No effect on GPU/TPU")


def add_noise_arguments(p) -> None:
  """--seed, and --numpy-noise | --noise-file (the noise conventions of ``inference``)."""
  p.add_argument("--seed", type=seed_int, default=0, help="seed of the noises (JAX keys, or NumPy with --numpy-noise)")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--numpy-noise", action="store_true",
                     help="draw the initial noise as np.random.default_rng(seed).standard_normal((N, H, W, C), "
                          "dtype=float32): the same images as `python -m ddim_torch_ref.sample`")
  group.add_argument("--noise-file", help="initial noise from a .npy file, (N, H, W, C) float32")


SAMPLERS = ("ddim", "dpmpp_2m")  # ddim_jax.core.solvers' (not imported here: it imports JAX; a test compares)
TIME_GRIDS = ("uniform", "logsnr")


def add_sampler_arguments(p, what: str = "the samples") -> None:
  """--sampler and --time-grid of the sampling commands (default: the model's run's, ``config.sample``)."""
  p.add_argument("--sampler", default=None, choices=SAMPLERS,
                 help=f"the sampler of {what}: ddim (Keras, R; any --eta where the command has it) or dpmpp_2m "
                      "(DPM-Solver++(2M): second order, deterministic; fewer steps for the same quality, "
                      "docs/sampling.md). Default: the one the model's run used (its config.sample.sampler, which a "
                      "weight file records), else ddim")
  p.add_argument("--time-grid", default=None, choices=TIME_GRIDS,
                 help="the sampler's times: uniform in t (Keras) or uniform in log-SNR (cosine schedule only). "
                      "Default: the model's run's, else uniform")


def add_demo_parser(sub) -> None:
  p = sub.add_parser("demo", help="the offline demo: train on the bundled digits, sample",
                     epilog="Override any key of the demo preset with --config.a.b=value, e.g. "
                            "--config.train.num_steps=200")
  p.add_argument("--workdir", default="outputs/demo",
                 help="where the demo trains and writes its samples, weights and metrics")
  add_fresh_arguments(p)
  add_training_device_arguments(p, "the preset's")
  p.set_defaults(fn=cmd_demo, takes_overrides=True)


def add_fresh_arguments(p) -> None:
  """--fresh of the training commands (not for job scripts that a scheduler restarts: each restart would start over)."""
  p.add_argument("--fresh", action="store_true",
                 help="start at step 0 even if --workdir holds a run: that run moves to WORKDIR/previous/<UTC time>/ "
                      "(nothing is deleted); not for a job that a scheduler restarts")


def add_train_parser(sub) -> None:
  p = sub.add_parser("train", help="train (resumes from the newest checkpoint in --workdir)",
                     epilog="Override any config key with --config.a.b=value, e.g. --config.train.num_steps=1000")
  p.add_argument("--config", default="default", help="a preset (default, r_variant, demo) or a config file")
  p.add_argument("--workdir", required=True,
                 help="the run's folder (local, gs:// or s3://): checkpoints, metrics, samples; resumed when it "
                      "holds a run")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host; automatic when JAX_COORDINATOR_ADDRESS is set)")
  add_fresh_arguments(p)
  add_training_device_arguments(p, "the config's")
  p.set_defaults(fn=cmd_train, takes_overrides=True)


def add_export_parser(sub) -> None:
  p = sub.add_parser("export", help="write a checkpoint's weights as a safetensors file")
  p.add_argument("--workdir", required=True, help="the training workdir to export from")
  p.add_argument("--out", required=True, help="the .safetensors weight file to write")
  p.add_argument("--checkpoint", "--step", dest="step", default="latest", help=STEP_HELP)
  p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
  p.set_defaults(fn=cmd_export)


def add_sample_parser(sub) -> None:
  p = sub.add_parser("sample", help="a grid of EMA samples from a weight file or a workdir")
  add_source_arguments(p, config_help=False)
  p.add_argument("--out", default="samples.png", help="the PNG grid to write")
  p.add_argument("--num-images", type=positive_int, default=36, help="images to sample")
  p.add_argument("--steps", type=step_count, default=20, help="network evaluations (Keras semantics)")
  p.add_argument("--eta", type=eta_float, default=0.0, help="0: deterministic DDIM, 1: DDPM-like (ddim only)")
  add_sampler_arguments(p)
  add_noise_arguments(p)
  p.add_argument("--rows", type=positive_int, default=None, help="grid rows (default: about square)")
  p.add_argument("--batch-size", type=positive_int, default=64,
                 help="images per sampling call (split over the devices)")
  p.add_argument("--upscale", type=upscale_int, default=None,
                 help="integer pixel upscaling of the PNGs (default: tiles of about 64 px in the grid and the "
                      "trajectory, as `demo`; the --out-dir images at their native size)")
  p.add_argument("--out-dir", default=None, help="also write every image as out-dir/sample_00000.png, ...")
  p.add_argument("--array-out", default=None, help="also write the images as a float32 .npy (N, H, W, C) in [0, 1]")
  p.add_argument("--trajectory", default=None, help="write the noise-to-image strip of the first samples here")
  p.add_argument("--trajectory-images", type=positive_int, default=3, help="samples in the trajectory strip")
  p.set_defaults(fn=cmd_sample)


def add_figures_parser(sub) -> None:
  p = sub.add_parser("figures", help="the blog's figures: forward process, reverse process, 6x6 samples")
  add_source_arguments(p)
  p.add_argument("--out-dir", required=True, help="the folder of forward.png, reverse.png and samples.png")
  p.add_argument("--steps", type=step_count, default=20, help="sampler steps of the 6x6 grid")
  add_sampler_arguments(p, "the 6x6 grid (the reverse-process figure is DDIM's, as the blog's)")
  p.add_argument("--seed", type=seed_int, default=0, help="seed of the noises")
  p.add_argument("--image-index", type=nonnegative_int, default=0, help="which training image the process figures show")
  p.add_argument("--upscale", type=upscale_int, default=None, help="pixel upscaling (default: tiles of about 64 px)")
  p.set_defaults(fn=cmd_figures, takes_overrides=True)


def add_invert_parser(sub) -> None:
  p = sub.add_parser("invert", help="DDIM inversion: reconstruction error per step count")
  add_source_arguments(p)
  p.add_argument("--steps", type=step_counts, default="10,20,50,100", help="comma-separated step counts")
  p.add_argument("--num-images", type=positive_int, default=64, help="real images to invert (the first of --split)")
  p.add_argument("--split", default="validation", choices=("train", "validation"),
                 help="which split's images to invert")
  p.add_argument("--batch-size", type=positive_int, default=64,
                 help="images per inversion call (split over the devices)")
  p.add_argument("--json", default=None, help="write the errors as JSON to this path ('-': stdout)")
  p.add_argument("--out", default=None, help="a PNG of originals, reconstructions and the noise")
  p.add_argument("--show", type=positive_int, default=8, help="images in the --out figure")
  p.add_argument("--upscale", type=upscale_int, default=None,
                 help="pixel upscaling of --out (default: tiles of about 64 px)")
  p.set_defaults(fn=cmd_invert, takes_overrides=True)


def add_interpolate_parser(sub) -> None:
  p = sub.add_parser("interpolate", help="samples along a spherical interpolation of two noises, as a strip (DDIM: "
                                         "the noise-to-image map that inversion and interpolation assume)")
  add_source_arguments(p, config_help=False)
  p.add_argument("--out", default="interpolation.png", help="the PNG strip to write")
  p.add_argument("--num-frames", type=frame_count, default=9, help="frames per row, the two ends included")
  p.add_argument("--pairs", type=positive_int, default=1, help="noise pairs (one strip row each)")
  p.add_argument("--steps", type=step_count, default=20, help="DDIM steps")
  add_noise_arguments(p)
  p.add_argument("--upscale", type=upscale_int, default=None, help="pixel upscaling (default: tiles of about 64 px)")
  p.set_defaults(fn=cmd_interpolate)


def add_evaluate_parser(sub) -> None:
  p = sub.add_parser(
      "evaluate", help="KID and FID (digits: the digits metric) against the validation split per step count",
      description="KID of EMA samples against the validation split per step count, as the Keras example computes "
                  "it (its Inception weights at --image-size, 75 px), and FID beside it: the standard FID, the 2015 "
                  "FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, --fid-weights) at 299 px "
                  "with pytorch-fid's bilinear resize, a Gaussian fit over all the images. That number, reported "
                  "as 'fid', is comparable with pytorch-fid / clean-fid / torchmetrics FIDs only with those "
                  "standard weights, and only at equal image counts and resolution (FID of a few hundred 64x64 "
                  "images is not a published FID of 50,000 images); other weights or --fid-image-size are "
                  "reported under their settings' name (e.g. fid_torchvision_75px). Without the FID weights file "
                  "KID is reported alone and one line says where to get it. For the bundled digits: the digits "
                  "metric (no Inception). Details: docs/evaluation.md.")
  add_source_arguments(p)
  p.add_argument("--steps", type=step_counts, default="5,10,20,50", help="comma-separated step counts")
  add_sampler_arguments(p)
  p.add_argument("--metric", default="auto", choices=("auto", "kid", "digits"),
                 help="auto: the digits metric (no Inception weights) for the bundled digits, else KID")
  p.add_argument("--num-images", type=positive_int, default=None,
                 help=f"KID: validation images (default: all); digits: samples (default "
                      f"{DIGITS_METRIC_IMAGES})")
  p.add_argument("--batch-size", type=positive_int, default=64, help="images per KID batch (Keras 64, R 128)")
  p.add_argument("--inception-weights", default=None,
                 help="KID's Inception weights: torchvision's inception_v3_google-0cc3c7bd.pth or pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
  p.add_argument("--image-size", type=int, default=75, choices=(75, 299),
                 help="KID's Inception input: 75 Keras, 299 R")
  p.add_argument("--fid-weights", default=None,
                 help="FID's Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the standard "
                      "FID; https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                      "pt_inception-2015-12-05-6726825d.pth). Default: that file in the torch hub cache "
                      "($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints); not there: no FID")
  p.add_argument("--fid-image-size", type=int, default=299,
                 help="FID's Inception input side; 299 is the standard FID, another side is reported as "
                      "fid_<weights>_<side>px")
  p.add_argument("--no-fid", dest="fid", action="store_false",
                 help="KID alone (default: with FID, whose 299 px Inception costs ~16x KID's 75 px per image)")
  p.add_argument("--seed", type=seed_int, default=0, help="seed of the samples' noises")
  p.add_argument("--json", default=None, help="write the results as JSON to this path ('-': stdout)")
  p.set_defaults(fn=cmd_evaluate, takes_overrides=True)


def add_info_parser(sub) -> None:
  p = sub.add_parser("info", help="what a weight file holds")
  p.add_argument("--weights", required=True, help="a .safetensors weight file")
  p.add_argument("--json", default=None,
                 help="also write what it holds as JSON to this path ('-': stdout, then the only output), the "
                      "metadata decoded (numbers, the data object, widths as a list)")
  p.set_defaults(fn=cmd_info)


def add_parity_parser(sub) -> None:
  p = sub.add_parser("parity", help="the model through JAX and the torch twin: agreement and a verdict (exit 1 "
                                    "outside the bounds)")
  add_source_arguments(p, config_help=False)
  p.add_argument("--steps", type=step_count, default=20, help="DDIM steps of the compared trajectories")
  p.add_argument("--batch-size", type=positive_int, default=4, help="images of each comparison")
  p.add_argument("--seed", type=seed_int, default=1, help="seed of the NumPy inputs and noises")
  p.add_argument("--precision", default="highest", choices=("highest", "default", "bf16"),
                 help="JAX's float32 matmul/convolution precision ('default': JAX's own, TF32 on GPUs, bf16 passes "
                      "on TPUs); bf16: also JAX in bfloat16 and torch under autocast(bfloat16), against float32 and "
                      "each other")
  p.add_argument("--layers", action="store_true",
                 help="also compare every module's output and name the first past the bound")
  p.add_argument("--keras", default=None, metavar="FILE.weights.h5",
                 help="also run the Keras example's network from this file (its EMA network; the same model as "
                      "the weights, e.g. the file they were converted from) and compare it with JAX")
  p.add_argument("--json", default=None, help="also write the record as JSON here ('-': print it)")
  p.set_defaults(fn=cmd_parity)


def add_convert_parser(sub) -> None:
  p = sub.add_parser("convert", help="a weight file to a torch file (.pt/.pth) of the twin or to the Keras "
                                     "example's .weights.h5, or back",
                     epilog="A torch file written here records the model and its data; a plain state dict "
                            "(torch.save(model.state_dict())) needs --config, and --config.* overrides as trained. "
                            "A Keras .weights.h5 of the example gives its architecture and normaliser; the image "
                            "size, diffusion and data are the example's (the default preset) unless --config says "
                            "otherwise")
  p.add_argument("source", help="a .safetensors weight file, a .pt/.pth torch file (read with weights_only=True), or "
                                "the Keras example's .weights.h5")
  p.add_argument("--out", required=True, help="the file to write: .pt/.pth or .weights.h5 for a weight file, "
                                              ".safetensors for the others")
  p.add_argument("--config", default=None,
                 help="a plain state dict: the preset or config file it was trained with (model, image size, "
                      "diffusion, data; the normaliser is computed from that data); a Keras file: its image size, "
                      "diffusion and data (default: the default preset, the Keras example's)")
  p.add_argument("--network", default=None, choices=("ema", "raw"),
                 help="a Keras file: which of the example's networks to take (default: ema, what it samples with)")
  p.set_defaults(fn=cmd_convert, takes_overrides=True)


def add_prepare_data_parser(sub) -> None:
  p = sub.add_parser(
      "prepare-data", help="prepare a dataset (TFDS offline from local files) and its preprocessed cache",
      description="Prepares a TFDS dataset (downloading it, or offline from local copies of its original "
                  "files with --source-dir) and builds the uint8 cache that training reads.")
  p.add_argument("--dataset", default="oxford_flowers102", help="a TFDS name, 'digits' or 'folder'")
  p.add_argument("--source-dir", default=None,
                 help="directory with the dataset's original files (oxford_flowers102: 102flowers.tgz, "
                      "imagelabels.mat, setid.mat); without it TFDS downloads them")
  p.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
  p.add_argument("--folder", default=None, help="image folder for --dataset folder")
  p.add_argument("--image-size", type=cache_image_size, default=64, help="cache size; 0 prepares TFDS only")
  p.add_argument("--cache-dir", default=None,
                 help="preprocessed-image cache (default $DDIM_JAX_CACHE_DIR or ~/.cache/ddim_jax)")
  p.add_argument("--split", default="keras", choices=("keras", "r"),
                 help="keras: 80%% of each TFDS split; r: a random 80/20 split of all images")
  p.add_argument("--no-antialias", action="store_true", help="the R resize (bilinear without antialiasing)")
  p.add_argument("--split-seed", type=seed_int, default=1, help="seed of the random split (r, folders, digits)")
  p.add_argument("--force", action="store_true", help="rebuild the cache entry")
  p.set_defaults(fn=cmd_prepare_data)


SUBCOMMAND_PARSERS = (add_demo_parser, add_train_parser, add_export_parser, add_sample_parser, add_figures_parser,
                      add_invert_parser, add_interpolate_parser, add_evaluate_parser, add_info_parser,
                      add_parity_parser, add_convert_parser, add_prepare_data_parser)


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of every subcommand."""
  parser = argparse.ArgumentParser(prog="ddim-jax", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"ddim-jax {ddim_jax.__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  for add_parser in SUBCOMMAND_PARSERS:
    add_parser(sub)
  for p in sub.choices.values():  # every option's help line ends with its default (once)
    p.formatter_class = DefaultOnceHelpFormatter
  for p in [parser, *sub.choices.values()]:  # before or after the subcommand
    p.add_argument("--debug", action="store_true", default=False if p is parser else argparse.SUPPRESS,
                   help=f"show tracebacks of expected errors too (or set {errors.DEBUG_ENV}=1)")
  return parser


def main(argv=None) -> int:
  """Entry point of the ``ddim-jax`` console script.

  Exit status: 0 done, 2 an expected failure (one line naming the fix; ``errors.Error``, missing
  or unreadable paths, a JAX_PLATFORMS whose backend does not start), 3 a non-finite loss, 130 Ctrl-C
  (one line; training saves the step it is at first, a second Ctrl-C stops at once). Any other
  exception is a bug and keeps its traceback; ``--debug`` or ``DDIM_JAX_DEBUG=1`` shows the
  traceback of expected failures and of Ctrl-C too.
  """
  args, extra = build_parser().parse_known_args(argv)
  extra = join_override_values(extra)
  if extra and not getattr(args, "takes_overrides", False):
    build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
  debug = args.debug or os.environ.get(errors.DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
  try:
    # Python's own SIGINT handler lost most Ctrl-Cs to JAX's gc callback and broke imports with them
    # (preemption.raise_keyboard_interrupt); installed before JAX is imported.
    with preemption.ctrl_c_raises_reliably(), human_text_to_stderr(args):
      check_environment()
      compilation_cache.enable()  # JAX-free: the commands refuse bad input before JAX starts
      return args.fn(args, extra) if getattr(args, "takes_overrides", False) else args.fn(args)
  except EXPECTED_ERRORS as e:
    if debug:
      raise
    print(f"ddim-jax {args.command}: error: {one_line(e)}", file=sys.stderr)
    return getattr(e, "exit_status", 2)
  except KeyboardInterrupt as e:  # Ctrl-C; training's says which step it saved (preemption.Interrupted)
    if debug:
      raise
    print(f"ddim-jax {args.command}: interrupted{': ' + one_line(e) if str(e) else ''}", file=sys.stderr)
    return 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def entry() -> None:
  """The ``ddim-jax`` program (console script, ``python -m ddim_jax``): ``main``, then exit.

  After a Ctrl-C (status 130) the process leaves at once (``os._exit``) instead of tearing the
  interpreter down: an interrupted jitted computation may still run on XLA's threads, and finalising
  under it crashed the process (SIGSEGV after its one line, seen under load). Nothing is lost: every
  output is written whole or not at all (replaced by a rename), and a trainer has saved and closed
  its run before it returns 130.
  """
  status = main()
  if status == 130:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # pylint: disable=protected-access
  sys.exit(status)


if __name__ == "__main__":
  entry()
