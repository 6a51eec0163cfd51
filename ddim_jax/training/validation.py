"""The checks of a training config that run before anything is compiled or restored.

``validate_config`` checks each key (an error names it and a valid value), ``check_resume_config``
compares the config with the newest checkpoint of the workdir, ``parse_profile_steps`` reads
``train.profile_steps``. Every error is an ``errors.ConfigError``.
"""

import warnings

from etils import epath

from ddim_jax import errors
from ddim_jax.core import models, sampling, schedules, step as step_lib
from ddim_jax.infra import checkpointing, parallel, run_record
from ddim_jax.training import feed as feed_lib


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
  parse_profile_steps(t.get("profile_steps", ""))


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
