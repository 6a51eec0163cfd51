"""The training input on the devices: the uint8 dataset uploaded once, or uint8 batches uploaded ahead.

The host used to build every batch itself: a float32 lookup of the whole batch (x / 255) and a
float32 upload of 4 bytes per pixel, every step (1.3-3 ms of host work per batch of 64 64x64 images,
a third of an H200 step). Here the host sends only what it must:

  "device"  the whole uint8 training set is put on every device once (flowers at 64x64: 80 MB); each
            step receives this process's batch *indices* (a few hundred bytes), and the step gathers
            the images and converts them on the device.
  "host"    (a training set too large for the rule below, or ``config.parallel="pmap"``) a background
            thread gathers uint8 batches and uploads them ahead of the loop (2 in flight); the step
            converts them on the device.

Either way the step trains on ``UNIT_FLOAT[uint8]``, the float32 table of k / 255, the very numbers
``data.BatchIterator`` yields on the host (``np.float32(k) / np.float32(255)``): the images are
bit-identical to the host path's (tested: same batches, losses and weights after N steps on 1 and 4
devices and 2 processes). The order, the resume position and the multi-host split are
``BatchIterator``'s: the feed asks it for indices (``next_indices``) and reports, with every batch,
the iterator position after it, so that a checkpoint saves the position of what was trained, not of
what was prefetched.

Rule (``train.data_placement="auto"``): "device" when the uint8 training set takes at most
``DEVICE_FRACTION`` of the smallest local device's memory (``memory_stats()["bytes_limit"]``; CPU
devices report none: at most ``CPU_DEVICE_BYTES``), else "host".
"""

from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import errors, parallel

PLACEMENTS = ("auto", "device", "host")
DEVICE_FRACTION = 0.25  # of a device's memory, at most, for the dataset (the model's state is tiny)
CPU_DEVICE_BYTES = 2 << 30  # CPU "devices" share the host's memory: every device holds a copy
PREFETCH = 2  # uint8 batches uploaded ahead in "host" placement

# k / 255 in float32, as data.BatchIterator computes it on the host.
UNIT_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def to_unit_float(images_u8):
  """uint8 images -> float32 in [0, 1], bit-identical to the host's ``BatchIterator`` (a 256-entry table)."""
  return jnp.take(jnp.asarray(UNIT_FLOAT), images_u8.astype(jnp.int32), axis=0)


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
  uint8 batch) and the iterator position after that batch (for the checkpoint). ``data`` is the
  uint8 training set on the devices ("device" placement) or None.
  """

  def __init__(self, train_iter, mesh, steps_per_call: int = 1, placement: str = "auto", mode: str = "shard_map"):
    self.iter = train_iter
    self.mesh = mesh
    self.steps_per_call = int(steps_per_call)
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

  def make_train_fn(self, step_fn):
    """The compiled step for this feed: ``fn(state, batch, normalizer, base_key)`` with ``batch`` from ``next``."""
    fn = parallel.make_train_fn(per_device_step(step_fn, self.placement), self.mesh, self.mode, self.steps_per_call,
                                with_data=self.placement == "device")
    if self.placement != "device":
      return fn
    data = self.data
    return lambda state, batch, normalizer, base_key: fn(state, batch, normalizer, base_key, data)

  def describe(self) -> str:
    """For the start banner."""
    size = self.iter.images.nbytes / 2**20
    if self.placement == "device":
      return f"on the devices ({size:.1f} MiB uint8, uploaded once; the step gathers by index)"
    return f"uint8 batches uploaded ahead by a background thread ({size:.1f} MiB uint8 set)"

  def _local_indices(self) -> np.ndarray:
    indices = [self.iter.next_indices() for _ in range(self.steps_per_call)]
    return indices[0] if self.steps_per_call == 1 else np.stack(indices)

  def _host_batch(self, indices: np.ndarray):
    images = self.iter.images[indices]  # uint8 gather: a memcpy, no float conversion
    if self.mode == "pmap":
      return images
    return parallel.shard_batch(images, self.mesh, self.steps_per_call)

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
      return parallel.shard_batch(indices, self.mesh, self.steps_per_call), self.iter.get_state()
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
