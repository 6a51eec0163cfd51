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
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from tensorboardX import SummaryWriter

from ddim_jax import checkpointing, data, evaluation, models, parallel, rng, sampling, schedules, train, visualize


# Training calls dispatched ahead of the one whose results the loop has waited for (see the loop).
MAX_CALLS_IN_FLIGHT = 2


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def validate_config(config, num_devices: int) -> None:
  """Checks the config before anything is compiled; errors name the key and a valid value."""
  t = config.train

  def require(ok, key, value, what):
    if not ok:
      raise ValueError(f"config.{key}={value!r} is invalid: {what}")

  require(int(t.num_steps) > 0, "train.num_steps", t.num_steps, "must be a positive number of steps")
  parallel.check_batch_size(int(t.batch_size), num_devices)
  for key in ("checkpoint_every", "log_every"):
    require(int(t[key]) > 0, f"train.{key}", t[key], "must be a positive number of steps")
  require(int(t.sample_every) >= 0, "train.sample_every", t.sample_every, "must be >= 0 (0: no sample grids)")
  k = int(t.get("steps_per_call", 1))
  require(k >= 1, "train.steps_per_call", k, "must be >= 1")
  require(int(t.get("kid_every", 0) or 0) >= 0, "train.kid_every", t.get("kid_every"), "must be >= 0 (0: no KID)")
  for key in ("checkpoint_every", "log_every", "sample_every", "num_steps", "kid_every"):
    require(int(t.get(key, 0) or 0) % k == 0, f"train.{key}", t.get(key),
            f"must be a multiple of train.steps_per_call={k}")
  require(0.0 <= float(t.ema_decay) < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1)")
  require(float(t.learning_rate) > 0, "train.learning_rate", t.learning_rate, "must be > 0")
  require(float(t.weight_decay) >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  require(t.loss in train.LOSSES, "train.loss", t.loss, f"choose one of {train.LOSSES}")
  require(config.diffusion.target in sampling.TARGETS, "diffusion.target", config.diffusion.target,
          f"choose one of {sampling.TARGETS}")
  require(config.parallel in parallel.PARALLEL_MODES, "parallel", config.parallel,
          f"choose one of {parallel.PARALLEL_MODES}")
  schedules.get_schedule(config.diffusion.schedule, config.diffusion.min_signal_rate,
                         config.diffusion.max_signal_rate)
  models.check_image_size(models.create_model(**config.model), int(config.model.image_size))
  require(int(config.sample.steps) >= 1, "sample.steps", config.sample.steps, "must be >= 1")


def _to_host(tree):
  """Replicated global arrays -> NumPy (the local copy; works on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def _is_remote(path) -> bool:
  """True for a bucket path (``gs://...``, any ``scheme://``), False for a local one."""
  return "://" in os.fspath(path)


class MetricWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard event files in the workdir (process 0 only).

  A local workdir is written directly (one flushed line per record). A bucket workdir is staged:
  objects in a bucket cannot be appended to (gcsfs silently overwrites in mode "a") and
  tensorboardX would bring its own GCS client, so both files are written to a local temporary
  folder and copied up through epath by ``sync`` (at each checkpoint, and at ``close``). A run
  killed between syncs loses the records since the last checkpoint: the steps that the resumed
  run trains again.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._workdir = epath.Path(workdir)
      self._staging = tempfile.mkdtemp(prefix="ddim_jax_metrics_") if _is_remote(workdir) else None
      self._synced = {}  # staged file -> size last copied up
      local = self._staging or os.fspath(workdir)
      remote_jsonl = self._workdir / "metrics.jsonl"
      if self._staging and remote_jsonl.exists():  # a resumed run keeps the earlier records
        pathlib.Path(local, "metrics.jsonl").write_bytes(remote_jsonl.read_bytes())
      self._jsonl = open(os.path.join(local, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(local, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    """Appends one record {step, **metrics}."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f"train/{name}", float(value), int(step))

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
  """A PNG grid of EMA samples (same noise every time: the grids of a run are comparable).

  The images are split over ``mesh`` (the training mesh: every device of every process) when its
  size divides their number, else over this process's devices; process 0 writes the file.
  """
  n = int(num_images or config.sample.num_images)
  size = int(config.model.image_size)
  noise = jax.random.normal(rng.purpose_key(config.seed, rng.SAMPLE_GRID), (n, size, size, int(config.model.channels)))
  mesh = mesh if mesh is not None and n % mesh.size == 0 else parallel.rows_mesh(n)
  out = sampling.generate(model, parallel.replicate(_to_host(variables), mesh), parallel.shard_rows(noise, mesh),
                          parallel.replicate(_to_host(normalizer), mesh), steps=int(config.sample.steps),
                          spec=schedules.DiffusionSpec.from_config(config))
  images = parallel.gather_rows(out["images"])
  if jax.process_index() == 0:
    visualize.save_grid(images, path, upscale=max(1, 64 // size))
  return images


def _checkpoint_meta(config, normalizer, data_state, step: int) -> dict:
  """The JSON item saved with each checkpoint: config, data position, step, normaliser."""
  return {"config": json.loads(config.to_json()), "data_iterator": data_state, "step": int(step),
          "normalizer": {k: np.asarray(v, np.float32).tolist() for k, v in normalizer.items()}}


def train_and_evaluate(config, workdir: str, *, distributed: bool | None = None,
                       progress: bool = True) -> train.TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

  Writes ``checkpoints/`` (orbax: state, normaliser, config, data-iterator position),
  ``metrics.jsonl``, ``tensorboard/`` and ``samples/step_<n>.png`` (EMA samples). A SIGTERM (or
  an orbax preemption notice) finishes the current step, saves a checkpoint and returns. A
  non-finite loss raises ``NonFiniteLossError``; the last good checkpoint is kept.

  Returns:
    The final TrainState (replicated over the devices).
  """
  parallel.configure_cpu_devices(config.get("cpu_devices", 1), int(config.train.batch_size))
  parallel.initialize_distributed(distributed)
  validate_config(config, jax.device_count())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = parallel.create_mesh()
  steps_per_call = int(config.train.get("steps_per_call", 1))
  step_config = train.StepConfig.from_config(config)
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
    checkpointing.install_sigterm_handler()  # sets the flag that ckpt.reached_preemption reads
  restored = ckpt.restore_latest(train.abstract_train_state(model, step_config, image_size, init_key,
                                                       parallel.replicated(mesh)))
  if restored is not None:
    step, state, meta = restored
    train_iter.set_state(meta["data_iterator"])
    normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
    if is_main:
      print(f"resuming from step {step} ({workdir}/checkpoints)")
  else:
    step = 0
    state = parallel.replicate(jax.jit(train.create_train_state, static_argnums=(0, 1, 3))(
        model, step_config, init_key, image_size), mesh)
  normalizer_dev = parallel.replicate(normalizer, mesh)
  base_key = parallel.replicate(jax.random.key_data(rng.purpose_key(config.seed, rng.TRAIN_DRAWS)), mesh)
  train_fn = parallel.make_train_fn(train.per_device_step(model, step_config, steps_per_call, parallel.AXIS),
                                    mesh, config.parallel, steps_per_call)
  writer = MetricWriter(workdir, enabled=is_main)
  num_steps = int(config.train.num_steps)
  bar = tqdm(total=num_steps, initial=step, desc="training", unit="step", disable=not (progress and is_main),
             dynamic_ncols=True)
  timer, logged_step = time.time(), step
  in_flight, calls = collections.deque(), 0
  try:
    while step < num_steps:
      batches = [next(train_iter)["images"] for _ in range(steps_per_call)]
      local = batches[0] if steps_per_call == 1 else np.stack(batches)
      state, metrics = train_fn(state, local, normalizer_dev, base_key)
      # Bound the dispatched-but-unfinished calls: XLA:CPU runs every device's program on one
      # shared thread pool, and with many calls queued a device blocked in a collective starved
      # the program its peer waited for (2 processes x 2 devices hung at ~step 80 with no bound,
      # ran with 2 or 8). Waiting for the call MAX_CALLS_IN_FLIGHT back is a local wait, not a
      # host sync, and leaves the accelerator a queue.
      in_flight.append(metrics)
      if len(in_flight) > MAX_CALLS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      step += steps_per_call
      calls += 1
      bar.update(steps_per_call)
      preempted = ckpt.reached_preemption(calls)
      log_now = step % int(config.train.log_every) == 0 or step == num_steps or preempted
      save_now = step % int(config.train.checkpoint_every) == 0 or step == num_steps or preempted
      # A KID step is also a save step, so that the best-KID checkpoint exists to be kept.
      kid_now = bool(kid_every) and step % kid_every == 0
      save_now = save_now or kid_now
      if log_now or save_now:
        host_metrics = _to_host(metrics)
        if not all(np.isfinite(v) for v in host_metrics.values()):
          raise NonFiniteLossError(
              f"non-finite loss at step {step} ({ {k: float(v) for k, v in host_metrics.items()} }); the last good "
              f"checkpoint (step {ckpt.latest_step()}) is kept in {workdir}/checkpoints. Lower "
              f"train.learning_rate or check the data")
        now = time.time()
        host_metrics["images_per_second"] = int(config.train.batch_size) * (step - logged_step) / max(now - timer, 1e-9)
        timer, logged_step = now, step
        if kid_now:
          host_metrics["val_kid"] = kid_fn(_to_host(state.variables(ema=True)), normalizer)
          timer = time.time()  # the KID time does not count against the training speed
        writer.write(step, host_metrics)
        bar.set_postfix(loss=f"{float(host_metrics['loss']):.4f}", img_s=f"{host_metrics['images_per_second']:.0f}")
      if save_now:
        ckpt.save(step, state, _checkpoint_meta(config, normalizer, train_iter.get_state(), step),
                  metrics={k: float(v) for k, v in host_metrics.items()}, force=preempted)
        writer.sync()
      if int(config.train.sample_every) and step % int(config.train.sample_every) == 0:
        write_sample_grid(eval_model, state.variables(ema=True), normalizer_dev, config, step, mesh=mesh,
                          path=str(epath.Path(workdir) / "samples" / f"step_{step:07d}.png"))
      if preempted:
        if is_main:
          print(f"preemption notice: saved step {step}, exiting cleanly")
        break
  finally:
    bar.close()
    writer.close()
    ckpt.wait_until_finished()
    ckpt.close()
  return state
