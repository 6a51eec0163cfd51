"""The training input on the devices (ddim_jax/feed.py): the same images, losses and weights as the
host path, bit for bit, in both placements, on 1 and 4 devices and on 2 processes; the checkpoint's
data position is the position of what was trained, not of what was prefetched."""

import json
import subprocess

import jax
import numpy as np
import pytest

from ddim_jax import data, feed, models, parallel, train
from train_helpers import final_state, free_port, run, subprocess_env, tiny_config, train_command, two_processes


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One preprocessed-data cache (the bundled digits), the one of tests/test_train.py."""
  return tmp_path_factory.getbasetemp().parent / "data_cache"


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
  state = parallel.replicate(train.create_train_state(model, step_config, jax.random.key(0), 16), mesh)
  key = parallel.replicate(jax.random.key_data(jax.random.key(1)), mesh)
  normalizer = parallel.replicate(normalizer, mesh)
  step_fn = train.per_device_step(model, step_config, steps_per_call, parallel.AXIS)
  losses = []
  if placement is None:
    fn = parallel.make_train_fn(step_fn, mesh, "shard_map", steps_per_call)
    for batch in batches_or_feed:
      state, metrics = fn(state, batch, normalizer, key)
      losses.append(float(metrics["loss"]))
  else:
    fn = batches_or_feed.make_train_fn(step_fn)
    for _ in range(calls):
      batch, _ = batches_or_feed.next()
      state, metrics = fn(state, batch, normalizer, key)
      losses.append(float(metrics["loss"]))
    batches_or_feed.close()
  return jax.device_get(state), losses


@pytest.mark.parametrize("devices,steps_per_call", [(1, 1), (4, 1), (4, 2)])
def test_both_placements_train_bit_identically_to_the_host_path(cache_dir, devices, steps_per_call):
  calls = 3
  config, reference_iter, normalizer = _iterator(cache_dir)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  step_config = train.StepConfig.from_config(config)
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


def test_two_processes_train_the_same_in_both_placements(tmp_path, cache_dir):
  """2 processes x 2 devices: the uint8 batches each process uploads == the indices into the set on
  the devices, bit for bit."""
  states = {}
  for placement in ("device", "host"):
    workdir = tmp_path / placement
    procs = two_processes(train_command(workdir, cache_dir, **{"train.num_steps": 4,
                                                               "train.data_placement": placement}), free_port())
    for p in procs:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
    states[placement] = final_state(workdir)
  (step_a, a, _), (step_b, b, _) = states["device"], states["host"]
  assert step_a == step_b == 4
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
