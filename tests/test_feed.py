"""The training input on the devices (ddim_jax/training/feed.py): the same images, losses and weights as the
host path, bit for bit, in both placements, on 1 and 4 devices and on 2 processes; the checkpoint's
data position is the position of what was trained, not of what was prefetched."""

import json

import jax
import numpy as np
import pytest

from ddim_jax import data
from ddim_jax.core import models, step as step_lib
from ddim_jax.infra import parallel
from ddim_jax.training import feed, trainer
from train_helpers import (TWO_PROCESS_RUN, final_state, free_port, run, subprocess_env, tiny_config, train_command, two_processes,
                           assert_same_state)


def test_to_unit_float_is_the_host_division_for_every_byte():
  values = np.arange(256, dtype=np.uint8)
  host = values.astype(np.float32) / np.float32(255.0)
  np.testing.assert_array_equal(np.asarray(jax.jit(feed.to_unit_float)(values)).view(np.uint32), host.view(np.uint32))


def _iterator(cache_dir, batch=8):
  config = tiny_config(cache_dir, **{"train.batch_size": batch})
  train_iter, _, normalizer = data.create_datasets(config, 16)
  return config, train_iter, normalizer


def _host_float_batches(train_iter, count, steps_per_call):
  """The batches of the host path before the feed: BatchIterator's float32 images."""
  out = []
  for _ in range(count):
    batches = [next(train_iter)["images"] for _ in range(steps_per_call)]
    out.append(batches[0] if steps_per_call == 1 else np.stack(batches))
  return out


def _run(mesh, step_config, model, normalizer, batches_or_feed, calls, steps_per_call, placement=None):
  state = parallel.replicate(step_lib.create_train_state(model, step_config, jax.random.key(0), 16), mesh)
  key = parallel.replicate(jax.random.key_data(jax.random.key(1)), mesh)
  normalizer = parallel.replicate(normalizer, mesh)
  step_fn = step_lib.per_device_step(model, step_config, steps_per_call, parallel.AXIS)
  losses = []
  if placement is None:
    fn = parallel.make_train_fn(step_fn, mesh, "shard_map", steps_per_call)
    for batch in batches_or_feed:
      state, metrics = fn(state, batch, normalizer, key)
      losses.append(float(metrics["loss"]))
  else:
    fn = batches_or_feed.make_train_fn(lambda k: step_lib.per_device_step(model, step_config, k, parallel.AXIS))
    for _ in range(calls):
      batch, _ = batches_or_feed.next()
      state, metrics = fn(state, batch, normalizer, key)
      losses.append(float(metrics["loss"]))
    batches_or_feed.close()
  return jax.device_get(state), losses


@pytest.mark.parametrize("devices,steps_per_call", [(1, 1), (4, 2)])  # (4, 1): each half is covered
@pytest.mark.slow
def test_both_placements_train_bit_identically_to_the_host_path(cache_dir, devices, steps_per_call):
  calls = 3
  config, reference_iter, normalizer = _iterator(cache_dir)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  step_config = step_lib.StepConfig.from_config(config)
  mesh = parallel.create_mesh(jax.devices()[:devices])
  want_state, want_losses = _run(mesh, step_config, model, normalizer,
                                 _host_float_batches(reference_iter, calls, steps_per_call), calls, steps_per_call)
  for placement in ("device", "host"):
    _, train_iter, _ = _iterator(cache_dir)
    train_feed = feed.TrainFeed(train_iter, mesh, steps_per_call, placement)
    assert train_feed.placement == placement
    state, losses = _run(mesh, step_config, model, normalizer, train_feed, calls, steps_per_call, placement)
    assert losses == want_losses, placement
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{placement} {jax.tree_util.keystr(path)}")


def test_the_device_gather_yields_the_iterators_images(cache_dir):
  """The images the step sees are BatchIterator's float32 images, batch after batch (bitwise)."""
  _, train_iter, _ = _iterator(cache_dir)
  _, reference_iter, _ = _iterator(cache_dir)
  mesh = parallel.create_mesh(jax.devices()[:4])
  train_feed = feed.TrainFeed(train_iter, mesh, 1, "device")
  gather = jax.jit(lambda data, idx: feed.to_unit_float(data[idx]))
  for _ in range(5):
    indices, position = train_feed.next()
    want = next(reference_iter)["images"]
    np.testing.assert_array_equal(np.asarray(gather(train_feed.data, indices)), want)
    assert position == reference_iter.get_state()


def test_host_placement_reports_the_position_of_what_was_trained(cache_dir):
  """The background thread runs ahead of the loop; each batch carries the position after *it*."""
  _, train_iter, _ = _iterator(cache_dir)
  _, reference_iter, _ = _iterator(cache_dir)
  mesh = parallel.create_mesh(jax.devices()[:2])
  train_feed = feed.TrainFeed(train_iter, mesh, 1, "host")
  try:
    for _ in range(4):
      batch, position = train_feed.next()
      want = next(reference_iter)["images"]
      np.testing.assert_array_equal(np.asarray(feed.to_unit_float(np.asarray(batch))), want)
      assert position == reference_iter.get_state()
    assert train_iter.get_state() != reference_iter.get_state()  # it did run ahead
  finally:
    train_feed.close()


def test_placement_rule(monkeypatch):
  class Device:
    platform = "gpu"

    def __init__(self, limit):
      self.limit = limit

    def memory_stats(self):
      return {"bytes_limit": self.limit}

  gpus = [Device(80 << 30), Device(40 << 30)]
  assert feed.choose_placement("auto", 10 << 30, devices=gpus) == "device"  # 10 GiB <= 40 GiB / 4
  assert feed.choose_placement("auto", 11 << 30, devices=gpus) == "host"
  assert feed.choose_placement("device", 11 << 30, devices=gpus) == "device"
  assert feed.choose_placement("auto", 1, mode="pmap", devices=gpus) == "host"
  with pytest.raises(ValueError, match="data_placement"):
    feed.choose_placement("gpu", 1, devices=gpus)


@pytest.mark.slow
def test_a_host_placement_run_resumes_exactly(tmp_path, cache_dir):
  """Stopped at step 4 and resumed (host placement, prefetching ahead) == 8 steps in one go (device)."""
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  assert run(train_command(whole, cache_dir), subprocess_env(1)).returncode == 0
  host = {"train.data_placement": "host"}
  for steps in (4, 8):
    result = run(train_command(parts, cache_dir, **host, **{"train.num_steps": steps}), subprocess_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uint8 batches uploaded ahead" in result.stdout
  (step_a, a, meta_a), (step_b, b, meta_b) = final_state(whole), final_state(parts)
  assert step_a == step_b == 8 and meta_a["data_iterator"] == meta_b["data_iterator"]
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_two_processes_train_the_same_in_both_placements(tmp_path, cache_dir, two_process_reference):
  """2 processes x 2 devices: the uint8 batches each process uploads == the indices into the set on
  the devices (the shared 2-process run, conftest.two_process_reference), bit for bit."""
  assert "input      on the devices" in two_process_reference.stdout[0]
  workdir = tmp_path / "host"
  procs = two_processes(train_command(workdir, cache_dir, **{**TWO_PROCESS_RUN, "train.data_placement": "host"}),
                        free_port())
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  (step_a, a, _), (step_b, b, _) = final_state(two_process_reference.workdir), final_state(workdir)
  assert step_a == step_b == TWO_PROCESS_RUN["train.num_steps"]
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# Several steps per call: every event at its own step, whatever K.


def _calls(plan, start):
  sizes, step = [], start
  while step < plan.num_steps:
    sizes.append(plan.size(step))
    step += sizes[-1]
  return sizes


def test_the_call_plan_lands_on_every_event():
  plan = feed.CallPlan(8, num_steps=200, intervals=(50, 1000, 0, 37), marks=(13, 21))
  sizes = _calls(plan, 0)
  ends = set(np.cumsum(sizes).tolist())
  events = {s for s in range(1, 201) if s % 50 == 0 or s % 37 == 0 or s in (13, 21, 200)}
  assert events <= ends  # no call passes over an event
  assert set(sizes) == {1, 8} and sizes.count(8) >= 15  # and the rest runs 8 steps per call
  assert plan.single_steps(0) == sizes.count(1)
  for i, start in enumerate(np.cumsum(sizes).tolist()):  # resumed after any call: the whole run's calls from there
    assert _calls(plan, start) == sizes[i + 1:]
  assert _calls(feed.CallPlan(1, 7), 0) == [1] * 7
  assert _calls(feed.CallPlan(4, 8, (4, 8)), 0) == [4, 4]  # multiples: no single steps at all


def test_the_events_at_a_step(cache_dir):
  """trainer.events_at: each interval at its own step; a KID step also saves (the best-KID checkpoint
  exists to be kept); the last step and a preemption log and save; KID off (kid_every 0) never KID."""
  config = tiny_config(cache_dir, **{"train.num_steps": 60, "train.log_every": 4, "train.checkpoint_every": 10,
                                     "train.sample_every": 6})

  def at(step, preempted=False, kid_every=15):
    return trainer.events_at(step, config, preempted, kid_every)

  assert at(4) == trainer.Events(log=True, save=False, kid=False, sample=False)
  assert at(10) == trainer.Events(log=False, save=True, kid=False, sample=False)
  assert at(6) == trainer.Events(log=False, save=False, kid=False, sample=True)
  assert at(15) == trainer.Events(log=False, save=True, kid=True, sample=False)
  assert at(15, kid_every=0) == trainer.Events(log=False, save=False, kid=False, sample=False)
  assert at(7, preempted=True) == trainer.Events(log=True, save=True, kid=False, sample=False)
  assert at(60) == trainer.Events(log=True, save=True, kid=True, sample=True)
  assert at(1) == trainer.Events(log=False, save=False, kid=False, sample=False)


@pytest.mark.slow
def test_k_steps_per_call_with_events_between_is_bit_identical_in_both_placements(cache_dir):
  """A plan of 4 steps per call with single-step calls between: the device gather and the host
  thread give the same losses and weights as the host path making the same calls."""
  config, reference_iter, normalizer = _iterator(cache_dir)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  step_config = step_lib.StepConfig.from_config(config)
  mesh = parallel.create_mesh(jax.devices()[:2])
  plan = feed.CallPlan(4, num_steps=11, intervals=(6,))
  sizes = _calls(plan, 0)
  assert sizes == [4, 1, 1, 4, 1]
  state = parallel.replicate(step_lib.create_train_state(model, step_config, jax.random.key(0), 16), mesh)
  key = parallel.replicate(jax.random.key_data(jax.random.key(1)), mesh)
  norm = parallel.replicate(normalizer, mesh)
  want_losses = []
  for k in sizes:
    fn = parallel.make_train_fn(step_lib.per_device_step(model, step_config, k, parallel.AXIS), mesh, "shard_map", k)
    batch = _host_float_batches(reference_iter, 1, k)[0]
    state, metrics = fn(state, batch, norm, key)
    want_losses.append(float(metrics["loss"]))
  want_state = jax.device_get(state)
  for placement in ("device", "host"):
    _, train_iter, _ = _iterator(cache_dir)
    train_feed = feed.TrainFeed(train_iter, mesh, plan, placement)
    got_state, losses = _run(mesh, step_config, model, normalizer, train_feed, len(sizes), None, placement)
    assert losses == want_losses, placement
    assert int(got_state.step) == 11
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_state), jax.tree.leaves(got_state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{placement} {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_a_run_of_k_steps_per_call_logs_and_saves_at_its_steps_and_resumes_exactly(tmp_path, cache_dir):
  """steps_per_call=4 with intervals it does not divide (log 3, checkpoint 6, 14 steps): metrics and
  checkpoints at exactly their steps, and a run stopped at step 6 and resumed == the run in one go."""
  extra = {"train.steps_per_call": 4, "train.log_every": 3, "train.checkpoint_every": 6, "train.num_steps": 14}
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  result = run(train_command(whole, cache_dir, **extra), subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 steps per call (+ " in result.stdout  # the banner says how the calls go
  logged = [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
  assert logged == [3, 6, 9, 12, 14]
  assert sorted(int(p.name) for p in (whole / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12, 14]
  for steps in (6, 14):
    result = run(train_command(parts, cache_dir, **{**extra, "train.num_steps": steps}), subprocess_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
  assert_same_state(final_state(parts), final_state(whole))
