"""What a run reports while it trains: metrics files, the progress report, the profiler, the start banner.

``MetricWriter`` writes ``metrics.jsonl`` and TensorBoard events (staged for a bucket workdir),
``ProgressReport`` the tqdm bar or plain log lines, ``ProfileWindow`` a ``jax.profiler`` trace of
``train.profile_steps``, ``TrainingClock`` the logged img/s; ``start_banner`` the one-screen summary.
"""

import contextlib
import json
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



def _import_tensorboardx():
  """tensorboardX, imported with torch hidden unless torch is already loaded: its writer imports
  torch only to accept torch tensors (this package hands it NumPy), and that import was 1.3 s to 6 s
  of every `ddim-jax train` start. A hidden module makes ``import torch`` raise ImportError, which
  tensorboardX expects when torch is not installed."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    import tensorboardX.summary  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    import tensorboardX.summary  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return tensorboardX


_tensorboardx = _import_tensorboardx()
SummaryWriter = _tensorboardx.SummaryWriter
tensorboard_hparams = _tensorboardx.summary.hparams

from ddim_jax import files
from ddim_jax.infra import object_store, run_record
from ddim_jax.infra.run_dir import RunDir
from ddim_jax.training import feed as feed_lib


# Validation metrics are val_<name> (val_kid = checkpointing.BEST_METRIC, val_fid = evaluation.FID_METRIC,
# the standard FID; FID at other settings val_fid_torchvision_75px, ...): TensorBoard tag val/<name>;
# the rest are training metrics, train/<name>.
VALIDATION_PREFIX = "val_"


def tensorboard_tag(name: str) -> str:
  """The TensorBoard tag of a metric: ``val_kid`` -> ``val/kid``, ``val_fid`` -> ``val/fid``, ``loss`` -> ``train/loss``."""
  if name.startswith(VALIDATION_PREFIX):
    return "val/" + name[len(VALIDATION_PREFIX):]
  return f"train/{name}"


def _record_step(line: str) -> int | None:
  """The "step" of one JSON line of metrics.jsonl; None for a line that does not parse."""
  try:
    record = json.loads(line)
    return int(record["step"]) if isinstance(record, dict) else None
  except (ValueError, KeyError, TypeError):
    return None


# metrics.jsonl is read whole on resume: a run logging every step for millions of steps stays under this.
METRICS_READ_CAP = 1 << 30


def _truncate_records(path: str, last_step: int) -> None:
  """Keeps the records of ``path`` (JSON lines with a "step") up to ``last_step``; atomic rewrite.

  A line that does not parse (a crash or a full disk mid-write leaves a partial last line) is
  dropped with a warning instead of making every resume fail.
  """
  lines = files.read_text(path, "the workdir's", follow=False, max_bytes=METRICS_READ_CAP).splitlines(keepends=True)
  steps = [_record_step(line) if line.strip() else None for line in lines]
  bad = [i + 1 for i, (line, step) in enumerate(zip(lines, steps)) if line.strip() and step is None]
  if bad:
    warnings.warn(f"{path}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
                  f"{' ...' if len(bad) > 5 else ''} of {len(lines)}; a run stopped mid-write)", stacklevel=2)
  kept = [line if line.endswith("\n") else line + "\n"
          for line, step in zip(lines, steps) if step is not None and step <= last_step]
  if kept != lines:
    files.replace_text(path, "".join(kept), "the workdir's")


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
      local = RunDir(self.local_dir)
      remote_jsonl = epath.Path(RunDir(workdir).metrics)
      if self._staging and remote_jsonl.exists():  # a resumed run keeps the earlier records
        files.replace_file(local.metrics, remote_jsonl.read_bytes())
      if files.lstat_or_none(local.metrics) is not None:
        _truncate_records(local.metrics, start_step)
      self._jsonl = files.RecordFile(local.metrics, "the workdir's")
      # purge_step: TensorBoard hides the points of earlier event files at steps >= it.
      self._tb = SummaryWriter(local.folder(RunDir.TENSORBOARD), purge_step=int(start_step) + 1)

  def write(self, step: int, metrics: dict) -> None:
    """Appends one record {step, **metrics}; TensorBoard tags ``train/<name>``, ``val_<name>`` as ``val/<name>``."""
    if not self.enabled:
      return
    self._jsonl.append(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    for name, value in metrics.items():
      self._tb.add_scalar(tensorboard_tag(name), float(value), int(step))

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
    extra = "".join(f" {k} {float(v):.5f}" for k, v in metrics.items() if k.startswith(VALIDATION_PREFIX))
    print(f"step {step}/{self.num_steps} loss {float(metrics['loss']):.4f}{extra} "
          f"{metrics['images_per_second']:.0f} img/s elapsed {_duration(elapsed)} eta {_duration(eta)}", flush=True)

  def close(self) -> None:
    self._bar.close()


class TrainingClock:
  """The logged img/s is the training speed: the time of saves, sample grids and KID is taken out."""

  def __init__(self, start_step: int, batch_size: int):
    self.timer, self.logged_step, self.batch_size = time.time(), start_step, batch_size

  def images_per_second(self, step: int) -> float:
    """Since the previous log step (or the start), less the paused time; restarts the count at ``step``."""
    now = time.time()
    rate = self.batch_size * (step - self.logged_step) / max(now - self.timer, 1e-9)
    self.timer, self.logged_step = now, step
    return rate

  @contextlib.contextmanager
  def paused(self):
    """The time spent in the ``with`` block does not count against the training speed."""
    start = time.time()
    yield
    self.timer += time.time() - start


def _calls(plan: feed_lib.CallPlan, step: int) -> str:
  """"8 steps per call (+ 120 single-step calls at events)" for the start banner."""
  k = plan.steps_per_call
  if k == 1:
    return "1 step per call"
  single = plan.single_steps(step)
  return f"{k} steps per call" + (f" (+ {single:,} single-step calls, at events that K does not divide)"
                                  if single else "")


def start_banner(config, workdir: str, config_source: str | None, step: int, num_params: int, train_iter, val_images,
                 kid_every: int, plan: feed_lib.CallPlan, input_description: str = "") -> str:
  """The one-screen summary printed when training starts; ``plan``: the loop's calls (``trainer.call_plan``)."""
  devices = jax.devices()
  t = config.train
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
      f"  batch      {t.batch_size} global = {per_device} per device, {_calls(plan, step)}",
      f"  steps      {'from step ' + str(step) if step else 'from scratch'} to {t.num_steps}; checkpoint every "
      f"{t.checkpoint_every}, log every {t.log_every}, sample grids "
      f"{'every ' + str(t.sample_every) if t.sample_every else 'off'}, KID "
      f"{'every ' + str(kid_every) if kid_every else 'off'}",
      f"  workdir    {workdir}: {run_record.CONFIG_FILE}, {run_record.RUNS_FILE}, metrics.jsonl, tensorboard/, "
      "checkpoints/, samples/",
  ]
  return "\n".join(lines)
