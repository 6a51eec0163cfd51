"""Training: the TrainState pytree, the loss, AdamW + EMA, and the per-device training step.

The per-device step (``train_step``) is written with named-axis collectives over ``axis_name``
("data"): gradients and metrics are ``pmean``-ed and BatchNorm statistics are synchronised inside
the model, so the step computes global-batch BatchNorm and the gradient of the global mean loss
whatever the number of devices. ``parallel.py`` launches it (shard_map under jit, or pmap); the
loop that drives it is ``train_and_evaluate`` in ``trainer.py``. The twin is
``ddim_torch_ref/train.py``.

Per-example randomness (diffusion time and noise) comes from
``fold_in(fold_in(base_key, step), global_example_index)``: never from the device index, so the
same global batch gives the same draws on 1, 2 or 4 devices, and a resumed run the same keys.
"""

import dataclasses
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddim_jax import models, sampling, schedules

LOSSES = ("mae", "mse")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole)."""
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any

  def variables(self, ema: bool = True) -> dict:
    """{'params', 'batch_stats'} of the EMA (default) or the raw weights, for ``model.apply``."""
    if ema:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The hyper-parameters the step closes over (hashable: a static argument of jit)."""
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  ema_decay: float = 0.999
  ema_warmup: bool = False
  loss: str = "mae"
  target: str = "noise"
  schedule: str = "cosine"
  min_signal_rate: float = schedules.MIN_SIGNAL_RATE
  max_signal_rate: float = schedules.MAX_SIGNAL_RATE

  @classmethod
  def from_config(cls, config) -> "StepConfig":
    """Reads ``config.train`` and ``config.diffusion``."""
    return cls(learning_rate=float(config.train.learning_rate), weight_decay=float(config.train.weight_decay),
               ema_decay=float(config.train.ema_decay), ema_warmup=bool(config.train.get("ema_warmup", False)),
               loss=config.train.loss, target=config.diffusion.target, schedule=config.diffusion.schedule,
               min_signal_rate=float(config.diffusion.min_signal_rate),
               max_signal_rate=float(config.diffusion.max_signal_rate))


def make_optimizer(step_config: StepConfig) -> optax.GradientTransformation:
  """AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay on every parameter), no schedule."""
  return optax.adamw(step_config.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=step_config.weight_decay)


def create_train_state(model, step_config: StepConfig, key, image_size: int) -> TrainState:
  """Initial state: fresh weights, AdamW state, and an EMA that starts as a COPY of the weights.

  (Keras' ``clone_model`` gives its EMA network an independent random init; we do not copy that.)
  """
  variables = models.init_variables(model, key, image_size)
  params, batch_stats = variables["params"], variables["batch_stats"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=make_optimizer(step_config).init(params), ema_params=params,
                    ema_batch_stats=batch_stats)


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay of optimiser step ``step`` (0-based): constant, or min(decay, (1+n)/(10+n)).

  The warm-up (score_sde's PyTorch EMA) lets a short run's EMA leave its initial weights; with a
  constant 0.999, 59% of the EMA is still the initial weights after 500 steps.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = (step + 1).astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def draw_noises_and_times(base_key, step, global_indices, image_shape):
  """Per-example noise (N(0, 1), ``image_shape``) and diffusion time (U[0, 1)) from folded keys.

  Args:
    base_key: the run's PRNG key.
    step: the optimiser step (int32 scalar).
    global_indices: (b,) int32 positions of this shard's examples in the global batch.
    image_shape: (H, W, C).

  Returns:
    (noises (b, H, W, C), diffusion_times (b, 1, 1, 1)).
  """
  step_key = jax.random.fold_in(base_key, step)

  def one(index):
    noise_key, time_key = jax.random.split(jax.random.fold_in(step_key, index))
    return jax.random.normal(noise_key, image_shape), jax.random.uniform(time_key, (1, 1, 1))

  return jax.vmap(one)(global_indices)


def compute_loss(params, batch_stats, model, images, noises, noise_rates, signal_rates, loss: str = "mae",
                 target: str = "noise"):
  """The Keras training loss on normalised ``images`` at the given rates (BatchNorm in train mode).

  Returns:
    (loss, (metrics, new_batch_stats)); metrics has 'loss', 'noise_loss' and 'image_loss' (MAE),
    each a mean over this shard's elements.
  """
  noisy_images = signal_rates * images + noise_rates * noises
  output, updates = model.apply({"params": params, "batch_stats": batch_stats}, noisy_images,
                                sampling.network_variances(noise_rates, signal_rates, target), train=True,
                                mutable=["batch_stats"])
  pred_noises, pred_images = sampling.denoise(output, noisy_images, noise_rates, signal_rates, target)
  prediction, truth = (pred_noises, noises) if target == "noise" else (pred_images, images)
  if loss == "mae":
    value = jnp.mean(jnp.abs(prediction - truth))
  elif loss == "mse":
    value = jnp.mean(jnp.square(prediction - truth))
  else:
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
  metrics = {"loss": value, "noise_loss": jnp.mean(jnp.abs(pred_noises - noises)),
             "image_loss": jnp.mean(jnp.abs(pred_images - images))}
  return value, (metrics, updates["batch_stats"])


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def train_step_from_draws(state: TrainState, images, noises, noise_rates, signal_rates, *, model,
                          step_config: StepConfig, axis_name: str | None = "data"):
  """One AdamW + EMA step given every random quantity (the parity tests feed the torch twin's).

  Args:
    state: the TrainState (replicated).
    images: (b, H, W, C) normalised images of this shard.
    noises: (b, H, W, C) standard normal draws.
    noise_rates, signal_rates: (b, 1, 1, 1) rates of the examples' diffusion times.
    model: the UNet, built with ``bn_axis_name=axis_name`` for synchronised BatchNorm.
    step_config: hyper-parameters.
    axis_name: the data-parallel axis, or None on a single device without collectives.

  Returns:
    (new_state, metrics) with metrics averaged over the global batch.
  """
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, (metrics, new_batch_stats)), grads = grad_fn(state.params, state.batch_stats, model, images, noises,
                                                   noise_rates, signal_rates, step_config.loss, step_config.target)
  grads, metrics = _pmean(grads, axis_name), _pmean(metrics, axis_name)
  # BatchNorm already averaged the batch statistics over the axis; the pmean only guards
  # against float drift between devices.
  new_batch_stats = _pmean(new_batch_stats, axis_name)
  updates, opt_state = make_optimizer(step_config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, step_config.ema_decay, step_config.ema_warmup)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
  ema_batch_stats = optax.incremental_update(new_batch_stats, state.ema_batch_stats, 1.0 - decay)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state,
                            ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def train_step(state: TrainState, images, normalizer, base_key, *, model, step_config: StepConfig,
               axis_name: str | None = "data"):
  """The per-device training step: normalise, draw noise and times, one AdamW + EMA step.

  Args:
    state: the TrainState (replicated).
    images: (b, H, W, C) float32 images in [0, 1], this device's shard of the global batch.
    normalizer: {'mean', 'variance'} per-channel data statistics.
    base_key: the run's PRNG key (replicated).
    model, step_config, axis_name: see ``train_step_from_draws``.

  Returns:
    (new_state, metrics).
  """
  if not jnp.issubdtype(base_key.dtype, jax.dtypes.prng_key):
    base_key = jax.random.wrap_key_data(base_key)  # raw uint32 key data travels through pmap/shard_map
  local_batch = images.shape[0]
  shard_index = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  global_indices = shard_index * local_batch + jnp.arange(local_batch, dtype=jnp.int32)
  noises, times = draw_noises_and_times(base_key, state.step, global_indices, images.shape[1:])
  schedule_fn = schedules.get_schedule(step_config.schedule, step_config.min_signal_rate, step_config.max_signal_rate)
  noise_rates, signal_rates = schedule_fn(times)
  return train_step_from_draws(state, sampling.normalize(images, normalizer), noises, noise_rates, signal_rates,
                               model=model, step_config=step_config, axis_name=axis_name)


def train_steps(state: TrainState, images, normalizer, base_key, *, model, step_config: StepConfig,
                axis_name: str | None = "data"):
  """``train_step`` over a leading axis of K batches with ``lax.scan`` (K optimiser steps per call).

  Returns:
    (new_state, metrics of the last step).
  """
  def body(carry, batch):
    return train_step(carry, batch, normalizer, base_key, model=model, step_config=step_config,
                      axis_name=axis_name)

  state, metrics = jax.lax.scan(body, state, images)
  return state, jax.tree.map(lambda m: m[-1], metrics)


# ------------------------------------------------------------------------------------------------
# The training loop.


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def validate_config(config, num_devices: int) -> None:
  """Checks the config before anything is compiled; errors name the key and a valid value."""
  from ddim_jax import models as _models, parallel  # pylint: disable=import-outside-toplevel
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
    require(int(t.get(key, 0) or 0) % k == 0, f"train.{key}", t.get(key), f"must be a multiple of train.steps_per_call={k}")
  require(0.0 <= float(t.ema_decay) < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1)")
  require(float(t.learning_rate) > 0, "train.learning_rate", t.learning_rate, "must be > 0")
  require(float(t.weight_decay) >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  require(t.loss in LOSSES, "train.loss", t.loss, f"choose one of {LOSSES}")
  require(config.diffusion.target in sampling.TARGETS, "diffusion.target", config.diffusion.target,
          f"choose one of {sampling.TARGETS}")
  require(config.parallel in parallel.PARALLEL_MODES, "parallel", config.parallel,
          f"choose one of {parallel.PARALLEL_MODES}")
  schedules.get_schedule(config.diffusion.schedule, config.diffusion.min_signal_rate,
                         config.diffusion.max_signal_rate)
  _models.check_image_size(_models.create_model(**config.model), int(config.model.image_size))
  require(int(config.sample.steps) >= 1, "sample.steps", config.sample.steps, "must be >= 1")


def _to_host(tree):
  """Replicated global arrays -> NumPy (the local copy; works on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


class MetricWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard event files in the workdir (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are optional; the JSONL file is not
        self._tb = None

  def write(self, step: int, metrics: dict) -> None:
    """Appends one record {step, **metrics}."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"train/{name}", float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def write_sample_grid(model, variables, normalizer, config, step: int, path: str, num_images: int | None = None):
  """A PNG grid of EMA samples (same noise every time: the grids of a run are comparable)."""
  from ddim_jax import visualize  # pylint: disable=import-outside-toplevel
  n = int(num_images or config.sample.num_images)
  size = int(config.model.image_size)
  noise = jax.random.normal(jax.random.key(config.seed + 1), (n, size, size, int(config.model.channels)))
  out = sampling.generate(model, variables, noise, normalizer, steps=int(config.sample.steps),
                          schedule=config.diffusion.schedule, min_signal_rate=float(config.diffusion.min_signal_rate),
                          max_signal_rate=float(config.diffusion.max_signal_rate), target=config.diffusion.target)
  images = _to_host(out["images"])
  if jax.process_index() == 0:
    visualize.save_grid(images, path, upscale=max(1, 64 // size))
  return images


def _checkpoint_meta(config, normalizer, data_state, step: int) -> dict:
  return {"config": json.loads(config.to_json()), "data_iterator": data_state, "step": int(step),
          "normalizer": {k: np.asarray(v, np.float32).tolist() for k, v in normalizer.items()}}


def abstract_train_state(model, step_config, image_size, key, sharding):
  """The TrainState's shapes and dtypes with ``sharding`` (a restore target); nothing is computed."""
  shapes = jax.eval_shape(lambda: create_train_state(model, step_config, key, image_size))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def train_and_evaluate(config, workdir: str, *, distributed: bool | None = None, progress: bool = True) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

  Writes ``checkpoints/`` (orbax: state, normaliser, config, data-iterator position),
  ``metrics.jsonl``, ``tensorboard/`` and ``samples/step_<n>.png`` (EMA samples). A SIGTERM (or
  an orbax preemption notice) finishes the current step, saves a checkpoint and returns. A
  non-finite loss raises ``NonFiniteLossError``; the last good checkpoint is kept.

  Returns:
    The final TrainState (replicated over the devices).
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from ddim_jax import checkpointing, input_pipeline, parallel  # pylint: disable=import-outside-toplevel

  parallel.configure_cpu_devices(config.get("cpu_devices", 1), int(config.train.batch_size))
  parallel.initialize_distributed(distributed)
  validate_config(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = parallel.create_mesh()
  steps_per_call = int(config.train.get("steps_per_call", 1))
  step_config = StepConfig.from_config(config)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  eval_model = models.create_model(**config.model)
  image_size = int(config.model.image_size)

  # Data (this process's slice of every global batch) and the normaliser of the training split.
  train_iter, val_images, normalizer = input_pipeline.create_datasets(config, image_size, jax.process_index(),
                                                                      jax.process_count())

  # KID on the validation split (None when off or without Inception weights: one warning then).
  from ddim_jax import evaluation  # pylint: disable=import-outside-toplevel
  kid_fn = evaluation.make_training_kid(config, eval_model, val_images)
  kid_every = int(config.train.get("kid_every", 0) or 0) if kid_fn is not None else 0

  # State: the newest checkpoint that restores, or a fresh init.
  init_key = jax.random.key(config.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=int(config.train.get("keep_checkpoints", 3)),
                                    best_metric="val_kid" if kid_fn is not None else None, best_mode="min")
  checkpointing.install_sigterm_handler()  # sets the flag that ckpt.reached_preemption reads
  restored = ckpt.restore_latest(abstract_train_state(model, step_config, image_size, init_key,
                                                 parallel.replicated(mesh)))
  if restored is not None:
    step, state, meta = restored
    train_iter.set_state(meta["data_iterator"])
    normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
    if is_main:
      print(f"resuming from step {step} ({workdir}/checkpoints)")
  else:
    step = 0
    state = parallel.replicate(jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        model, step_config, init_key, image_size), mesh)
  normalizer_dev = parallel.replicate(normalizer, mesh)
  base_key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed + 2)), mesh)
  train_fn = parallel.make_train_fn(model, step_config, mesh, config.parallel, steps_per_call)
  writer = MetricWriter(workdir, enabled=is_main)
  num_steps = int(config.train.num_steps)
  bar = tqdm(total=num_steps, initial=step, desc="training", unit="step", disable=not (progress and is_main),
             dynamic_ncols=True)
  timer, logged_step = time.time(), step
  try:
    while step < num_steps:
      batches = [next(train_iter)["images"] for _ in range(steps_per_call)]
      local = batches[0] if steps_per_call == 1 else np.stack(batches)
      images = parallel.shard_batch(local, mesh, steps_per_call) if config.parallel == "shard_map" else local
      state, metrics = train_fn(state, images, normalizer_dev, base_key)
      step += steps_per_call
      bar.update(steps_per_call)
      preempted = ckpt.reached_preemption(step)
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
      if int(config.train.sample_every) and step % int(config.train.sample_every) == 0:
        write_sample_grid(eval_model, state.variables(ema=True), normalizer_dev, config, step,
                          os.path.join(workdir, "samples", f"step_{step:07d}.png"))
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
