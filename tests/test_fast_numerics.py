"""The fast tier's numerics: the production training step and the U-Net at a tiny size (8x8 images,
widths 8/16, block depth 1), against closed forms in NumPy and against the torch twin.

Seconds each on 2 cores, so that ``-m "not slow"`` catches a wrong model or training step (swapped
rates, a dropped normalisation, an inverted EMA decay, the skip concatenation reversed, another EMA
warm-up) without the slow parity tests. The step is the trainer's: ``step.per_device_step`` launched
by ``parallel.make_train_fn`` (shard_map under jit) on 2 devices, fed [0, 1] images, the normaliser and
the run's key; only its random draws are taken from ``step.draw_noises_and_times`` (the key
convention itself: test_train.py::test_production_train_step_equals_the_closed_form_step).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddim_jax.core import models, step as step_lib
from ddim_jax.infra import parallel
from ddim_jax.interop import parity, weight_files
from ddim_torch_ref import step as torch_step
from test_models import _init as random_variables  # NumPy-filled variables by eval_shape: nothing compiled
from test_train import _closed_form_cosine_rates  # the offset cosine schedule in float64 NumPy, from the spec

SIZE, BATCH, DEVICES = 8, 4, 2
NORMALIZER = {"mean": np.array([0.2, 0.5, 0.7], np.float32), "variance": np.array([0.04, 0.09, 0.16], np.float32)}
# One step configuration for the step tests, so that they share one compilation: the EMA warm-up on
# (decay 0.999: the warm-up's (1+n)/(10+n) is the decay in force for the first steps).
STEP_CONFIG = step_lib.StepConfig(ema_decay=0.999, ema_warmup=True)


def _tiny_model(bn_axis_name=None):
  return models.create_model("keras", widths=(8, 16), block_depth=1, bn_axis_name=bn_axis_name)


def _tiny_variables(model) -> dict:
  """Every tensor random (kernels ~ N(0, 1/fan_in), the head too: a fresh zero head predicts 0),
  BatchNorm variances positive."""
  variables = random_variables(model)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.abs(np.asarray(x)) + np.float32(0.5) if path[-1].key == "var" else np.asarray(x), variables)


def _flat(variables) -> dict[str, np.ndarray]:
  """Torch-named float64 NumPy arrays of {'params', 'batch_stats'}."""
  return {k: v.astype(np.float64) for k, v in weight_files.flax_to_torch_state_dict(jax.device_get(variables)).items()}


def _twin_state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().astype(np.float64) for k, v in module.state_dict().items()}


def _max_rel(got: dict, want: dict, scale: dict | None = None) -> tuple[float, str]:
  """max over tensors of max|got - want| / max|scale| (default: max|want|), and the worst tensor."""
  scale = want if scale is None else scale
  worst = max(want, key=lambda k: np.max(np.abs(got[k] - want[k])) / max(np.max(np.abs(scale[k])), 1e-30))
  return float(np.max(np.abs(got[worst] - want[worst])) / max(np.max(np.abs(scale[worst])), 1e-30)), worst


@functools.lru_cache(maxsize=None)
def _compiled(step_config: step_lib.StepConfig):
  """(model, mesh, the trainer's training function, the draws function), once per configuration."""
  model = _tiny_model(parallel.AXIS)
  mesh = parallel.create_mesh(jax.devices()[:DEVICES])
  fn = parallel.make_train_fn(step_lib.per_device_step(model, step_config, 1, parallel.AXIS), mesh, "shard_map")
  draws = jax.jit(step_lib.draw_noises_and_times, static_argnums=3)
  return model, mesh, fn, draws


class ProductionRun:
  """The trainer's step on a tiny model: ``parallel.make_train_fn(step.per_device_step(...))``
  (shard_map over 2 devices), from NumPy-filled weights; beside it the torch twin trained on the
  same normalised images, noises and rates (the rates and the normalisation in closed form)."""

  def __init__(self, step_config: step_lib.StepConfig, seed: int = 0):
    self.config = step_config
    model, mesh, self.fn, self.draws = _compiled(step_config)
    self.variables = _tiny_variables(model)
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=self.variables["params"], batch_stats=self.variables["batch_stats"],
        opt_state=step_lib.make_optimizer(step_config).init(self.variables["params"]),
        ema_params=self.variables["params"], ema_batch_stats=self.variables["batch_stats"])
    self.state = parallel.replicate(state, mesh)
    self.key = jax.random.key(7)
    self.key_data = parallel.replicate(jax.random.key_data(self.key), mesh)
    self.rng = np.random.default_rng(seed)
    self.twin = parity.torch_twin(_tiny_model(), self.variables)
    self.optimizer = torch_step.make_optimizer(self.twin, step_config.learning_rate, step_config.weight_decay)
    self.twin_ema = torch_step.EMA(self.twin, step_config.ema_decay, step_config.ema_warmup)
    self.step = 0

  def next(self):
    """One step of both; returns (JAX state on the host, JAX metrics, twin metrics)."""
    images = self.rng.uniform(0.0, 1.0, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    self.state, metrics = self.fn(self.state, images, NORMALIZER, self.key_data)
    noises, times = (np.asarray(x) for x in self.draws(
        self.key, jnp.asarray(self.step, jnp.int32), jnp.arange(BATCH, dtype=jnp.int32), (SIZE, SIZE, 3)))
    assert times.min() < 0.5 < times.max(), times.ravel()  # rates far from their swap point (t ~ 0.5)
    noise_rates, signal_rates = _closed_form_cosine_rates(times)
    normalized = ((images.astype(np.float64) - NORMALIZER["mean"]) / np.sqrt(NORMALIZER["variance"])).astype(np.float32)
    twin_metrics = torch_step.train_step_from_draws(
        self.twin, self.optimizer, self.twin_ema, self.step, torch.from_numpy(parity.nchw(normalized)),
        torch.from_numpy(parity.nchw(noises)), torch.from_numpy(noise_rates), torch.from_numpy(signal_rates))
    self.step += 1
    return jax.device_get(self.state), {k: float(v) for k, v in metrics.items()}, {
        k: float(v) for k, v in twin_metrics.items()}


def _assert_step_matches_twin(state, metrics, twin_metrics, twin, what):
  for name in ("loss", "noise_loss", "image_loss"):
    assert abs(metrics[name] - twin_metrics[name]) <= 1e-5 * abs(twin_metrics[name]), (what, name, metrics,
                                                                                       twin_metrics)
  rel, worst = _max_rel(_flat(state.variables(ema=False)), _twin_state(twin))
  assert rel <= 1e-4, (what, "raw weights and BatchNorm statistics vs the twin", rel, worst)


def test_the_production_step_equals_the_closed_form_and_the_twin():
  """One step of the trainer's step on a tiny U-Net:

  - the loss and metrics equal the torch twin's, fed the closed-form normalised images
    ((x - mean) / sqrt(variance)) and the closed-form offset cosine rates of the step's own draws
    (noisy images = signal rate x image + noise rate x noise): swapped rates, a dropped normaliser or
    another network (the skip concatenation reversed) change them;
  - the raw weights, BatchNorm statistics and AdamW step equal the twin's;
  - the EMA is the closed form d x initial + (1 - d) x new with d = 2/11 (the warm-up's first decay),
    for the weights and the statistics, in both twins.
  """
  run = ProductionRun(STEP_CONFIG)
  start = _flat(run.variables)
  state, metrics, twin_metrics = run.next()
  _assert_step_matches_twin(state, metrics, twin_metrics, run.twin, "step 1")
  raw = _flat(state.variables(ema=False))
  decay = 2.0 / 11.0
  want = {k: decay * start[k] + (1.0 - decay) * raw[k] for k in raw}
  moved = {k: raw[k] - start[k] for k in raw}  # the EMA's error is measured against how far the step moved
  rel, worst = _max_rel(_flat(state.variables(ema=True)), want, moved)
  assert rel <= 1e-3, ("EMA vs 2/11 initial + 9/11 new", rel, worst)
  rel, worst = _max_rel(_twin_state(run.twin_ema.model), want, moved)
  assert rel <= 1e-2, ("the twin's EMA vs 2/11 initial + 9/11 new", rel, worst)


def _closed_form_warmup_decay(n: int, decay: float) -> float:
  """score_sde's EMA warm-up: min(decay, (1 + n) / (10 + n)), n = the optimiser steps taken (1 after the first)."""
  return min(decay, (1.0 + n) / (10.0 + n))


def test_ema_warmup_over_production_steps_equals_the_recursion_and_the_twin():
  """Three steps of the trainer's step with ``ema_warmup`` (decay 0.999: the warm-up's (1+n)/(10+n) =
  2/11, 3/12, 4/13 is the decay in force) against the EMA recursion in NumPy over each twin's raw weights after each step,
  and the two twins' EMAs against each other (weights and BatchNorm statistics)."""
  run = ProductionRun(STEP_CONFIG, seed=1)
  start = _flat(run.variables)
  ema, twin_ema = dict(start), dict(start)
  for n in range(1, 4):
    decay = _closed_form_warmup_decay(n, STEP_CONFIG.ema_decay)
    assert decay < 0.5  # the warm-up, not the constant, is in force
    state, metrics, twin_metrics = run.next()
    _assert_step_matches_twin(state, metrics, twin_metrics, run.twin, f"step {n}")
    raw, twin_raw = _flat(state.variables(ema=False)), _twin_state(run.twin)
    ema = {k: decay * ema[k] + (1.0 - decay) * raw[k] for k in raw}
    twin_ema = {k: decay * twin_ema[k] + (1.0 - decay) * twin_raw[k] for k in raw}
    moved = {k: raw[k] - start[k] for k in raw}
    rel, worst = _max_rel(_flat(state.variables(ema=True)), ema, moved)
    assert rel <= 1e-3, (f"JAX EMA after step {n} vs the recursion", rel, worst)
    rel, worst = _max_rel(_twin_state(run.twin_ema.model), twin_ema, moved)
    assert rel <= 1e-3, (f"the twin's EMA after step {n} vs the recursion", rel, worst)
    rel, worst = _max_rel(_flat(state.variables(ema=True)), _twin_state(run.twin_ema.model), moved)
    assert rel <= 1e-2, (f"JAX EMA vs the twin's after step {n}", rel, worst)


@pytest.mark.parametrize("n,decay", [(1, 0.999), (5, 0.999), (10_000, 0.999), (3, 0.2), (7, 0.9)])
def test_ema_decay_at_is_the_warmup_closed_form_in_both_twins(n, decay):
  """``ema_decay_at(step)`` (0-based step: n - 1) of both twins, with and without the warm-up."""
  want = _closed_form_warmup_decay(n, decay)
  assert float(step_lib.ema_decay_at(jnp.asarray(n - 1, jnp.int32), decay, True)) == pytest.approx(want, rel=1e-6)
  assert torch_step.ema_decay_at(n - 1, decay, True) == pytest.approx(want, rel=1e-12)
  assert float(step_lib.ema_decay_at(jnp.asarray(n - 1, jnp.int32), decay, False)) == pytest.approx(decay, rel=1e-6)
  assert torch_step.ema_decay_at(n - 1, decay, False) == decay


@pytest.mark.parametrize("train", [False, True], ids=["bn_eval", "bn_train"])
def test_tiny_unet_equals_the_twin(train):
  """The U-Net itself (8x8, widths 8/16, depth 1, every tensor random) against the torch twin with the
  same weights (the converter): noise predictions at mixed noise levels, BatchNorm in eval and in
  train mode, and in train mode the new running statistics."""
  model = _tiny_model()
  variables = _tiny_variables(model)
  noisy_images, noise_variances = parity.mixed_noise_inputs(BATCH, SIZE, 3, seed=2)
  twin = parity.torch_twin(model, variables).train(train)
  with torch.no_grad():
    want = parity.nhwc(twin(torch.from_numpy(parity.nchw(noisy_images)), torch.from_numpy(noise_variances.copy())).numpy())
  got = parity.predict(model, variables, noisy_images, noise_variances, train)
  assert np.max(np.abs(want)) > 0.1  # not the zero head
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), np.max(np.abs(got - want))
  if train:
    _, updates = parity._apply(model, variables, noisy_images, noise_variances, True)  # pylint: disable=protected-access
    rel, worst = _max_rel(_flat({"batch_stats": updates["batch_stats"]}), {
        k: v for k, v in _twin_state(twin).items() if k.endswith(("running_mean", "running_var"))})
    assert rel <= 1e-5, (rel, worst)
