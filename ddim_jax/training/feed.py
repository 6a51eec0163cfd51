"""The training input on the devices, and the calls of K steps (``CallPlan``).

Placements (``train.data_placement``; "auto" picks "device" when the uint8 training set fits in
``DEVICE_FRACTION`` of the smallest device's memory, ``CPU_DEVICE_BYTES`` on CPU):

  "device"  the uint8 training set is put on every device once; each step receives only batch
            *indices* and gathers and converts the images on the device.
  "host"    a background thread gathers uint8 batches and uploads them ahead (2 in flight).

Either way the step trains on ``UNIT_FLOAT[uint8]`` (k / 255 in float32): bit-identical to the
host's ``data.BatchIterator``, whose order, resume position and multi-host split the feed follows
(each batch carries the iterator position after it, so a checkpoint saves what was trained).

``CallPlan``: ``train.steps_per_call`` steps per compiled call (``lax.scan``), which divides the
host's per-call cost (dispatching the donated state, ~1 us per leaf) by K; a call that would pass
over an event (log, checkpoint, samples, KID, a profile edge, the last step) runs single steps, so
every event happens at its own step whatever K is. Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors
from ddim_jax.infra import parallel

PLACEMENTS = ("auto", "device", "host")
DEVICE_FRACTION = 0.25  # of a device's memory, at most, for the dataset (the model's state is tiny)
CPU_DEVICE_BYTES = 2 << 30  # CPU "devices" share the host's memory: every device holds a copy
PREFETCH = 2  # uint8 batches uploaded ahead in "host" placement

# k / 255 in float32, as data.BatchIterator computes it on the host.
UNIT_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def to_unit_float(images_u8):
  """uint8 images -> float32 in [0, 1], bit-identical to the host's ``BatchIterator`` (a 256-entry table)."""
  return jnp.take(jnp.asarray(UNIT_FLOAT), images_u8.astype(jnp.int32), axis=0)


@dataclasses.dataclass(frozen=True)
class CallPlan:
  """How many optimiser steps each compiled call of the training loop runs (a pure function of the step).

  ``steps_per_call`` K, unless an event lies strictly inside the next K steps: a multiple of one of
  ``intervals`` (0: off), one of ``marks``, or ``num_steps`` (None: no end); then 1. So a run, and a
  run resumed from any call boundary, make the same calls.
  """
  steps_per_call: int = 1
  num_steps: int | None = None
  intervals: tuple[int, ...] = ()
  marks: tuple[int, ...] = ()

  def size(self, step: int) -> int:
    """The steps of the call that starts after ``step``."""
    k = self.steps_per_call
    end = step + k
    if k == 1:
      return 1
    if self.num_steps is not None and end > self.num_steps:
      return 1
    # An event strictly inside (step, end): the call would pass over it.
    if any(p > 0 and (end - 1) // p > step // p for p in self.intervals):
      return 1
    if any(step < m < end for m in self.marks):
      return 1
    return k

  def single_steps(self, start: int = 0) -> int:
    """How many single-step calls a run from ``start`` to ``num_steps`` makes (for the start banner)."""
    step, count = start, 0
    while self.num_steps is not None and step < self.num_steps:
      k = self.size(step)
      count += k == 1
      step += k
    return count


def per_device_step(step_fn, placement: str):
  """The per-device step of a placement, around ``train.per_device_step``'s float32 step.

  "device": ``(state, indices, normalizer, base_key, data)``: gathers this device's images from the
  training set ``data`` (uint8 (N, S, S, C)) by ``indices`` ((b,) or (K, b)); "host": ``(state,
  images_u8, normalizer, base_key)``. Both convert with ``to_unit_float`` on the device.
  """
  if placement == "device":
    def gather_step(state, indices, normalizer, base_key, data):
      return step_fn(state, to_unit_float(jnp.take(data, indices, axis=0)), normalizer, base_key)
    return gather_step

  def convert_step(state, images_u8, normalizer, base_key):
    return step_fn(state, to_unit_float(images_u8), normalizer, base_key)
  return convert_step


def choose_placement(requested: str, dataset_bytes: int, mode: str = "shard_map", devices=None) -> str:
  """"device" or "host" for ``train.data_placement`` (see the module docstring)."""
  if requested not in PLACEMENTS:
    raise errors.ConfigError(f"config.train.data_placement={requested!r} is invalid: choose one of {PLACEMENTS}")
  if mode == "pmap":  # pmap would broadcast a replicated argument at every call
    return "host"
  if requested != "auto":
    return requested
  devices = jax.local_devices() if devices is None else devices
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory statistics)
      stats = {}
    limits.append(stats.get("bytes_limit") or (CPU_DEVICE_BYTES / DEVICE_FRACTION if d.platform == "cpu" else 0))
  budget = min(limits) * DEVICE_FRACTION if limits and min(limits) > 0 else 0
  return "device" if dataset_bytes <= budget else "host"


class TrainFeed:
  """The training batches as the compiled step wants them; see the module docstring.

  ``next()`` returns ``(batch, position)``: the argument for the step (global indices, or a global
  uint8 batch; with a leading K axis for a call of K > 1 steps) and the iterator position after that
  batch (for the checkpoint). ``data`` is the uint8 training set on the devices ("device" placement)
  or None. ``plan``: a ``CallPlan``, or K for K steps in every call; ``start_step``: the step the
  first call starts after (a resumed run's).
  """

  def __init__(self, train_iter, mesh, plan: CallPlan | int = 1, placement: str = "auto", mode: str = "shard_map",
               start_step: int = 0):
    self.iter = train_iter
    self.mesh = mesh
    self.plan = plan if isinstance(plan, CallPlan) else CallPlan(int(plan))
    self.step = int(start_step)  # of the next batch made (the thread's, in "host" placement)
    self.mode = mode
    self.placement = choose_placement(placement, int(train_iter.images.nbytes), mode, mesh.local_devices)
    self.data = None
    self._queue = None
    self._thread = None
    self._stop = threading.Event()
    self._error = None
    if self.placement == "device":
      # Every process holds the whole (identical) training set; the replicated global array is built
      # from each process's copy.
      self.data = parallel.replicate(np.ascontiguousarray(train_iter.images), mesh)
    else:
      self._queue = queue.Queue(maxsize=PREFETCH)
      self._thread = threading.Thread(target=self._produce, name="ddim-jax-feed", daemon=True)
      self._thread.start()

  def make_train_fn(self, step_fn_for):
    """The training function for this feed: ``fn(state, batch, normalizer, base_key)`` with ``batch`` from ``next``.

    ``step_fn_for(k)``: the per-device float32 step of k optimiser steps (``train.per_device_step``).
    The call size is read from the batch (a leading K axis or none); each size is compiled once.
    """
    compiled = {}
    data = (self.data,) if self.placement == "device" else ()

    def fn(state, batch, normalizer, base_key):
      k = self.steps_of(batch, self.placement)
      if k not in compiled:
        compiled[k] = parallel.make_train_fn(per_device_step(step_fn_for(k), self.placement), self.mesh, self.mode, k,
                                             with_data=bool(data))
      return compiled[k](state, batch, normalizer, base_key, *data)
    return fn

  @staticmethod
  def steps_of(batch, placement: str) -> int:
    """The optimiser steps of a call on ``batch``: its leading K axis, or 1 for (b,) indices or (b, S, S, C) images."""
    return 1 if np.ndim(batch) == (1 if placement == "device" else 4) else int(np.shape(batch)[0])

  def describe(self) -> str:
    """For the start banner."""
    size = self.iter.images.nbytes / 2**20
    if self.placement == "device":
      return f"on the devices ({size:.1f} MiB uint8, uploaded once; the step gathers by index)"
    return f"uint8 batches uploaded ahead by a background thread ({size:.1f} MiB uint8 set)"

  def _local_indices(self) -> np.ndarray:
    """This process's indices of the next call: (b,) or (K, b); advances the feed's step."""
    k = self.plan.size(self.step)
    self.step += k
    indices = [self.iter.next_indices() for _ in range(k)]
    return indices[0] if k == 1 else np.stack(indices)

  def _host_batch(self, indices: np.ndarray):
    images = self.iter.images[indices]  # uint8 gather: a memcpy, no float conversion
    if self.mode == "pmap":
      return images
    return parallel.shard_batch(images, self.mesh, len(indices) if indices.ndim == 2 else 1)

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        indices = self._local_indices()
        item = (self._host_batch(indices), self.iter.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except Exception as e:  # noqa: BLE001  (re-raised in the loop's thread by next())
      self._error = e
      self._queue.put(None)

  def next(self):
    """(the step's batch argument, the iterator position after it)."""
    if self.placement == "device":
      indices = self._local_indices().astype(np.int32)
      return parallel.shard_batch(indices, self.mesh, len(indices) if indices.ndim == 2 else 1), self.iter.get_state()
    item = self._queue.get()
    if item is None:
      raise self._error
    return item

  def close(self) -> None:
    """Stops the background thread (host placement); idempotent."""
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        try:
          self._queue.get_nowait()
        except queue.Empty:
          pass
        self._thread.join(timeout=0.1)
      self._thread = None
