"""The training loop: data, the data-parallel step, checkpoints, metrics, sample grids and KID.

``train_and_evaluate`` drives the pure per-device step of ``core/step.py`` through
``parallel.make_train_fn`` (shard_map under jit, or pmap: the loop does not care which), resumes
from the newest checkpoint that restores (``checkpointing.py``), and writes what a run leaves
behind in its workdir: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
``samples/step_<n>.png``. The workdir may be a bucket (``gs://...``): every file goes through
``etils.epath`` (orbax's path layer too). The config checks are in ``validation.py``, the metrics
files, progress report, profiler and banner in ``reporting.py``.
"""

import collections
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np

from ddim_jax import data, errors
from ddim_jax.core import models, rng, schedules, solvers, step as step_lib
from ddim_jax.inference import evaluation, grids, sharded
from ddim_jax.infra import checkpointing, parallel, preemption, run_record
from ddim_jax.infra import workdir as workdir_lib
from ddim_jax.infra import workdir_lock
from ddim_jax.infra.run_dir import RunDir
from ddim_jax.training import feed as feed_lib, init_weights, reporting, validation


# Training calls dispatched ahead of the one whose results the loop has waited for (``_CallsInFlight``).
MAX_CALLS_IN_FLIGHT = 2


class NonFiniteLossError(errors.Error, FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
  exit_status = 3  # the command line's exit status (other expected errors: 2)


def _to_host(tree):
  """Replicated global arrays -> NumPy (the local copy; works on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


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
                            spec=schedules.DiffusionSpec.from_config(config), mesh=mesh,
                            sampler=solvers.Sampler.from_config(config.sample))
  grid = grids.make_grid(images, upscale=grids.default_upscale(size))
  if jax.process_index() == 0:
    grids.save_png(grid, path)
  return grid


def _checkpoint_meta(config, normalizer, data_state, step: int) -> dict:
  """The JSON item saved with each checkpoint: config, data position, step, normaliser."""
  return {"config": json.loads(config.to_json()), "data_iterator": data_state, "step": int(step),
          "normalizer": {k: np.asarray(v, np.float32).tolist() for k, v in normalizer.items()}}


def call_plan(config, kid_every: int | None = None) -> feed_lib.CallPlan:
  """The training loop's calls: ``train.steps_per_call`` steps each, single steps where an event would be passed over.

  ``kid_every``: the KID interval in force (0 when KID is off for want of weights); the config's by default.
  """
  t = config.train
  kid_every = int(t.get("kid_every", 0) or 0) if kid_every is None else kid_every
  window = validation.parse_profile_steps(t.get("profile_steps", "")) or ()
  return feed_lib.CallPlan(int(t.get("steps_per_call", 1)), int(t.num_steps),
                           (int(t.log_every), int(t.checkpoint_every), int(t.sample_every), kid_every), tuple(window))


@dataclasses.dataclass(frozen=True)
class Events:
  """What happens once a call has ended at a step: log its metrics, save, compute KID, write a sample grid."""
  log: bool
  save: bool
  kid: bool
  sample: bool


def events_at(step: int, config, preempted: bool, kid_every: int) -> Events:
  """The events at ``step`` (``kid_every``: the KID interval in force, 0 when off); a preemption logs and saves."""
  t = config.train
  last = step == int(t.num_steps)
  kid = bool(kid_every) and step % kid_every == 0
  # A KID step is also a save step, so that the best-KID checkpoint exists to be kept.
  save = step % int(t.checkpoint_every) == 0 or last or preempted or kid
  return Events(log=step % int(t.log_every) == 0 or last or preempted, save=save, kid=kid,
                sample=bool(int(t.sample_every)) and step % int(t.sample_every) == 0)


@dataclasses.dataclass
class _Run:
  """A run's pieces, built in order by ``_start_run``; the loop carries the state, step and data position."""
  config: Any
  workdir: str
  is_main: bool
  mesh: Any
  eval_model: Any
  normalizer: dict  # host arrays: the training split's, or the checkpoint's
  normalizer_dev: Any
  base_key: Any
  kid_fn: Any  # None when KID is off
  kid_every: int
  ckpt: checkpointing.Checkpointer
  start_step: int
  start_state: step_lib.TrainState
  start_position: dict  # the data iterator's
  record: dict  # the run record, written once the first call has finished
  feed: feed_lib.TrainFeed
  train_fn: Any
  state_is_finite: Any
  state_bytes: int
  writer: reporting.MetricWriter
  lock: workdir_lock.WorkdirLock | None  # checked before each save (one-process runs; see check_still_held)
  report: reporting.ProgressReport
  profile: reporting.ProfileWindow
  clock: reporting.TrainingClock

  def log(self, step: int, metrics, kid_state=None) -> dict:
    """Reads a log step's metrics (finished), checks them, adds img/s (and KID of ``kid_state``), writes them."""
    host_metrics = _to_host(metrics)
    if not all(np.isfinite(v) for v in host_metrics.values()):
      raise NonFiniteLossError(
          f"non-finite loss at step {step} ({ {k: float(v) for k, v in host_metrics.items()} }); the last good "
          f"checkpoint (step {self.ckpt.latest_step()}) is kept in {self.workdir}/checkpoints. Lower "
          f"train.learning_rate or check the data")
    host_metrics["images_per_second"] = self.clock.images_per_second(step)
    if kid_state is not None:
      with self.clock.paused():
        host_metrics.update(self.kid_fn(_to_host(kid_state.variables(ema=True)), self.normalizer))
    self.writer.write(step, host_metrics)
    self.report.log(step, host_metrics)
    return host_metrics

  def save(self, step: int, state, data_position, host_metrics: dict, force: bool) -> None:
    """Checkpoints a finite ``state`` once the disk has room for it; the staged metrics go up with it."""
    # The loss was computed from the weights before this step's update: check what is saved.
    if not bool(_to_host(self.state_is_finite(state))):
      raise NonFiniteLossError(
          f"non-finite training state after step {step} (loss {float(host_metrics['loss']):.4g}); the last "
          f"good checkpoint (step {self.ckpt.latest_step()}) is kept in {self.workdir}/checkpoints. Lower "
          f"train.learning_rate or check the data")
    # The previous save (and orbax's deletion of old steps) first: orbax would wait for it anyway.
    self.ckpt.wait_until_finished()
    workdir_lock.check_still_held(self.lock, step, self.ckpt.latest_step())
    workdir_lib.check_room_for_checkpoint(self.workdir, self.state_bytes, step)
    self.ckpt.save(step, state, _checkpoint_meta(self.config, self.normalizer, data_position, step),
                   metrics={k: float(v) for k, v in host_metrics.items()}, force=force)
    self.writer.sync()

  def sample(self, step: int, state) -> None:
    """``samples/step_<n>.png`` and the TensorBoard image of the EMA weights' grid."""
    grid = write_sample_grid(self.eval_model, state.variables(ema=True), self.normalizer_dev, self.config, step,
                             mesh=self.mesh, path=RunDir(self.workdir).sample_grid(step))
    self.writer.write_image("samples", step, grid)

  def close(self, failing: bool) -> None:
    """Closes every piece; while an error propagates, the pending save is abandoned, not awaited."""
    _close_all([self.feed.close, self.profile.close, self.report.close, self.writer.close]
               + ([self.ckpt.abandon] if failing else [self.ckpt.wait_until_finished, self.ckpt.close]), failing)


def _start_run(config, workdir: str, progress: bool, config_source: str | None,
               lock: workdir_lock.WorkdirLock | None, signals: preemption.StopSignals) -> _Run:
  """Mesh, models, data, KID, the restored or fresh state, the feed, the banner, the step and the outputs.

  ``signals`` are installed once the data are ready: a Ctrl-C before then stops at once (nothing to
  save), one after it saves the step the loop is at.
  """
  is_main = jax.process_index() == 0
  # A workdir of another config is refused before anything is prepared, compiled or restored.
  changes = validation.check_resume_config(config, workdir)
  mesh = parallel.create_mesh()
  step_config = step_lib.StepConfig.from_config(config)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  eval_model = models.create_model(**config.model)
  image_size = int(config.model.image_size)

  # The data cache (and a TFDS download, with data.download) is prepared once: process 0 first, then the others.
  entry = parallel.process_zero_first(lambda: data.prepare_cache(config.data, image_size), "the data cache")
  if entry.built:
    who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(f"{who}prepared the data cache {entry.path} ({entry.meta['seconds']:.1f} s)")
  # This process's slice of every global batch, and the normaliser of the training split.
  train_iter, val_images, normalizer = data.create_datasets(config, image_size, jax.process_index(),
                                                            jax.process_count())

  # KID on the validation split (None when off or without Inception weights: one warning then).
  kid_fn = evaluation.make_training_kid(config, eval_model, val_images, mesh)
  kid_every = int(config.train.get("kid_every", 0) or 0) if kid_fn is not None else 0

  # State: the newest checkpoint that restores, or a fresh init.
  init_key = rng.purpose_key(config.seed, rng.INIT)
  ckpt = checkpointing.Checkpointer(RunDir(workdir).checkpoints,
                                    max_to_keep=int(config.train.get("keep_checkpoints", 3)),
                                    best_metric=checkpointing.BEST_METRIC if kid_fn is not None else None, best_mode="min")
  # They set the flag that ckpt.reached_preemption reads (several processes: JAX's service owns SIGTERM).
  signals.install(multi_process=jax.process_count() > 1)
  restored = ckpt.restore_latest(step_lib.abstract_train_state(model, step_config, image_size, init_key,
                                                               parallel.replicated(mesh)))
  if restored is not None:
    step, state, meta = restored
    train_iter.set_state(meta["data_iterator"])
    normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
    if is_main:
      print(f"resuming from step {step} ({workdir}/checkpoints); --fresh starts over, setting this run aside")
      if changes:
        print(f"config changed since the checkpoint (recorded in {run_record.RUNS_FILE}): "
              f"{run_record.format_changes(changes)}")
  else:
    step = 0
    state = parallel.replicate(init_weights.initial_state(config, model, step_config, init_key, image_size), mesh)
  # Written once the first training call has finished: a start that fails before (compilation, a
  # NaN, a full disk) leaves no record of a run.
  record = run_record.run_record(config_source, step, changes)
  if restored is None and config.train.get("init_weights"):
    record["init_weights"] = str(config.train.init_weights)
  # The input: the uint8 training set on the devices (indices per step) or uint8 batches uploaded ahead.
  plan = call_plan(config, kid_every)
  feed = feed_lib.TrainFeed(train_iter, mesh, plan, config.train.get("data_placement", "auto"), config.parallel,
                            start_step=step)
  if is_main and progress:
    num_params = models.count_parameters(_to_host(state.params))
    print(reporting.start_banner(config, workdir, config_source, step, num_params, train_iter, val_images, kid_every,
                                 plan, feed.describe()), flush=True)
  normalizer_dev = parallel.replicate(normalizer, mesh)
  base_key = parallel.replicate(jax.random.key_data(rng.purpose_key(config.seed, rng.TRAIN_DRAWS)), mesh)
  train_fn = feed.make_train_fn(lambda k: step_lib.per_device_step(model, step_config, k, parallel.AXIS))
  state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  writer = reporting.MetricWriter(workdir, enabled=is_main, start_step=step)
  writer.write_hparams(config)
  report = reporting.ProgressReport(int(config.train.num_steps), step, enabled=progress and is_main)
  profile = reporting.ProfileWindow(validation.parse_profile_steps(config.train.get("profile_steps", "")),
                                    RunDir(writer.local_dir).path(RunDir.PROFILE) if is_main else None)
  return _Run(config=config, workdir=workdir, is_main=is_main, mesh=mesh, eval_model=eval_model, normalizer=normalizer,
              normalizer_dev=normalizer_dev, base_key=base_key, kid_fn=kid_fn, kid_every=kid_every, ckpt=ckpt,
              start_step=step, start_state=state, start_position=train_iter.get_state(), record=record, feed=feed,
              train_fn=train_fn, state_is_finite=jax.jit(step_lib.state_is_finite), state_bytes=state_bytes,
              writer=writer, lock=lock if jax.process_count() == 1 else None, report=report, profile=profile,
              clock=reporting.TrainingClock(step, int(config.train.batch_size)))


class _CallsInFlight:
  """The calls dispatched but not yet waited for; the progress report counts the calls waited for."""

  def __init__(self, report: reporting.ProgressReport):
    self.report, self.calls = report, collections.deque()

  def add(self, step: int, metrics) -> None:
    """Waits for the call MAX_CALLS_IN_FLIGHT back: a local wait, not a host sync, that leaves the device a queue.

    Unbounded, XLA:CPU (every device's program on one thread pool) hung: a device blocked in a
    collective starved the program its peer waited for.
    """
    self.calls.append((step, metrics))
    if len(self.calls) > MAX_CALLS_IN_FLIGHT:
      done_step, done_metrics = self.calls.popleft()
      jax.block_until_ready(done_metrics)
      self.report.finished(done_step)

  def wait_all(self, step: int, metrics) -> None:
    """Waits for the newest call: every call dispatched so far has then finished on every local device."""
    jax.block_until_ready(metrics)
    self.calls.clear()
    self.report.finished(step)


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


@contextlib.contextmanager
def _full_disk_said_once(workdir: str, progress_at: dict):
  """A full disk raises one ``workdir.DiskFullError`` naming the step and the last good checkpoint."""
  disk_full_filter = workdir_lib.DiskFullLogFilter()
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  for logger in loggers:  # orbax's writer threads log each failed write of a full disk with a traceback
    logger.addFilter(disk_full_filter)
  try:
    yield
  except Exception as e:
    if workdir_lib.is_disk_full(e):
      workdir_lib.quiet_closed_loop_reports()
      # Composed now, after the pending save finished: the last good checkpoint may be newer than at the raise.
      raise workdir_lib.disk_full_error(workdir, progress_at["step"], getattr(e, "needed", None)) from e
    raise
  finally:
    for logger in loggers:
      logger.removeFilter(disk_full_filter)


def train_and_evaluate(config, workdir: str, *, distributed: bool | None = None, progress: bool = True,
                       config_source: str | None = None, fresh: bool = False) -> step_lib.TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint (``fresh``: starting over).

  Writes ``config.json`` and ``runs.jsonl`` (``run_record``), ``checkpoints/`` (orbax: state,
  normaliser, config, data-iterator position), ``metrics.jsonl``, ``tensorboard/`` (scalars, sample
  grids, hyper-parameters), ``samples/step_<n>.png`` (EMA samples) and, with
  ``train.profile_steps``, ``profile/``. A SIGTERM (or a preemption notice) finishes the current
  step, saves a checkpoint and returns; a Ctrl-C does the same, then raises ``preemption.Interrupted``
  (a KeyboardInterrupt; a second Ctrl-C raises it at once, without saving). A non-finite loss or
  state raises ``NonFiniteLossError``; the last good checkpoint is kept. Resuming with an incompatible config raises
  ``errors.ConfigError`` before anything is loaded. One trainer per workdir: while another live
  trainer holds ``train.lock`` this raises ``workdir_lock.WorkdirLockedError`` naming it; a full disk
  raises ``workdir.DiskFullError`` naming the device and the last good checkpoint.

  Args:
    config: the run's ConfigDict.
    workdir: a local folder or a bucket path (gs://, s3://).
    distributed: see ``parallel.initialize_distributed``.
    progress: a progress bar on a terminal, plain log lines otherwise (False: neither).
    config_source: where the config came from (the preset or file and the overrides), for the
      banner and ``runs.jsonl``.
    fresh: start at step 0: what the workdir holds moves to ``previous/<UTC time>/`` first
      (``workdir.set_aside_run``), under the lock, so nothing is lost.

  Returns:
    The final TrainState (replicated over the devices).
  """
  parallel.configure_cpu_devices(config.get("cpu_devices", 1), int(config.train.batch_size))
  parallel.initialize_distributed(distributed)
  parallel.start_backend()  # a JAX_PLATFORMS that does not start here: one error naming it
  validation.validate_config(config, jax.device_count())
  workdir = workdir_lib.check_location(workdir)
  workdir_lib.ensure_writable(workdir)
  # A link, a FIFO or a device at one of the workdir's names is refused before anything is written.
  RunDir(workdir).check_layout()
  # One trainer per workdir: a second one is refused here, before it reads or writes anything else.
  lock = workdir_lock.lock_for_training(workdir)
  progress_at = {"step": None}  # the loop's step, for the message of a full disk
  try:
    _set_aside_previous_run(workdir, fresh)
    with _full_disk_said_once(workdir, progress_at):
      return _train_locked(config, workdir, progress, config_source, progress_at, lock)
  finally:
    if lock is not None:
      lock.release()


def _set_aside_previous_run(workdir: str, fresh: bool) -> None:
  """Process 0, holding the lock, finishes a ``--fresh`` that a crash interrupted (its journal says
  what was being moved: the old run is never resumed half moved), then with ``fresh`` moves the
  workdir's run to ``previous/<UTC time>/``; the other processes wait for it."""
  def set_aside():
    if jax.process_index() != 0:
      return None, None
    run_dir = RunDir(workdir)
    finished = run_dir.finish_set_aside()
    return finished, run_dir.set_aside() if fresh else None
  finished, moved = parallel.process_zero_first(set_aside, "setting the previous run aside")
  if finished is not None:
    print(f"finished setting aside the run of an interrupted `train --fresh`: it is in {finished}")
  if moved is not None:
    print(f"starting fresh: the previous run in {workdir} moved to {moved}")


def _train_locked(config, workdir: str, progress: bool, config_source: str | None, progress_at: dict,
                  lock: workdir_lock.WorkdirLock | None):
  """``train_and_evaluate`` once the workdir is checked and locked: the loop, with SIGTERM and Ctrl-C handled.

  A Ctrl-C raises ``preemption.Interrupted`` once the run is closed: after the save of the step the
  loop was at, or, after a second Ctrl-C, at once, keeping the checkpoints saved before.
  """
  with preemption.StopSignals() as signals:
    try:
      state, step = _train_loop(config, workdir, progress, config_source, progress_at, lock, signals)
    except preemption.Interrupted:
      raise
    except KeyboardInterrupt as e:
      raise preemption.Interrupted(_stopped_at_once(workdir, progress_at["step"])) from e
  if signals.interrupted:  # after the handlers are back: the command exits 130, not 0
    raise preemption.Interrupted(f"saved step {step} in {workdir}/checkpoints; the same command resumes from it")
  return state


def _stopped_at_once(workdir: str, step: int | None) -> str:
  """The message of a run stopped without a save (a second Ctrl-C, or one before the loop)."""
  where = "before the first training step" if step is None else f"at step {step} without saving it"
  return f"stopped {where}; the checkpoints saved before are kept in {workdir}/checkpoints"


def _train_loop(config, workdir: str, progress: bool, config_source: str | None, progress_at: dict,
                lock: workdir_lock.WorkdirLock | None, signals: preemption.StopSignals):
  """The loop over the training calls; returns the final state and step."""
  run = _start_run(config, workdir, progress, config_source, lock, signals)
  state, step, data_position, record = run.start_state, run.start_step, run.start_position, run.record
  calls, in_flight = 0, _CallsInFlight(run.report)
  pending = None  # (step, metrics) of a log step, copied to the host while the next call runs
  try:
    while step < int(config.train.num_steps):
      run.profile.before_call(step, state)
      batch, data_position = run.feed.next()
      state, metrics = run.train_fn(state, batch, run.normalizer_dev, run.base_key)
      step += run.feed.steps_of(batch, run.feed.placement)
      calls += 1
      progress_at["step"] = step
      if pending is not None:  # read one call late: the device already has the next call queued
        run.log(*pending)
        pending = None
      if record is not None:  # the run has started: its first call finished
        jax.block_until_ready(metrics)
        run_record.write_run_files(workdir, config, record)
        record = None
      in_flight.add(step, metrics)
      run.profile.after_call(step, state)
      preempted = run.ckpt.reached_preemption(calls)  # a sync point of every process: counted in calls
      due = events_at(step, config, preempted, run.kid_every)
      if due.log and not (due.save or due.sample):
        # A plain log step: no blocking transfer while the device idles; read after the next call is dispatched.
        for leaf in jax.tree.leaves(metrics):
          leaf.copy_to_host_async()
        pending = (step, metrics)
      elif due.log or due.save:
        in_flight.wait_all(step, metrics)
        host_metrics = run.log(step, metrics, kid_state=state if due.kid else None)
      with run.clock.paused():  # saves and sample grids do not count against the training speed
        if due.save:
          run.save(step, state, data_position, host_metrics, force=preempted)
        if due.sample:
          run.sample(step, state)
      if preempted:
        if run.is_main and not signals.interrupted:  # a Ctrl-C says so in its Interrupted error
          print(f"preemption notice: saved step {step}, exiting cleanly")
        break
  finally:
    run.close(failing=sys.exc_info()[1] is not None)
  return state, step
