"""Training: torch step parity, device-count invariance, multi-host, resume, preemption, guards."""

import functools
import json
import os
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import cli, configs
from ddim_jax.core import models, sampling, step as step_lib
from ddim_jax.inference import grids
from ddim_jax.infra import parallel
from ddim_jax.interop import parity, parity_fixtures, weight_files
from ddim_jax.training import trainer
from train_helpers import (TWO_PROCESS_RUN, TWO_PROCESS_START_S, assert_same_state, final_state, final_weights, run,
                           subprocess_env, tiny_config, tiny_overrides, train_command, two_processes, wait_until)


# ------------------------------------------------------------------------------------------------
# Parity with the torch training step.


@pytest.mark.slow
def test_train_step_parity_keras():
  """Same converted weights, batch, noise and times: 1 step <= 1e-5, 10 steps <= 1e-4.

  The loss of the first step (identical weights) agrees to 1e-6; over 10 steps the weights drift
  apart by ~1e-6 relative (float32 rounding in two frameworks), and the losses with them.
  """
  model = models.create_model("keras", widths=(8, 16))
  with parity.precision("highest"):  # float32 bounds: full float32 on GPUs/TPUs too
    variables = parity_fixtures.perturbed_variables(model, 16, seed=5)
    result = parity.train_step_parity(model, variables, 16, num_steps=10, batch=8)
  assert result["loss_abs_1"] <= 1e-6, result
  assert result["loss_max_abs"] <= 1e-5, result
  assert result["params_rel_1"] <= 1e-5 and result["batch_stats_rel_1"] <= 1e-5 and result["ema_rel_1"] <= 1e-5, result
  assert result["params_rel_10"] <= 1e-4 and result["batch_stats_rel_10"] <= 1e-4, result
  assert result["ema_rel_10"] <= 1e-4, result


@pytest.mark.slow
def test_train_step_parity_r_variant_outside_adam_ill_conditioning():
  """The r variant: the same bounds on every parameter whose first gradient is >= 1e-7.

  Adam's first step is lr * g / (|g| + 1e-8); for the few elements with |g| within a few 1e-8 of
  zero, the ~1e-10 float32 difference between the frameworks' gradient sums changes the step by up
  to lr. Those elements are counted and must be rare.
  """
  model = models.create_model("r", widths=(8, 16))
  with parity.precision("highest"):  # float32 bounds: full float32 on GPUs/TPUs too
    variables = parity_fixtures.perturbed_variables(model, 16, seed=5)
    result = parity.train_step_parity(model, variables, 16, num_steps=10, batch=8, min_first_grad=1e-7)
  assert result["loss_abs_1"] <= 1e-6, result
  assert result["loss_max_abs"] <= 1e-5, result
  assert result["ill_conditioned"] < 0.001 * result["num_parameters"], result
  assert result["params_rel_1"] <= 1e-5 and result["batch_stats_rel_1"] <= 1e-5 and result["ema_rel_1"] <= 1e-5, result
  assert result["params_rel_10"] <= 1e-4 and result["batch_stats_rel_10"] <= 1e-4, result


@pytest.mark.parametrize("clip,accum", [(0.05, 1), (0.0, 4), (0.05, 2)], ids=["clip", "accumulate", "both"])
@pytest.mark.slow
def test_train_step_parity_with_gradient_clipping_and_accumulation(clip, accum):
  """train.grad_clip_norm (optax clip_by_global_norm vs torch clip_grad_norm_) and train.grad_accum_steps
  (micro-batches with their own BatchNorm statistics, one AdamW and EMA step) against the twin: the
  keras bounds (10 steps). The clip binds: the first gradient's norm is cut to exactly ``clip``, and
  accumulation changes the result (micro-batch BatchNorm), so neither is a no-op."""
  model = models.create_model("keras", widths=(8, 16))
  step_config = step_lib.StepConfig(grad_clip_norm=clip, grad_accum_steps=accum)
  with parity.precision("highest"):
    variables = parity_fixtures.perturbed_variables(model, 16, seed=5)
    result = parity.train_step_parity(model, variables, 16, num_steps=10, batch=8, step_config=step_config)
    plain = parity.train_step_parity(model, variables, 16, num_steps=1, batch=8)
  assert result["loss_abs_1"] <= 1e-6, result
  assert result["loss_max_abs"] <= 1e-5, result
  assert result["params_rel_1"] <= 1e-5 and result["batch_stats_rel_1"] <= 1e-5 and result["ema_rel_1"] <= 1e-5, result
  assert result["params_rel_10"] <= 1e-4 and result["batch_stats_rel_10"] <= 1e-4, result
  assert result["ema_rel_10"] <= 1e-4, result
  if clip:
    assert plain["grad_norm_1"] > 2 * clip and result["grad_norm_1"] == pytest.approx(clip, rel=1e-4), (plain, result)
  else:
    assert result["grad_norm_1"] != pytest.approx(plain["grad_norm_1"], rel=1e-3), (plain, result)


@pytest.mark.slow
def test_accumulating_one_micro_batch_per_example_pair_equals_the_mean_of_their_gradients():
  """grad_accum_steps=K: the gradient is the mean of the K micro-batches' own gradients (each with
  its BatchNorm statistics), the running statistics are updated K times in order, the metrics are
  the means. Checked against K separate calls of the one-batch gradient."""
  model = models.create_model("keras", widths=(8, 16), bn_axis_name=None)
  variables = parity_fixtures.perturbed_variables(model, 16, seed=3)
  rng = np.random.default_rng(0)
  images, noises = (rng.standard_normal((8, 16, 16, 3)).astype(np.float32) for _ in range(2))
  config = step_lib.StepConfig(grad_accum_steps=4)
  noise_rates, signal_rates = config.diffusion.rate_table(rng.uniform(0.0, 1.0, (8, 1, 1, 1)))
  grads, metrics, stats = jax.jit(functools.partial(step_lib.accumulated_gradients, model=model,
                                                    step_config=config))(
      variables["params"], variables["batch_stats"], images, noises, noise_rates, signal_rates)
  one = jax.jit(functools.partial(step_lib.accumulated_gradients, model=model, step_config=step_lib.StepConfig()))
  want_grads, want_metrics, want_stats = [], [], variables["batch_stats"]
  for i in range(4):
    part = slice(2 * i, 2 * i + 2)
    g, m, want_stats = one(variables["params"], want_stats, images[part], noises[part], noise_rates[part],
                           signal_rates[part])
    want_grads.append(g)
    want_metrics.append(m)
  mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *want_grads)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for name in metrics:
    assert float(metrics[name]) == pytest.approx(np.mean([float(m[name]) for m in want_metrics]), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The production step (``step_lib.train_step``: folded draws, jnp schedule, normalisation) against
# the closed form, and a JAX training run that learns.


def _closed_form_cosine_rates(times):
  """The Keras offset cosine schedule in float64 NumPy, written from the spec (not schedules.py)."""
  start, end = np.arccos(0.95), np.arccos(0.02)
  angles = start + np.asarray(times, np.float64) * (end - start)
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def _tree_rel(a, b):
  """max over leaves of max|a - b| / max|b|."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) / max(float(np.max(np.abs(np.asarray(y)))), 1e-30)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_production_train_step_equals_the_closed_form_step():
  """``train_step(key)`` = ``train_step_from_draws`` fed independently formed draws, rates and inputs.

  The draws are the documented key convention (fold_in(fold_in(key, step), example)), the rates
  the offset cosine closed form in float64 NumPy, the inputs (x - mean) / sqrt(variance) in NumPy.
  Swapped rates, a missing normalisation, another key convention or time range all fail here.
  """
  model = models.create_model("keras", widths=(8, 16))
  variables = parity_fixtures.perturbed_variables(model, 16, seed=3)
  step_config = step_lib.StepConfig()
  start = step_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=step_lib.make_optimizer(step_config).init(variables["params"]),
                           ema_params=variables["params"], ema_batch_stats=variables["batch_stats"])
  rng = np.random.default_rng(0)
  batch = 8
  images = rng.uniform(0.0, 1.0, (batch, 16, 16, 3)).astype(np.float32)
  normalizer = {"mean": np.array([0.2, 0.5, 0.7], np.float32), "variance": np.array([0.04, 0.09, 0.16], np.float32)}
  key = jax.random.key(7)
  got, got_metrics = jax.jit(functools.partial(step_lib.train_step, model=model, step_config=step_config,
                                               axis_name=None))(start, images, normalizer, key)

  # The key convention, spelled out example by example.
  noises, times = [], []
  for index in range(batch):
    noise_key, time_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 3), index))
    noises.append(np.asarray(jax.random.normal(noise_key, (16, 16, 3))))
    times.append(np.asarray(jax.random.uniform(time_key, (1, 1, 1))))
  noises, times = np.stack(noises), np.stack(times)
  drawn_noises, drawn_times = step_lib.draw_noises_and_times(key, jnp.asarray(3, jnp.int32),
                                                          jnp.arange(batch, dtype=jnp.int32), (16, 16, 3))
  np.testing.assert_array_equal(np.asarray(drawn_noises), noises)
  np.testing.assert_array_equal(np.asarray(drawn_times), times)
  assert 0.0 <= times.min() and times.max() < 1.0 and times.max() - times.min() > 0.3

  noise_rates, signal_rates = _closed_form_cosine_rates(times)
  normalized = ((images.astype(np.float64) - normalizer["mean"]) / np.sqrt(normalizer["variance"].astype(
      np.float64))).astype(np.float32)
  want, want_metrics = jax.jit(functools.partial(step_lib.train_step_from_draws, model=model, step_config=step_config,
                                                 axis_name=None))(start, normalized, noises, noise_rates, signal_rates)
  for name in ("loss", "noise_loss", "image_loss"):
    assert abs(float(got_metrics[name]) - float(want_metrics[name])) <= 1e-5 * abs(float(want_metrics[name])), name
  # Adam's first moment is (1 - b1) * gradient: the gradients themselves agree.
  assert _tree_rel(got.opt_state[0].mu, want.opt_state[0].mu) <= 1e-4
  assert _tree_rel(got.batch_stats, want.batch_stats) <= 1e-5
  assert _tree_rel(got.ema_batch_stats, want.ema_batch_stats) <= 1e-5
  assert int(got.step) == 4


@pytest.mark.slow
def test_learning_rate_schedules_closed_forms_and_the_first_warmup_step_moves_nothing():
  lr = 2e-3
  assert step_lib.learning_rate_schedule(step_lib.StepConfig(learning_rate=lr)) == lr  # the originals: a constant
  cosine = step_lib.learning_rate_schedule(step_lib.StepConfig(learning_rate=lr, lr_schedule="cosine", warmup_steps=10,
                                                         num_steps=110))
  for step, want in ((0, 0.0), (5, lr / 2), (10, lr), (60, lr / 2), (110, 0.0)):
    assert float(cosine(step)) == pytest.approx(want, abs=1e-9), step
  warm = step_lib.learning_rate_schedule(step_lib.StepConfig(learning_rate=lr, warmup_steps=4))
  assert [float(warm(s)) for s in (0, 2, 4, 100)] == pytest.approx([0.0, lr / 2, lr, lr])
  with pytest.raises(ValueError, match="lr_schedule"):
    step_lib.learning_rate_schedule(step_lib.StepConfig(lr_schedule="linear"))
  # Through the optimiser: the first step of a warm-up has rate 0, so AdamW (and its decoupled weight
  # decay, scaled by the rate) leaves the weights as they were; the second step moves them.
  model = models.create_model("keras", widths=(8, 16))
  variables = models.init_variables(model, jax.random.key(0), 16)
  step_config = step_lib.StepConfig(lr_schedule="cosine", warmup_steps=10, num_steps=100)
  state = step_lib.TrainState(step=jnp.asarray(0, jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=step_lib.make_optimizer(step_config).init(variables["params"]),
                           ema_params=variables["params"], ema_batch_stats=variables["batch_stats"])
  images = np.random.default_rng(0).uniform(0.0, 1.0, (4, 16, 16, 3)).astype(np.float32)
  normalizer = {"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.1, np.float32)}
  step = jax.jit(functools.partial(step_lib.train_step, model=model, step_config=step_config, axis_name=None))
  first, _ = step(state, images, normalizer, jax.random.key(1))
  second, _ = step(first, images, normalizer, jax.random.key(1))
  assert _tree_rel(first.params, state.params) == 0.0
  assert _tree_rel(second.params, first.params) > 1e-4


@pytest.mark.slow
def test_a_short_jax_training_run_on_the_digits_gives_a_denoiser():
  """The production step trains: 100 steps on the bundled digits beat predicting zero noise widely.

  The check ``test_parity.py`` applies to the torch-trained reference, here on JAX's own run of a
  small U-Net (measured: mean |error| 0.30 of the noise's at t = 0.5; an untrained head gives 1).
  """
  from ddim_jax.core import schedules
  model = models.create_model("keras", widths=(8, 16), block_depth=1)
  step_config = step_lib.StepConfig(learning_rate=3e-3)
  state = step_lib.create_train_state(model, step_config, jax.random.key(0), 16)
  data = parity_fixtures.load_digits_images(16).astype(np.float32) / 255.0
  normalizer = {"mean": data.mean(axis=(0, 1, 2)), "variance": data.var(axis=(0, 1, 2))}
  step = jax.jit(functools.partial(step_lib.train_step, model=model, step_config=step_config, axis_name=None))
  rng, key = np.random.default_rng(0), jax.random.key(1)
  for _ in range(100):
    state, _ = step(state, data[rng.choice(len(data), 16, replace=False)], normalizer, key)
  images = np.asarray(sampling.normalize(data[:64], normalizer))
  noises = np.random.default_rng(1).standard_normal(images.shape).astype(np.float32)
  noise_rates, signal_rates = schedules.rate_table(np.full((64, 1, 1, 1), 0.5))
  pred = model.apply(state.variables(ema=False), jnp.asarray(signal_rates * images + noise_rates * noises),
                     jnp.asarray(noise_rates ** 2))
  assert float(np.mean(np.abs(np.asarray(pred) - noises))) < 0.5 * float(np.mean(np.abs(noises)))


# ------------------------------------------------------------------------------------------------
# Data parallelism.


def _run_steps(mode: str, num_devices: int, num_steps: int = 5, steps_per_call: int = 1, dtype: str = "float32"):
  model = models.create_model("keras", widths=(8, 16), block_depth=1, bn_axis_name=parallel.AXIS, dtype=dtype)
  step_config = step_lib.StepConfig(ema_decay=0.9)
  mesh = parallel.create_mesh(jax.devices()[:num_devices])
  state = parallel.replicate(step_lib.create_train_state(model, step_config, jax.random.key(0), 16), mesh)
  fn = parallel.make_train_fn(step_lib.per_device_step(model, step_config, steps_per_call, parallel.AXIS), mesh, mode,
                              steps_per_call)
  rng = np.random.default_rng(0)
  normalizer = {"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.1, np.float32)}
  key = parallel.replicate(jax.random.key_data(jax.random.key(1)), mesh)
  for _ in range(num_steps // steps_per_call):
    batch = rng.uniform(0, 1, (steps_per_call, 8, 16, 16, 3)).astype(np.float32)
    batch = batch[0] if steps_per_call == 1 else batch
    state, metrics = fn(state, batch, normalizer, key)  # this process's NumPy batch, whatever the mode
  return jax.device_get(state), float(metrics["loss"])


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


@pytest.mark.slow
def test_device_count_invariance():
  """The same 5 steps on 1, 2 and 4 devices, shard_map and pmap: the same state (<= 1e-5; moments 1e-4 rel)."""
  reference, ref_loss = _run_steps("shard_map", 1)
  for mode in ("shard_map", "pmap"):
    for devices in (1, 2, 4):
      state, loss = _run_steps(mode, devices)
      assert _max_diff(state.params, reference.params) <= 1e-5, (mode, devices)
      assert _max_diff(state.batch_stats, reference.batch_stats) <= 1e-5, (mode, devices)
      assert _max_diff(state.ema_params, reference.ema_params) <= 1e-5, (mode, devices)
      # AdamW's moments see the gradient's scale (its update does not): an N-device sum instead
      # of a mean makes mu N and nu N^2 times larger.
      assert _tree_rel(state.opt_state, reference.opt_state) <= 1e-4, (mode, devices)
      assert abs(loss - ref_loss) <= 1e-5
  # Sanity: the runs really trained (the comparison is not between untouched inits).
  initial = step_lib.create_train_state(models.create_model("keras", widths=(8, 16), block_depth=1),
                                     step_lib.StepConfig(), jax.random.key(0), 16)
  assert _max_diff(reference.params, initial.params) > 1e-3


@pytest.mark.slow
def test_bf16_training_from_the_config_keeps_float32_state_and_tracks_float32():
  """config.model.dtype="bfloat16": bf16 activations, every state leaf (params, BatchNorm statistics,
  AdamW moments, EMA) float32, finite, and 5 steps close to the float32 run."""
  config = configs.load_config("demo", ["--config.model.dtype=bfloat16"])
  model = models.create_model(**config.model)
  assert model.dtype == jnp.bfloat16
  activations = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 1, 1, 1)), train=False,
      capture_intermediates=True)[1]["intermediates"])
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(activations))  # really computed in bf16
  fp32, fp32_loss = _run_steps("shard_map", 2)
  bf16, bf16_loss = _run_steps("shard_map", 2, dtype=config.model.dtype)
  leaves = jax.tree.leaves(bf16)
  assert all(x.dtype in (np.float32, np.int32) for x in leaves if hasattr(x, "dtype")), {str(x.dtype) for x in leaves}
  assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
  assert abs(bf16_loss - fp32_loss) <= 0.02 * abs(fp32_loss), (bf16_loss, fp32_loss)
  # The weights' 5-step change agrees with float32's to a few percent (measured: 2.5%), in norm.
  initial = step_lib.create_train_state(models.create_model("keras", widths=(8, 16), block_depth=1),
                                     step_lib.StepConfig(), jax.random.key(0), 16)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
  moved = np.linalg.norm(flat(fp32.params) - flat(initial.params))
  apart = np.linalg.norm(flat(bf16.params) - flat(fp32.params))
  assert 0 < apart <= 0.1 * moved, (apart, moved)  # > 0: it really ran in bf16
  with pytest.raises(ValueError, match="config.model.dtype='float16' is invalid"):
    models.create_model(**configs.load_config("demo", ["--config.model.dtype=float16"]).model)


@pytest.mark.slow
def test_steps_per_call_scan_equals_single_steps():
  single, _ = _run_steps("shard_map", 2, num_steps=4, steps_per_call=1)
  fused, _ = _run_steps("shard_map", 2, num_steps=4, steps_per_call=2)  # the same 4 batches, 2 per call
  assert int(fused.step) == int(single.step) == 4
  assert _max_diff(fused.params, single.params) <= 1e-5


@pytest.mark.slow
def test_multi_host_two_processes_equal_one_process(tmp_path, cache_dir):
  """2 processes x 2 CPU devices (jax.distributed, gloo, 127.0.0.1) == 1 process x 4 devices.

  With the sample grids and KID (random Inception weights from a test file) that the default
  preset turns on: both run on every process and give the single process's numbers.
  """
  import torch
  from inception_helpers import random_torch_inception
  inception_file = tmp_path / "random_inception.pth"
  torch.save(random_torch_inception("torchvision", seed=3).state_dict(), inception_file)
  extra = {"train.num_steps": 4, "train.sample_every": 2, "train.kid_every": 2, "eval.inception_weights":
           str(inception_file), "eval.num_kid_images": 8, "eval.kid_batch_size": 4, "eval.kid_steps": 2}
  single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
  result = run(train_command(single_dir, cache_dir, **extra), subprocess_env(4))
  assert result.returncode == 0, result.stderr[-3000:]
  procs = two_processes(train_command(multi_dir, cache_dir, **extra))
  procs.communicate(timeout=600)
  assert [p.returncode for p in procs] == [0, 0], procs.report()
  (single_step, single, _), (multi_step, multi, _) = final_state(single_dir), final_state(multi_dir)
  assert single_step == multi_step == 4
  # Every leaf: raw and EMA weights, BatchNorm statistics, AdamW moments (nu to 1e-4 relative).
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 if "nu" not in str(path) else 0,
                               err_msg=jax.tree_util.keystr(path))
  for step in (2, 4):  # the sample grids (written by process 0) are the single process's
    pngs = [_png(d / "samples" / f"step_{step:07d}.png").astype(int) for d in (single_dir, multi_dir)]
    assert np.abs(pngs[0] - pngs[1]).max() <= 1, step
  kids = [{r["step"]: r["val_kid"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
           if "val_kid" in r} for d in (single_dir, multi_dir)]
  assert sorted(kids[1]) == [2, 4] and kids[1][2] != kids[1][4]
  for step, value in kids[0].items():
    assert kids[1][step] == pytest.approx(value, rel=1e-3, abs=1e-6), step


@pytest.mark.slow
def test_two_processes_prepare_the_data_once(tmp_path, two_process_reference):
  """Process 0 builds the data cache while process 1 waits, then process 1 reads it (the shared
  2-process run started with an empty cache); when process 0 fails to prepare the data, process 1
  stops with one line pointing at it (exit 2, no traceback)."""
  stdout = two_process_reference.stdout
  assert "process 0: prepared the data cache" in stdout[0], stdout[0][-2000:]
  assert "prepared the data cache" not in stdout[1], stdout[1][-2000:]  # it found process 0's
  cache = two_process_reference.cache_dir
  assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 1

  procs = two_processes(train_command(tmp_path / "bad", tmp_path / "cache", **{"data.dataset": "folder",
                                                                   "data.folder": str(tmp_path / "missing")}))
  outputs = procs.communicate(timeout=600)
  assert [p.returncode for p in procs] == [2, 2], procs.report()
  assert "does not exist (config.data.folder)" in outputs[0][1], procs.report()
  assert "process 0 did not finish the data cache" in outputs[1][1] and "Traceback" not in outputs[1][1], procs.report()


# ------------------------------------------------------------------------------------------------
# Resume and preemption.


# A run long enough (2,000 tiny steps, ~5 s after start-up) that a signal sent once training is
# under way lands mid-run; the tests assert that it did.
LONG = {"train.num_steps": 2000, "train.checkpoint_every": 100, "train.log_every": 10}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
  """(step, state, meta) of the newest checkpoint of an uninterrupted LONG run of the tiny config."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = run(train_command(workdir, cache_dir, **LONG), subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  return final_state(workdir)


def _checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _training_under_way(workdir) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and os.path.getsize(path) > 0


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resume_is_exact(tmp_path, cache_dir, uninterrupted):
  workdir = tmp_path / "run"
  cmd = train_command(workdir, cache_dir, **LONG)
  proc = subprocess.Popen(cmd, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert wait_until(lambda: _training_under_way(workdir), proc), "training never started"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  # The signal landed mid-run: the current step was saved and the run stopped there.
  steps = _checkpoint_steps(workdir)
  assert steps and 0 < steps[-1] < 2000, steps
  assert f"preemption notice: saved step {steps[-1]}, exiting cleanly" in out, out[-2000:]
  result = run(cmd, subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from step {steps[-1]}" in result.stdout
  assert_same_state(final_state(workdir), uninterrupted)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, cache_dir, two_process_reference):
  """A SIGTERM to ONE process makes both save the same step and exit 0; the resumed run equals an
  uninterrupted one bit for bit.

  Two steps per call (conftest.TWO_PROCESS_RUN): JAX's preemption sync point is matched by the
  loop's call counter, which a step number (advancing by 2) would never equal.
  """
  workdir = tmp_path / "run"
  cmd = train_command(workdir, cache_dir, **TWO_PROCESS_RUN)
  procs = two_processes(cmd)
  assert wait_until(lambda: _training_under_way(workdir), procs[0], timeout=TWO_PROCESS_START_S), \
      f"training never started\n{procs.report()}"
  procs[1].send_signal(signal.SIGTERM)
  outputs = procs.communicate(timeout=600)
  assert [p.returncode for p in procs] == [0, 0], procs.report()
  steps = _checkpoint_steps(workdir)
  assert steps and 0 < steps[-1] < 100, (steps, procs.report())  # mid-run
  assert f"preemption notice: saved step {steps[-1]}, exiting cleanly" in outputs[0][0], procs.report()
  procs = two_processes(cmd)
  procs.communicate(timeout=600)
  assert [p.returncode for p in procs] == [0, 0], procs.report()
  assert_same_state(final_state(workdir), final_state(two_process_reference.workdir))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path, cache_dir, uninterrupted):
  workdir = tmp_path / "run"
  cmd = train_command(workdir, cache_dir, **LONG)
  rng = np.random.default_rng(0)
  for _ in range(2):
    before = _checkpoint_steps(workdir)
    proc = subprocess.Popen(cmd, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for a checkpoint newer than those the run resumed from, then kill at a random point.
    assert wait_until(lambda: _checkpoint_steps(workdir)[-1:] > before[-1:], proc), "no new checkpoint"
    time.sleep(float(rng.uniform(0.0, 1.0)))
    proc.kill()
    proc.wait()
    # Each kill hit a running process, before the end of training.
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoint_steps(workdir)[-1] < 2000
  result = run(cmd, subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_state(final_state(workdir), uninterrupted)
  # The steps logged after the restored checkpoints and trained again are in metrics.jsonl once.
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged == list(range(10, 2001, 10)), logged[:50]


# ------------------------------------------------------------------------------------------------
# Guards.


@pytest.mark.slow
def test_non_finite_loss_exits_3_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, cache_dir, capsys):
  """Through the CLI, as the README promises: exit status 3, one line naming the step; checkpoints finite."""
  overrides = tiny_overrides(cache_dir, **{"train.learning_rate": "1e30", "train.num_steps": "20",
                                           "train.checkpoint_every": "1", "train.log_every": "1"})
  assert cli.main(["train", "--config", "demo", "--workdir", str(tmp_path), *overrides]) == 3
  err = capsys.readouterr().err.strip().split("\n")[-1]  # after the progress bar
  assert re.fullmatch(r"ddim-jax train: error: non-finite loss at step \d+ .*last good checkpoint \(step \d+\).*",
                      err), err
  weights = final_weights(tmp_path)
  assert all(np.all(np.isfinite(v)) for v in weights.values())


@pytest.mark.parametrize("override,key", [
    ("--config.train.ema_decay=1.5", "config.train.ema_decay"),
    ("--config.train.stepz=3", "unknown config key 'train.stepz'"),
])
def test_bad_config_through_the_cli_exits_2_with_one_line(tmp_path, cache_dir, capsys, override, key):
  assert cli.main(["train", "--config", "demo", "--workdir", str(tmp_path), *tiny_overrides(cache_dir),
                   override]) == 2
  err = capsys.readouterr().err
  assert err.startswith("ddim-jax train: error: ") and key in err and err.count("\n") == 1, err
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("override,key", [
    ({"train.num_steps": "-5"}, "train.num_steps"),
    ({"train.batch_size": "6"}, "train.batch_size"),  # 4 devices in the tests
    ({"train.ema_decay": "1.5"}, "train.ema_decay"),
    ({"train.loss": "huber"}, "train.loss"),
    ({"parallel": "pjit"}, "parallel"),
    ({"cpu_devices": "two"}, "cpu_devices"),
    ({"model.image_size": "15"}, "image_size"),
])
def test_bad_config_values_fail_before_compilation(tmp_path, cache_dir, override, key):
  config = tiny_config(cache_dir, **override)
  start = time.time()
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  assert time.time() - start < 5  # nothing was compiled or loaded
  assert not os.path.exists(tmp_path / "checkpoints")


# ------------------------------------------------------------------------------------------------
# What a run leaves behind.


def _png(path) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_demo_writes_its_weight_file_sample_grids_and_final_samples(tmp_path, cache_dir):
  """`ddim-jax demo`: demo.safetensors holds the final EMA weights; every samples/step_N.png is the
  EMA model of step N sampled from the same fixed noise (key seed + 1); samples.png exists."""
  workdir = tmp_path / "demo"
  overrides = tiny_overrides(cache_dir, **{"train.sample_every": "4", "train.checkpoint_every": "4",
                                           "train.keep_checkpoints": "2"})
  assert cli.main(["demo", "--workdir", str(workdir), *overrides]) == 0
  config = tiny_config(cache_dir, **{"train.sample_every": "4"})
  model, variables, normalizer, metadata = weight_files.load_weights(str(workdir / "demo.safetensors"))
  assert (metadata["weights"], int(metadata["step"])) == ("ema", 8)
  ema = final_weights(workdir, ema=True)
  raw = final_weights(workdir, ema=False)
  written = weight_files.flax_to_torch_state_dict(variables)
  for name, value in written.items():
    np.testing.assert_array_equal(value, ema[name], err_msg=name)
  assert any(np.max(np.abs(ema[k] - raw[k])) > 1e-6 for k in written)  # EMA, not the raw weights
  assert _png(workdir / "samples.png").shape[:2] == grids.make_grid(
      np.zeros((int(config.sample.num_images), 16, 16, 3)), upscale=4).shape[:2]

  saved = {}
  for step in (4, 8):
    saved[step] = _png(workdir / "samples" / f"step_{step:07d}.png")
  noise = jax.random.normal(jax.random.key(int(config.seed) + 1), (int(config.sample.num_images), 16, 16, 3))
  images = sampling.generate(model, variables, noise, normalizer, steps=int(config.sample.steps))["images"]
  want = grids.make_grid(np.asarray(images), upscale=4)
  assert np.abs(saved[8].astype(int) - want).max() <= 1
  assert np.abs(saved[4].astype(int) - saved[8]).mean() > 0.5  # the model of step 4 draws other images
