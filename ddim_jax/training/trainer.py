"""The training loop: data, the data-parallel step, checkpoints, metrics, sample grids and KID.

``train_and_evaluate`` drives the pure per-device step of ``train.py`` through
``parallel.make_train_fn`` (shard_map under jit, or pmap: the loop does not care which), resumes
from the newest checkpoint that restores (``checkpointing.py``), and writes what a run leaves
behind in its workdir: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
``samples/step_<n>.png``. The workdir may be a bucket (``gs://...``): every file goes through
``etils.epath`` (orbax's path layer too).
"""

import collections
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as tensorboard_hparams

from ddim_jax import data, errors
from ddim_jax.core import models, rng, sampling, schedules, step as step_lib
from ddim_jax.inference import evaluation, grids, sharded
from ddim_jax.infra import checkpointing, object_store, parallel, preemption, run_record
from ddim_jax.training import feed as feed_lib
from ddim_jax.infra import workdir as workdir_lib


# Training calls dispatched ahead of the one whose results the loop has waited for (see the loop).
MAX_CALLS_IN_FLIGHT = 2


class NonFiniteLossError(errors.Error, FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


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


def _to_host(tree):
  """Replicated global arrays -> NumPy (the local copy; works on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


# TensorBoard tags of the metrics that are not training metrics (the rest go to train/<name>).
TENSORBOARD_TAGS = {"val_kid": "val/kid"}


def _record_step(line: str) -> int | None:
  """The "step" of one JSON line of metrics.jsonl; None for a line that does not parse."""
  try:
    record = json.loads(line)
    return int(record["step"]) if isinstance(record, dict) else None
  except (ValueError, KeyError, TypeError):
    return None


def _truncate_records(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records of ``path`` (JSON lines with a "step") up to ``last_step``; atomic rewrite.

  A line that does not parse (a crash or a full disk mid-write leaves a partial last line) is
  dropped with a warning instead of making every resume fail.
  """
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
  steps = [_record_step(line) if line.strip() else None for line in lines]
  bad = [i + 1 for i, (line, step) in enumerate(zip(lines, steps)) if line.strip() and step is None]
  if bad:
    warnings.warn(f"{path}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
                  f"{' ...' if len(bad) > 5 else ''} of {len(lines)}; a run stopped mid-write)", stacklevel=2)
  kept = [line if line.endswith("\n") else line + "\n"
          for line, step in zip(lines, steps) if step is not None and step <= last_step]
  if kept != lines:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard event files in the workdir (process 0 only).

  A local workdir is written directly (one flushed line per record). A bucket workdir is staged:
  objects in a bucket cannot be appended to (gcsfs silently overwrites in mode "a") and
  tensorboardX would bring its own GCS client, so both files are written to a local temporary
  folder and copied up through epath by ``sync`` (at each checkpoint, and at ``close``). A run
  killed between syncs loses the records since the last checkpoint: the steps that the resumed
  run trains again.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    """Opens the writers; records after ``start_step`` (left by a run that crashed after its last
    checkpoint, and trained again now) are dropped from ``metrics.jsonl`` and purged in TensorBoard."""
    self.enabled = enabled
    if enabled:
      self._workdir = epath.Path(workdir)
      self._staging = tempfile.mkdtemp(prefix="ddim_jax_metrics_") if object_store.is_remote(workdir) else None
      self._synced = {}  # staged file -> size last copied up
      self.local_dir = self._staging or os.fspath(workdir)
      local_jsonl = pathlib.Path(self.local_dir, "metrics.jsonl")
      remote_jsonl = self._workdir / "metrics.jsonl"
      if self._staging and remote_jsonl.exists():  # a resumed run keeps the earlier records
        local_jsonl.write_bytes(remote_jsonl.read_bytes())
      if local_jsonl.exists():
        _truncate_records(local_jsonl, start_step)
      self._jsonl = open(local_jsonl, "a", encoding="utf-8")
      # purge_step: TensorBoard hides the points of earlier event files at steps >= it.
      self._tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"), purge_step=int(start_step) + 1)

  def write(self, step: int, metrics: dict) -> None:
    """Appends one record {step, **metrics}; TensorBoard tags ``train/<name>``, KID as ``val/kid``."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(TENSORBOARD_TAGS.get(name, f"train/{name}"), float(value), int(step))

  def write_image(self, tag: str, step: int, image: np.ndarray) -> None:
    """A (H, W, 3) uint8 image (a sample grid) to TensorBoard's images tab."""
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def write_hparams(self, config) -> None:
    """The config's scalar keys to TensorBoard's HParams tab, and the whole config as text."""
    if not self.enabled:
      return
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
            for k, v in run_record.flatten(json.loads(config.to_json())).items()}
    for summary in tensorboard_hparams(flat, {"train/loss": None, "val/kid": None}):
      self._tb.file_writer.add_summary(summary)
    self._tb.add_text("config", "```\n" + config.to_json(indent=2, sort_keys=True) + "\n```")

  def sync(self) -> None:
    """Copies the staged files that changed up to a bucket workdir (nothing to do for a local one)."""
    if not (self.enabled and self._staging):
      return
    self._jsonl.flush()
    self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    """Copies each staged file whose size changed since its last copy (event files only grow)."""
    for path in sorted(pathlib.Path(self._staging).rglob("*")):
      if path.is_file() and self._synced.get(path) != path.stat().st_size:
        target = self._workdir / path.relative_to(self._staging).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())  # the whole object: a bucket cannot append
        self._synced[path] = path.stat().st_size

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._staging:
        self._upload()
        shutil.rmtree(self._staging, ignore_errors=True)


def write_sample_grid(model, variables, normalizer, config, step: int, path: str, num_images: int | None = None,
                      mesh=None):
  """A PNG grid of EMA samples (same noise every time: the grids of a run are comparable); returns
  the grid (H, W, 3) uint8.

  The images are split over ``mesh`` (the training mesh: every device of every process) when its
  size divides their number, else over this process's devices; process 0 writes the file.
  """
  n = int(num_images or config.sample.num_images)
  size = int(config.model.image_size)
  noise = jax.random.normal(rng.purpose_key(config.seed, rng.SAMPLE_GRID), (n, size, size, int(config.model.channels)))
  mesh = sharded.mesh_for(n, mesh)
  images = sharded.generate(model, sharded.replicate(_to_host(variables), mesh), noise,
                            sharded.replicate(_to_host(normalizer), mesh), steps=int(config.sample.steps),
                            spec=schedules.DiffusionSpec.from_config(config), mesh=mesh)
  grid = grids.make_grid(images, upscale=grids.default_upscale(size))
  if jax.process_index() == 0:
    grids.save_png(grid, path)
  return grid


def _checkpoint_meta(config, normalizer, data_state, step: int) -> dict:
  """The JSON item saved with each checkpoint: config, data position, step, normaliser."""
  return {"config": json.loads(config.to_json()), "data_iterator": data_state, "step": int(step),
          "normalizer": {k: np.asarray(v, np.float32).tolist() for k, v in normalizer.items()}}


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


class ProfileWindow:
  """A ``jax.profiler`` trace of the steps after step A up to step B (``train.profile_steps``).

  The trace (TensorBoard's profile plugin files and a Perfetto ``perfetto_trace.json.gz``) goes to
  ``directory/plugins/profile/<time>/``. Only one process traces (``directory`` None elsewhere).
  """

  def __init__(self, window: tuple[int, int] | None, directory: str | None):
    self.window = window if directory else None
    self.directory = directory
    self.active = False

  def before_call(self, step: int, state) -> None:
    """Starts the trace before the call that runs step A + 1, once the steps before it finished."""
    if self.window and not self.active and self.window[0] <= step < self.window[1]:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after_call(self, step: int, state) -> None:
    """Stops the trace once step B has been dispatched, after it finished."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(state)
      self.close()
      print(f"wrote a profile of steps {self.window[0] + 1}-{step} to {self.directory} (TensorBoard's profile tab, "
            "or perfetto_trace.json.gz at ui.perfetto.dev)")
      self.window = None

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressReport:
  """Training progress: a tqdm bar on a terminal, one plain line per log step otherwise.

  Both count FINISHED steps (the loop dispatches ahead), so rates and ETAs do not jump. A plain
  line is written when stderr is not a terminal (a redirected log, a batch job), where tqdm's
  carriage returns would make one very long line.
  """

  def __init__(self, num_steps: int, start_step: int, enabled: bool = True, interactive: bool | None = None):
    self.num_steps, self.start_step, self.enabled = num_steps, start_step, enabled
    self.interactive = sys.stderr.isatty() if interactive is None else interactive
    self.done = start_step
    self._start = time.time()
    self._first = None  # (time, step) of the first log line
    self._bar = tqdm(total=num_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
                     disable=not (enabled and self.interactive))

  def finished(self, step: int) -> None:
    """Every step up to ``step`` has finished on the devices."""
    if step > self.done:
      self._bar.update(step - self.done)
      self.done = step

  def log(self, step: int, metrics: dict) -> None:
    """A log step's metrics: the bar's postfix, or one printed line."""
    if not self.enabled:
      return
    if self.interactive:
      self._bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{metrics['images_per_second']:.0f}")
      return
    now = time.time()
    elapsed = now - self._start
    # The rate since the first log step: the time before it includes compilation.
    first_time, first_step = self._first or (self._start, self.start_step)
    self._first = self._first or (now, step)
    rate = (step - first_step) / max(now - first_time, 1e-9)
    eta = (self.num_steps - step) / rate if rate > 0 else 0.0
    extra = "".join(f" {k} {float(metrics[k]):.5f}" for k in ("val_kid",) if k in metrics)
    print(f"step {step}/{self.num_steps} loss {float(metrics['loss']):.4f}{extra} "
          f"{metrics['images_per_second']:.0f} img/s elapsed {_duration(elapsed)} eta {_duration(eta)}", flush=True)

  def close(self) -> None:
    self._bar.close()


def _calls(plan: feed_lib.CallPlan, step: int) -> str:
  """"8 steps per call (+ 120 single-step calls at events)" for the start banner."""
  k = plan.steps_per_call
  if k == 1:
    return "1 step per call"
  single = plan.single_steps(step)
  return f"{k} steps per call" + (f" (+ {single:,} single-step calls, at events that K does not divide)"
                                  if single else "")


def start_banner(config, workdir: str, config_source: str | None, step: int, state, train_iter, val_images,
                 kid_every: int, input_description: str = "") -> str:
  """The one-screen summary printed when training starts."""
  devices = jax.devices()
  t = config.train
  num_params = models.count_parameters(_to_host(state.params))
  per_device = int(t.batch_size) // len(devices)
  lines = [
      f"ddim-jax train: {config_source or 'a config'} -> {workdir}",
      f"  devices    {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), {jax.process_count()} "
      f"process(es), {jax.local_device_count()} on this one",
      f"  model      {config.model.variant} U-Net, widths {tuple(config.model.widths)}, depth "
      f"{config.model.block_depth}, {config.model.image_size}x{config.model.image_size}x{config.model.channels}, "
      f"{num_params:,} parameters, {config.model.dtype}",
      f"  data       {config.data.dataset}: {len(train_iter.images):,} training images"
      f"{f' (each {train_iter.repetitions}x per epoch)' if train_iter.repetitions > 1 else ''}, "
      f"{len(val_images):,} validation images",
      *([f"  input      {input_description}"] if input_description else []),
      f"  batch      {t.batch_size} global = {per_device} per device, {_calls(call_plan(config, kid_every), step)}",
      f"  steps      {'from step ' + str(step) if step else 'from scratch'} to {t.num_steps}; checkpoint every "
      f"{t.checkpoint_every}, log every {t.log_every}, sample grids "
      f"{'every ' + str(t.sample_every) if t.sample_every else 'off'}, KID "
      f"{'every ' + str(kid_every) if kid_every else 'off'}",
      f"  workdir    {workdir}: {run_record.CONFIG_FILE}, {run_record.RUNS_FILE}, metrics.jsonl, tensorboard/, "
      "checkpoints/, samples/",
  ]
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str, *, distributed: bool | None = None, progress: bool = True,
                       config_source: str | None = None) -> step_lib.TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

  Writes ``config.json`` and ``runs.jsonl`` (``run_record``), ``checkpoints/`` (orbax: state,
  normaliser, config, data-iterator position), ``metrics.jsonl``, ``tensorboard/`` (scalars, sample
  grids, hyper-parameters), ``samples/step_<n>.png`` (EMA samples) and, with
  ``train.profile_steps``, ``profile/``. A SIGTERM (or a preemption notice) finishes the current
  step, saves a checkpoint and returns. A non-finite loss or state raises ``NonFiniteLossError``;
  the last good checkpoint is kept. Resuming with an incompatible config raises
  ``errors.ConfigError`` before anything is loaded. One trainer per workdir: while another live
  trainer holds ``train.lock`` this raises ``workdir.WorkdirLockedError`` naming it; a full disk
  raises ``workdir.DiskFullError`` naming the device and the last good checkpoint.

  Args:
    config: the run's ConfigDict.
    workdir: a local folder or a bucket path (gs://, s3://).
    distributed: see ``parallel.initialize_distributed``.
    progress: a progress bar on a terminal, plain log lines otherwise (False: neither).
    config_source: where the config came from (the preset or file and the overrides), for the
      banner and ``runs.jsonl``.

  Returns:
    The final TrainState (replicated over the devices).
  """
  parallel.configure_cpu_devices(config.get("cpu_devices", 1), int(config.train.batch_size))
  parallel.initialize_distributed(distributed)
  validate_config(config, jax.device_count())
  workdir = workdir_lib.check_location(workdir)
  workdir_lib.ensure_writable(workdir)
  # One trainer per workdir: a second one is refused here, before it reads or writes anything else.
  lock = workdir_lib.lock_for_training(workdir)
  progress_at = {"step": None}  # the loop's step, for the message of a full disk
  disk_full_filter = workdir_lib.DiskFullLogFilter()
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  for logger in loggers:  # orbax's writer threads log each failed write of a full disk with a traceback
    logger.addFilter(disk_full_filter)
  try:
    return _train_locked(config, workdir, progress, config_source, progress_at)
  except Exception as e:
    if workdir_lib.is_disk_full(e):
      workdir_lib.quiet_closed_loop_reports()
      # Composed now, after the pending save finished: the last good checkpoint may be newer than at the raise.
      raise workdir_lib.disk_full_error(workdir, progress_at["step"], getattr(e, "needed", None)) from e
    raise
  finally:
    for logger in loggers:
      logger.removeFilter(disk_full_filter)
    if lock is not None:
      lock.release()


def _close_all(closers, failing: bool) -> None:
  """Runs every closer; while an error propagates, a closer's own error is logged, not raised, so that
  it cannot hide the first (a full disk: ``writer.close`` failed again and hid the ENOSPC)."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001
      if failing:
        if not workdir_lib.is_disk_full(e):  # a full disk is reported once, by the caller
          logging.getLogger(__name__).warning("while stopping after an error: %s: %s", type(e).__name__,
                                              str(e)[:300])
      elif first is None:
        first = e
  if first is not None:
    raise first


def call_plan(config, kid_every: int | None = None) -> feed_lib.CallPlan:
  """The training loop's calls: ``train.steps_per_call`` steps each, single steps where an event would be passed over.

  ``kid_every``: the KID interval in force (0 when KID is off for want of weights); the config's by default.
  """
  t = config.train
  kid_every = int(t.get("kid_every", 0) or 0) if kid_every is None else kid_every
  window = parse_profile_steps(t.get("profile_steps", "")) or ()
  return feed_lib.CallPlan(int(t.get("steps_per_call", 1)), int(t.num_steps),
                           (int(t.log_every), int(t.checkpoint_every), int(t.sample_every), kid_every), tuple(window))


def _train_locked(config, workdir: str, progress: bool, config_source: str | None, progress_at: dict):
  """``train_and_evaluate`` once the workdir is checked and locked."""
  is_main = jax.process_index() == 0
  # A workdir of another config is refused before anything is prepared, compiled or restored.
  changes = check_resume_config(config, workdir)
  mesh = parallel.create_mesh()
  step_config = step_lib.StepConfig.from_config(config)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  eval_model = models.create_model(**config.model)
  image_size = int(config.model.image_size)

  # Data (this process's slice of every global batch) and the normaliser of the training split. The
  # cache (and a TFDS download, with data.download) is prepared once: process 0 first, then the others.
  entry = parallel.process_zero_first(lambda: data.prepare_cache(config.data, image_size), "the data cache")
  if entry.built:
    who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(f"{who}prepared the data cache {entry.path} ({entry.meta['seconds']:.1f} s)")
  train_iter, val_images, normalizer = data.create_datasets(config, image_size, jax.process_index(),
                                                            jax.process_count())

  # KID on the validation split (None when off or without Inception weights: one warning then).
  kid_fn = evaluation.make_training_kid(config, eval_model, val_images, mesh)
  kid_every = int(config.train.get("kid_every", 0) or 0) if kid_fn is not None else 0

  # State: the newest checkpoint that restores, or a fresh init.
  init_key = rng.purpose_key(config.seed, rng.INIT)
  ckpt = checkpointing.Checkpointer(epath.Path(workdir) / "checkpoints",
                                    max_to_keep=int(config.train.get("keep_checkpoints", 3)),
                                    best_metric="val_kid" if kid_fn is not None else None, best_mode="min")
  if jax.process_count() == 1:  # several processes: JAX's preemption service owns SIGTERM
    preemption.install_sigterm_handler()  # sets the flag that ckpt.reached_preemption reads
  restored = ckpt.restore_latest(step_lib.abstract_train_state(model, step_config, image_size, init_key,
                                                       parallel.replicated(mesh)))
  if restored is not None:
    step, state, meta = restored
    train_iter.set_state(meta["data_iterator"])
    normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
    if is_main:
      print(f"resuming from step {step} ({workdir}/checkpoints)")
      if changes:
        print(f"config changed since the checkpoint (recorded in {run_record.RUNS_FILE}): "
              f"{run_record.format_changes(changes)}")
  else:
    step = 0
    state = parallel.replicate(jax.jit(step_lib.create_train_state, static_argnums=(0, 1, 3))(
        model, step_config, init_key, image_size), mesh)
  # Written once the first training call has finished: a start that fails before (compilation, a
  # NaN, a full disk) leaves no record of a run.
  record = run_record.run_record(config_source, step, changes)
  # The input: the uint8 training set on the devices (indices per step) or uint8 batches uploaded ahead.
  feed = feed_lib.TrainFeed(train_iter, mesh, call_plan(config, kid_every), config.train.get("data_placement", "auto"),
                            config.parallel, start_step=step)
  if is_main and progress:
    print(start_banner(config, workdir, config_source, step, state, train_iter, val_images, kid_every,
                       feed.describe()), flush=True)
  normalizer_dev = parallel.replicate(normalizer, mesh)
  base_key = parallel.replicate(jax.random.key_data(rng.purpose_key(config.seed, rng.TRAIN_DRAWS)), mesh)
  train_fn = feed.make_train_fn(lambda k: step_lib.per_device_step(model, step_config, k, parallel.AXIS))
  state_is_finite = jax.jit(step_lib.state_is_finite)
  state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  writer = MetricWriter(workdir, enabled=is_main, start_step=step)
  writer.write_hparams(config)
  num_steps = int(config.train.num_steps)
  report = ProgressReport(num_steps, step, enabled=progress and is_main)
  profile = ProfileWindow(parse_profile_steps(config.train.get("profile_steps", "")),
                          os.path.join(writer.local_dir, "profile") if is_main else None)
  # The logged img/s is the training speed: the time of saves, sample grids and KID is taken out.
  clock = {"timer": time.time(), "logged_step": step}
  batch_size = int(config.train.batch_size)

  def log_metrics(at_step, metrics, kid_now=False) -> dict:
    """Reads a log step's metrics (finished), checks them, adds img/s (and KID), writes and reports them."""
    host_metrics = _to_host(metrics)
    if not all(np.isfinite(v) for v in host_metrics.values()):
      raise NonFiniteLossError(
          f"non-finite loss at step {at_step} ({ {k: float(v) for k, v in host_metrics.items()} }); the last good "
          f"checkpoint (step {ckpt.latest_step()}) is kept in {workdir}/checkpoints. Lower "
          f"train.learning_rate or check the data")
    now = time.time()
    host_metrics["images_per_second"] = batch_size * (at_step - clock["logged_step"]) / max(now - clock["timer"], 1e-9)
    clock["timer"], clock["logged_step"] = now, at_step
    if kid_now:
      host_metrics["val_kid"] = kid_fn(_to_host(state.variables(ema=True)), normalizer)
      clock["timer"] += time.time() - now
    writer.write(at_step, host_metrics)
    report.log(at_step, host_metrics)
    return host_metrics

  in_flight, calls = collections.deque(), 0
  pending = None  # (step, metrics) of a log step, copied to the host while the next call runs
  data_position = train_iter.get_state()
  try:
    while step < num_steps:
      profile.before_call(step, state)
      batch, data_position = feed.next()
      state, metrics = train_fn(state, batch, normalizer_dev, base_key)
      step += feed.steps_of(batch, feed.placement)
      calls += 1
      progress_at["step"] = step
      if pending is not None:  # read one call late: the device already has the next call queued
        log_metrics(*pending)
        pending = None
      if record is not None:  # the run has started: its first call finished
        jax.block_until_ready(metrics)
        run_record.write_run_files(workdir, config, record)
        record = None
      # Bound the dispatched-but-unfinished calls: XLA:CPU runs every device's program on one
      # shared thread pool, and with many calls queued a device blocked in a collective starved
      # the program its peer waited for (2 processes x 2 devices hung at ~step 80 with no bound,
      # ran with 2 or 8). Waiting for the call MAX_CALLS_IN_FLIGHT back is a local wait, not a
      # host sync, and leaves the accelerator a queue. The progress bar counts the calls waited for.
      in_flight.append((step, metrics))
      if len(in_flight) > MAX_CALLS_IN_FLIGHT:
        done_step, done_metrics = in_flight.popleft()
        jax.block_until_ready(done_metrics)
        report.finished(done_step)
      profile.after_call(step, state)
      preempted = ckpt.reached_preemption(calls)
      log_now = step % int(config.train.log_every) == 0 or step == num_steps or preempted
      save_now = step % int(config.train.checkpoint_every) == 0 or step == num_steps or preempted
      # A KID step is also a save step, so that the best-KID checkpoint exists to be kept.
      kid_now = bool(kid_every) and step % kid_every == 0
      save_now = save_now or kid_now
      sample_now = bool(int(config.train.sample_every)) and step % int(config.train.sample_every) == 0
      if log_now and not (save_now or sample_now):
        # A plain log step: start the copy now, read it after the next call is dispatched (no blocking
        # transfer per metric while the device idles).
        for leaf in jax.tree.leaves(metrics):
          leaf.copy_to_host_async()
        pending = (step, metrics)
      elif log_now or save_now:
        jax.block_until_ready(metrics)  # every call dispatched so far has finished on every local device
        in_flight.clear()
        report.finished(step)
        host_metrics = log_metrics(step, metrics, kid_now)
      paused = time.time()
      if save_now:
        # The loss above was computed from the weights before this step's update: check what is saved.
        if not bool(_to_host(state_is_finite(state))):
          raise NonFiniteLossError(
              f"non-finite training state after step {step} (loss {float(host_metrics['loss']):.4g}); the last "
              f"good checkpoint (step {ckpt.latest_step()}) is kept in {workdir}/checkpoints. Lower "
              f"train.learning_rate or check the data")
        # The previous save (and orbax's deletion of old steps) first: orbax would wait for it anyway.
        ckpt.wait_until_finished()
        workdir_lib.check_room_for_checkpoint(workdir, state_bytes, step)
        ckpt.save(step, state, _checkpoint_meta(config, normalizer, data_position, step),
                  metrics={k: float(v) for k, v in host_metrics.items()}, force=preempted)
        writer.sync()
      if sample_now:
        grid = write_sample_grid(eval_model, state.variables(ema=True), normalizer_dev, config, step, mesh=mesh,
                                 path=str(epath.Path(workdir) / "samples" / f"step_{step:07d}.png"))
        writer.write_image("samples", step, grid)
      clock["timer"] += time.time() - paused  # saves and sample grids do not count against the training speed
      if preempted:
        if is_main:
          print(f"preemption notice: saved step {step}, exiting cleanly")
        break
  finally:
    failing = sys.exc_info()[1] is not None
    _close_all([feed.close, profile.close, report.close, writer.close]
               + ([ckpt.abandon] if failing else [ckpt.wait_until_finished, ckpt.close]), failing)
  return state
