"""The checks of a training config that run before anything is compiled or restored.

``validate_config`` checks each key (an error names it and a valid value), ``check_resume_config``
compares the config with the newest checkpoint of the workdir, ``parse_profile_steps`` reads
``train.profile_steps``. Every error is an ``errors.ConfigError``.
"""

import numbers
import warnings

from etils import epath

from ddim_jax import errors
from ddim_jax.core import models, sampling, schedules, solvers, step as step_lib
from ddim_jax.infra import checkpointing, parallel, run_record
from ddim_jax.quality import inception
from ddim_jax.training import feed as feed_lib

# Seeds: JAX keys and NumPy generators both take 0..2**32-1 (the --seed options' range, arguments.MAX_SEED).
MAX_SEED = 2 ** 32 - 1


def validate_config(config, num_devices: int) -> None:
  """Checks the config before anything is compiled; errors name the key and a valid value."""
  t = config.train

  def require(ok, key, value, what):
    if not ok:
      raise errors.ConfigError(f"config.{key}={value!r} is invalid: {what}")

  require(int(t.num_steps) > 0, "train.num_steps", t.num_steps, "must be a positive number of steps")
  parallel.check_batch_size(int(t.batch_size), num_devices)
  for key in ("checkpoint_every", "log_every"):
    require(int(t[key]) > 0, f"train.{key}", t[key], "must be a positive number of steps")
  require(int(t.sample_every) >= 0, "train.sample_every", t.sample_every, "must be >= 0 (0: no sample grids)")
  k = int(t.get("steps_per_call", 1))
  require(k >= 1, "train.steps_per_call", k, "must be >= 1")
  clip = float(t.get("grad_clip_norm", 0.0) or 0.0)
  require(clip >= 0 and clip < float("inf"), "train.grad_clip_norm", t.get("grad_clip_norm"),
          "must be >= 0 (0: no clipping)")
  accum = int(t.get("grad_accum_steps", 1) or 1)
  per_device = int(t.batch_size) // max(num_devices, 1)
  require(accum >= 1 and per_device % accum == 0, "train.grad_accum_steps", t.get("grad_accum_steps"),
          f"must be >= 1 and divide each device's batch ({int(t.batch_size)} images / {num_devices} devices = "
          f"{per_device})")
  require(int(t.get("kid_every", 0) or 0) >= 0, "train.kid_every", t.get("kid_every"), "must be >= 0 (0: no KID)")
  require(0.0 <= float(t.ema_decay) < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1)")
  require(float(t.learning_rate) > 0, "train.learning_rate", t.learning_rate, "must be > 0")
  require(float(t.weight_decay) >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  require(t.loss in step_lib.LOSSES, "train.loss", t.loss, f"choose one of {step_lib.LOSSES}")
  require(t.get("lr_schedule", "constant") in step_lib.LR_SCHEDULES, "train.lr_schedule", t.get("lr_schedule"),
          f"choose one of {step_lib.LR_SCHEDULES}")
  require(int(t.get("warmup_steps", 0) or 0) >= 0, "train.warmup_steps", t.get("warmup_steps"), "must be >= 0")
  require(config.diffusion.target in sampling.TARGETS, "diffusion.target", config.diffusion.target,
          f"choose one of {sampling.TARGETS}")
  require(config.parallel in parallel.PARALLEL_MODES, "parallel", config.parallel,
          f"choose one of {parallel.PARALLEL_MODES}")
  require(t.get("data_placement", "auto") in feed_lib.PLACEMENTS, "train.data_placement", t.get("data_placement"),
          f"choose one of {feed_lib.PLACEMENTS}")
  schedules.get_schedule(config.diffusion.schedule, config.diffusion.min_signal_rate,
                         config.diffusion.max_signal_rate)
  models.check_image_size(models.create_model(**config.model), int(config.model.image_size))
  require(int(config.sample.steps) >= 1, "sample.steps", config.sample.steps, "must be >= 1")
  require(config.sample.get("sampler", "ddim") in solvers.SAMPLERS, "sample.sampler", config.sample.get("sampler"),
          f"choose one of {solvers.SAMPLERS}")
  require(config.sample.get("time_grid", "uniform") in solvers.TIME_GRIDS, "sample.time_grid",
          config.sample.get("time_grid"), f"choose one of {solvers.TIME_GRIDS}")
  solvers.Sampler.from_config(config.sample).check(schedules.DiffusionSpec.from_config(config))
  parse_profile_steps(t.get("profile_steps", ""))
  _validate_counts(config, require)


def _is_int_in(value, low: int, high: float = float("inf")) -> bool:
  """An integer (not a bool) in [low, high]."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _validate_counts(config, require) -> None:
  """The seeds, counts and sizes that were first read after the workdir was made (a traceback or a
  late error then): every one here, before anything is created on disk."""
  require(_is_int_in(config.seed, 0, MAX_SEED), "seed", config.seed, f"must be an integer in 0..{MAX_SEED}")
  d, t, e = config.data, config.train, config.get("eval", {})
  split_seed = d.get("split_seed", 1)
  require(_is_int_in(split_seed, 0, MAX_SEED), "data.split_seed", split_seed, f"must be an integer in 0..{MAX_SEED}")
  repetitions = d.get("repetitions", 1)
  require(_is_int_in(repetitions, 1), "data.repetitions", repetitions,
          "must be >= 1 (passes over the training images per epoch)")
  fraction = d.get("validation_fraction", 0.2)
  require(isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0 <= fraction < 1,
          "data.validation_fraction", fraction,
          "must be in [0, 1)")
  keep = t.get("keep_checkpoints", 3)
  require(_is_int_in(keep, 1), "train.keep_checkpoints", keep, "must be >= 1 (the newest checkpoints kept)")
  require(_is_int_in(config.sample.num_images, 1), "sample.num_images", config.sample.num_images, "must be >= 1")
  quality = e.get("num_quality_images", 500)  # the demo's digits metric
  require(_is_int_in(quality, 2), "eval.num_quality_images", quality, "must be >= 2 (a metric compares sets)")
  if int(t.get("kid_every", 0) or 0) > 0:  # read only when KID is on
    # (key, the default that evaluation.make_training_kid reads, the least value, what it counts)
    for key, default, low, what in (("kid_steps", 5, 1, "sampler steps"),
                                    ("kid_batch_size", 64, 2, "images per KID batch"),
                                    ("kid_image_size", 75, inception.MIN_IMAGE_SIZE, "Inception's input side")):
      value = e.get(key, default)
      require(_is_int_in(value, low), f"eval.{key}", value, f"must be an integer >= {low} ({what})")
    num = e.get("num_kid_images")
    require(num is None or _is_int_in(num, 2), "eval.num_kid_images", num,
            "must be >= 2 or None (the whole validation split)")


def check_resume_config(config, workdir: str) -> dict:
  """The config changes since the newest checkpoint of ``workdir`` whose metadata reads ({} if none).

  Raises:
    errors.ConfigError: an incompatible change (``run_record.check_resume``).
  """
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    return {}
  # Read-only: the trainer's own writer opens (and cleans up) the directory later, under the lock.
  with checkpointing.Checkpointer(directory, async_save=False, read_only=True) as ckpt, warnings.catch_warnings():
    # An unreadable step is reported once, by restore_latest, which falls back past it too.
    warnings.simplefilter("ignore", checkpointing.CheckpointRestoreWarning)
    newest = ckpt.newest_readable_meta()
  if newest is None:
    return {}
  step, meta = newest
  stored_clip = float(meta["config"].get("train", {}).get("grad_clip_norm", 0.0) or 0.0)
  clip = float(config.train.get("grad_clip_norm", 0.0) or 0.0)
  if (stored_clip > 0) != (clip > 0):  # the optimiser state has (or lacks) the clip's state
    raise errors.ConfigError(
        f"{workdir} holds a run with train.grad_clip_norm={stored_clip} (step {step}), this config has {clip}: "
        "clipping cannot be switched on or off when a run resumes (the optimiser state differs). Resume with "
        f"clipping {'on (any norm > 0)' if stored_clip > 0 else 'off (0)'}, or train in a new --workdir")
  return run_record.check_resume(meta["config"], config, workdir, step)


def parse_profile_steps(text) -> tuple[int, int] | None:
  """``train.profile_steps`` "A,B" -> (A, B): trace the steps after step A up to step B; "" -> None."""
  text = str(text or "").strip()
  if not text:
    return None
  try:
    first, last = (int(v) for v in text.split(","))
  except ValueError as e:
    raise errors.ConfigError(f"config.train.profile_steps={text!r} is invalid: use 'A,B' (two step numbers, "
                             "e.g. 100,110: trace steps 101 to 110) or '' (off)") from e
  if not 0 <= first < last:
    raise errors.ConfigError(f"config.train.profile_steps={text!r} is invalid: need 0 <= A < B")
  return first, last
