"""Training: the TrainState pytree, the loss, AdamW + EMA, and the per-device training step.

The per-device step (``train_step``) is written with named-axis collectives over ``axis_name``
("data"): gradients and metrics are ``pmean``-ed and BatchNorm statistics are synchronised inside
the model, so the step computes global-batch BatchNorm and the gradient of the global mean loss
whatever the number of devices. ``parallel.py`` launches it (shard_map under jit, or pmap); the
loop that drives it is ``trainer.train_and_evaluate``. The twin is ``ddim_torch_ref/step.py``.

Per-example randomness (diffusion time and noise) comes from
``fold_in(fold_in(base_key, step), global_example_index)``: never from the device index, so the
same global batch gives the same draws on 1, 2 or 4 devices, and a resumed run the same keys.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddim_jax import errors
from ddim_jax.core import models, sampling, schedules

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
  diffusion: schedules.DiffusionSpec = schedules.DiffusionSpec()
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  num_steps: int = 0  # the horizon of the "cosine" schedule
  grad_clip_norm: float = 0.0  # > 0: gradients clipped to this global norm before AdamW
  grad_accum_steps: int = 1  # > 1: each device's batch in this many micro-batches, one optimiser step

  @classmethod
  def from_config(cls, config) -> "StepConfig":
    """Reads ``config.train`` and ``config.diffusion``."""
    return cls(learning_rate=float(config.train.learning_rate), weight_decay=float(config.train.weight_decay),
               ema_decay=float(config.train.ema_decay), ema_warmup=bool(config.train.get("ema_warmup", False)),
               loss=config.train.loss, diffusion=schedules.DiffusionSpec.from_config(config),
               lr_schedule=str(config.train.get("lr_schedule", "constant")),
               warmup_steps=int(config.train.get("warmup_steps", 0) or 0), num_steps=int(config.train.num_steps),
               grad_clip_norm=float(config.train.get("grad_clip_norm", 0.0) or 0.0),
               grad_accum_steps=int(config.train.get("grad_accum_steps", 1) or 1))


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(step_config: StepConfig):
  """The learning rate: a float (constant, no warm-up: the Keras and R originals), else a schedule
  of the optimiser step: a linear warm-up from 0 over ``warmup_steps``, then constant or a cosine
  decay to 0 at ``num_steps``."""
  lr, warmup = step_config.learning_rate, step_config.warmup_steps
  if step_config.lr_schedule not in LR_SCHEDULES:
    raise errors.ConfigError(f"config.train.lr_schedule={step_config.lr_schedule!r} is invalid: choose one of "
                             f"{LR_SCHEDULES}")
  if step_config.lr_schedule == "constant" and warmup == 0:
    return lr
  if step_config.lr_schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(step_config.num_steps, warmup + 1), end_value=0.0)


def make_optimizer(step_config: StepConfig) -> optax.GradientTransformation:
  """AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay on every parameter) at
  ``learning_rate_schedule`` (weight decay scales with the scheduled rate, as in optax), after
  ``clip_by_global_norm`` when ``grad_clip_norm`` > 0 (the optimiser state then holds the clip's
  empty state too: a run cannot switch clipping on or off when it resumes)."""
  adamw = optax.adamw(learning_rate_schedule(step_config), b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=step_config.weight_decay)
  if step_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(step_config.grad_clip_norm), adamw)
  return adamw


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
    raise errors.ConfigError(f"unknown loss {loss!r}; choose one of {LOSSES}")
  metrics = {"loss": value, "noise_loss": jnp.mean(jnp.abs(pred_noises - noises)),
             "image_loss": jnp.mean(jnp.abs(pred_images - images))}
  return value, (metrics, updates["batch_stats"])


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def accumulated_gradients(params, batch_stats, images, noises, noise_rates, signal_rates, *, model,
                          step_config: StepConfig):
  """The gradients and metrics of the loss, averaged over ``grad_accum_steps`` micro-batches.

  The batch is cut into equal consecutive micro-batches; each runs forward and backward on its own
  (BatchNorm normalises with the micro-batch's statistics, and its running statistics are updated
  once per micro-batch, in order), so only one micro-batch's activations are alive at a time. With
  equal sizes the mean of the micro-batch losses is the batch's loss. Returns
  ``(grads, metrics, new_batch_stats)``.
  """
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  loss, target, k = step_config.loss, step_config.diffusion.target, step_config.grad_accum_steps
  if k == 1:
    (_, (metrics, new_batch_stats)), grads = grad_fn(params, batch_stats, model, images, noises, noise_rates,
                                                     signal_rates, loss, target)
    return grads, metrics, new_batch_stats
  if images.shape[0] % k:
    raise errors.ConfigError(f"config.train.grad_accum_steps={k} does not divide this device's batch of "
                             f"{images.shape[0]} images")
  micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]),
                       (images, noises, noise_rates, signal_rates))

  def body(carry, batch):
    grads_sum, metrics_sum, stats = carry
    (_, (metrics, stats)), grads = grad_fn(params, stats, model, *batch, loss, target)
    return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics), stats), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (_, (metric_shapes, _)), _ = jax.eval_shape(
      lambda: grad_fn(params, batch_stats, model, *jax.tree.map(lambda x: x[0], micro), loss, target))
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
  (grads_sum, metrics_sum, new_batch_stats), _ = jax.lax.scan(body, (zeros, zero_metrics, batch_stats), micro)
  return (jax.tree.map(lambda g: g / k, grads_sum), jax.tree.map(lambda m: m / k, metrics_sum), new_batch_stats)


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
  grads, metrics, new_batch_stats = accumulated_gradients(state.params, state.batch_stats, images, noises,
                                                         noise_rates, signal_rates, model=model,
                                                         step_config=step_config)
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
  noise_rates, signal_rates = step_config.diffusion.schedule_fn()(times)
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


def per_device_step(model, step_config: StepConfig, steps_per_call: int = 1, axis_name: str = "data"):
  """The per-device step ``(state, images, normalizer, base_key) -> (state, metrics)`` that
  ``parallel.make_train_fn`` launches: ``train_step``, or ``train_steps`` for K > 1 steps per call."""
  if model.bn_axis_name != axis_name:
    raise ValueError(f"the model must be built with bn_axis_name={axis_name!r} for synchronised BatchNorm")
  step_fn = train_step if steps_per_call == 1 else train_steps
  return functools.partial(step_fn, model=model, step_config=step_config, axis_name=axis_name)


def state_is_finite(state: TrainState) -> jax.Array:
  """A bool scalar: every floating-point leaf of ``state`` is finite (what a checkpoint may hold)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


def abstract_train_state(model, step_config, image_size, key, sharding):
  """The TrainState's shapes and dtypes with ``sharding`` (a restore target); nothing is computed."""
  shapes = jax.eval_shape(lambda: create_train_state(model, step_config, key, image_size))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
