"""Training batches from the cache: shuffled, repeated, sharded over processes, resumable."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from ddim_jax import errors
from ddim_jax.data.cache import load_normalizer, load_split


class BatchIterator:
  """Batches of a uint8 image array: repeat, shuffle, batch, shard over processes; resumable.

  Keras order of operations: cache -> repeat(repetitions) -> shuffle -> batch(drop_remainder).
  An epoch is one pass over the repeated set (N * repetitions examples). Instead of tf.data's
  640-element shuffle buffer, every epoch is a full permutation of the repeated set drawn from
  ``np.random.default_rng([seed, epoch])`` (a better shuffle; the order is not tf.data's).

  Global batch k of an epoch is positions [k B, (k + 1) B) of that permutation; process p of P
  yields its local part, positions [p B/P, (p + 1) B/P) of the global batch. So the processes
  read disjoint examples, their union is the global batch (and over an epoch the whole
  repeated set), and the global batch does not depend on P. Batches are
  {"images": float32 (B/P, S, S, 3) in [0, 1]} (x / 255, exactly).

  The position is (epoch, index): `get_state` / `set_state` save and restore it, and a restored
  iterator continues with the batches the saved one would have yielded.
  """

  def __init__(self, images: np.ndarray, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, repetitions: int = 1, shuffle: bool = True, drop_remainder: bool = True,
               num_epochs: int | None = None):
    """Args:
      images: uint8 (N, S, S, C), the whole dataset (every process holds it; a memmap works).
      global_batch_size: B, summed over processes; must be divisible by ``process_count``.
      seed: shuffling seed (the same on every process).
      process_index: this process, in [0, process_count).
      process_count: number of processes P.
      repetitions: copies of the dataset per epoch (Keras ``repeat(5)``).
      shuffle: permute every epoch; False keeps the stored order.
      drop_remainder: drop the last incomplete global batch (Keras); otherwise it is yielded and
        split as evenly as possible over the processes.
      num_epochs: stop after this many epochs; None iterates forever.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
      raise errors.InputError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise errors.ConfigError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise errors.ConfigError(f"global batch size {global_batch_size} must be a positive multiple of the "
                               f"process count {process_count}")
    if repetitions < 1:
      raise errors.ConfigError(f"repetitions must be >= 1, got {repetitions}")
    self.images = images
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.repetitions = int(repetitions)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.num_epochs = num_epochs
    self.epoch_size = len(images) * self.repetitions
    if self.drop_remainder:
      self.steps_per_epoch = self.epoch_size // self.global_batch_size
    else:
      self.steps_per_epoch = -(-self.epoch_size // self.global_batch_size)
    if self.steps_per_epoch == 0:
      raise errors.ConfigError(f"{len(images)} images x {repetitions} repetitions make no full batch of "
                               f"{global_batch_size}")
    self._epoch = 0
    self._index = 0
    self._order_epoch = None
    self._order = None
    # x / 255 as a lookup table: the same float32 values as the division, one gather per pixel.
    self._to_float = np.arange(256, dtype=np.float32) / np.float32(255.0)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The global order of example indices (into ``images``) of ``epoch`` (all processes agree)."""
    if self._order_epoch != epoch:
      order = np.tile(np.arange(len(self.images), dtype=np.int64), self.repetitions)
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(order)
      self._order_epoch, self._order = epoch, order
    return self._order

  def local_indices(self, epoch: int, index: int) -> np.ndarray:
    """Indices into ``images`` of this process's part of global batch ``index`` of ``epoch``."""
    start = index * self.global_batch_size
    batch = self.epoch_order(epoch)[start:start + self.global_batch_size]
    n, p, count = len(batch), self.process_index, self.process_count
    return batch[p * n // count:(p + 1) * n // count]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def next_indices(self) -> np.ndarray:
    """This process's indices into ``images`` of the next batch, advancing the position.

    What the training feed uses (it gathers and converts on the devices); ``__next__`` is the same
    batch as float32 images.
    """
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    indices = self.local_indices(self._epoch, self._index)
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return indices

  def __next__(self) -> dict[str, np.ndarray]:
    return {"images": self._to_float[self.images[self.next_indices()]]}

  def get_state(self) -> dict[str, int]:
    """The position: {"epoch", "index"} (next global batch), plain ints for a checkpoint."""
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position saved by `get_state` (from an iterator with the same arguments)."""
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < self.steps_per_epoch:
      raise errors.InputError(f"iterator state {dict(state)} is outside [0, {self.steps_per_epoch}) steps per epoch")
    self._epoch, self._index = epoch, index


def create_datasets(config: Any, image_size: int | None = None, process_index: int = 0,
                    process_count: int = 1) -> tuple[BatchIterator, np.ndarray, dict[str, np.ndarray]]:
  """The training iterator, the validation images and the normaliser of ``config``.

  Args:
    config: the full config (``config.data``, ``config.train.batch_size`` (global), ``config.seed``).
    image_size: side S (default ``config.model.image_size``).
    process_index: ``jax.process_index()`` of the caller.
    process_count: ``jax.process_count()``.

  Returns:
    (train BatchIterator yielding this process's part of each global batch, validation uint8
    (N, S, S, 3) (whole; shard it with a BatchIterator if needed), {"mean", "variance"}).
  """
  image_size = int(image_size or config.model.image_size)
  train_images = load_split(config.data, "train", image_size)
  val_images = load_split(config.data, "validation", image_size)
  normalizer = load_normalizer(config.data, image_size)
  train_iter = BatchIterator(train_images, int(config.train.batch_size), seed=int(config.seed),
                             process_index=process_index, process_count=process_count,
                             repetitions=int(config.data.get("repetitions", 1)), shuffle=True, drop_remainder=True)
  return train_iter, val_images, normalizer
