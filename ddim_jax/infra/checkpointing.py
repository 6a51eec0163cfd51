"""Training checkpoints: an orbax `CheckpointManager` of three items per step (state, meta, info) that
keeps the newest N steps plus the best one and falls back from a step that does not restore.

Only the trainer writes; every other command opens a directory with `read_only=True`. The format,
retention, atomicity, fallback and multi-host rules: docs/checkpoints.md.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from ddim_jax import errors
from ddim_jax.infra import digests, object_store, preemption

_STATE, _META, _INFO = "state", "meta", "info"
QUARANTINE_DIRNAME = "quarantined"
# The metric that ranks checkpoints ("best"): the validation KID that training logs (lower is better).
BEST_METRIC = "val_kid"
_log = logging.getLogger(__name__)


class CheckpointError(errors.Error):
  """Base class of this module's errors."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint restored, but its content does not match the digest written with it."""


class CheckpointRestoreError(CheckpointError):
  """No checkpoint in the directory could be restored."""


class CheckpointRestoreWarning(UserWarning):
  """A checkpoint failed to restore and an older one is tried instead."""


# ----------------------------------------------------------------------------------------------
# Small pure helpers.


def _checked_json(value: Any, what: str) -> Any:
  """Round-trips `value` through JSON so that errors surface now, not in the async writer."""
  try:
    return json.loads(json.dumps(value, allow_nan=True))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from e


def _metrics_to_json(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
  """Metrics as plain floats (jax/numpy scalars are not JSON)."""
  if metrics is None:
    return None
  return {str(k): float(v) for k, v in metrics.items()}


def _metric_score(metrics: Any, name: str, mode: str) -> float:
  """The ranking value of `metrics[name]`; missing or NaN ranks worst instead of crashing orbax."""
  value = metrics.get(name) if isinstance(metrics, Mapping) else None
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = math.nan
  if math.isnan(value):
    return math.inf if mode == "min" else -math.inf
  return value


def _prepare_directory(directory: str | os.PathLike, read_only: bool = False) -> str:
  """Absolute checkpoint directory; a writer's is created if needed and checked for writing.

  Clear errors for files, permissions and (read-only) a missing directory.
  """
  directory = os.fspath(directory)
  if object_store.is_remote(directory):  # gs:// and friends: let orbax/epath deal with remote storage.
    if directory.startswith("s3://"):
      object_store.route_s3_paths_to_tensorstore()
    return directory
  path = pathlib.Path(directory).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"checkpoint directory {path} exists and is not a directory")
  if read_only:
    if not path.is_dir():
      raise errors.MissingInputError(f"no checkpoint directory {path}; train first")
    return str(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise type(e)(e.errno, f"cannot create checkpoint directory {path}: {e.strerror}") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"checkpoint directory {path} is not writable")
  return str(path)


# ----------------------------------------------------------------------------------------------


class Checkpointer:
  """Async orbax checkpoints of one training-state pytree plus JSON metadata.

  Keeps the newest `max_to_keep` steps and, when `best_metric` is given, also the best step by
  that metric. See docs/checkpoints.md for atomicity, fallback and multi-host rules.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "min", async_save: bool = True,
               verify: bool = True, preemption_flag: preemption.PreemptionFlag | None = None, read_only: bool = False):
    """Opens (a writer: creating if needed) a checkpoint directory.

    Args:
      directory: where step directories live; created if missing.
      max_to_keep: how many of the newest steps to keep (None: all).
      best_metric: name of a metric passed to `save`; the best step by it is kept in addition.
      best_mode: "min" or "max": which values of `best_metric` are better.
      async_save: write in a background thread (`save` returns after the device-to-host copy).
      verify: write a digest of the state with each save and check it on restore.
      preemption_flag: flag polled by `reached_preemption`; defaults to `preemption.PREEMPTION_FLAG`.
      read_only: a reader: restores only; writes, creates, cleans up and quarantines nothing
        (`save` raises). Every command but the trainer opens checkpoints this way.

    Raises:
      ValueError: bad `max_to_keep` or `best_mode`.
      NotADirectoryError, PermissionError: the directory is a file or (a writer's) is not writable.
      errors.MissingInputError: a reader's directory does not exist.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise errors.ConfigError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if best_mode not in ("min", "max"):
      raise errors.ConfigError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.read_only = read_only
    self.directory = _prepare_directory(directory, read_only)
    self.max_to_keep = max_to_keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.verify = verify
    self._flag = preemption.PREEMPTION_FLAG if preemption_flag is None else preemption_flag
    self._closed = False
    self._mngr = self._make_manager(async_save)

  def _make_manager(self, async_save: bool) -> ocp.CheckpointManager:
    if self.read_only:
      # No retention policy (a reader deletes nothing), no tmp clean-up, no directory creation.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                             max_to_keep=None, enable_async_checkpointing=False)
      return ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META, _INFO))
    cm = ocp.checkpoint_managers
    policies = [cm.LatestN(n=self.max_to_keep)]
    best_fn = None
    if self.best_metric is not None:
      name, mode = self.best_metric, self.best_mode
      best_fn = lambda metrics: _metric_score(metrics, name, mode)  # noqa: E731
      # BestN sorts ascending (descending with reverse) and keeps the tail: reverse for "min".
      policies.append(cm.BestN(get_metric_fn=best_fn, reverse=(mode == "min"), n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        # With best_fn set orbax writes the metrics (and reads them back on restart) that BestN ranks;
        # deletion follows the policy above, and best_step() below is ours, not orbax's.
        best_fn=best_fn, best_mode=self.best_mode,
        enable_async_checkpointing=async_save,
        # Leftover `*.orbax-checkpoint-tmp-*` directories of a killed save.
        cleanup_tmp_directories=True,
        # A bucket has no atomic rename: orbax writes gs:// steps in place and commits them with a
        # commit_success.txt file. It does not know s3://, where its rename of a step's item folders
        # fails (s3fs 2026.9.0's mv(recursive=True) also copies the folder's own, nonexistent key:
        # NoSuchKey, after copying the files), so s3:// is committed the gs:// way too.
        atomicity_options=(ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
                           if self.directory.startswith("s3://") else None),
        create=True)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=(_STATE, _META, _INFO))

  # ---------------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: Mapping[str, Any],
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` and `meta` as checkpoint `step` (async unless `async_save=False`).

    Every process must call it (orbax multi-host rule). It returns once the arrays are copied
    off the devices, so the caller may donate or overwrite `state` right after.

    Args:
      step: the training step number; steps must increase.
      state: the training-state pytree (jax arrays, possibly sharded).
      meta: JSON-serialisable dict (normaliser statistics, config, iterator position, ...).
      metrics: the step's scalar metrics (used to rank by `best_metric`).
      force: save even if orbax's save policy would skip this step, overwriting an existing one.

    Returns:
      True if a save was started; False if orbax skipped the step (e.g. it already exists).

    Raises:
      TypeError: `meta` or `metrics` is not JSON-serialisable.
      RuntimeError: after `close()`.
    """
    if self._closed:
      raise RuntimeError("Checkpointer.save called after close()")
    if self.read_only:
      raise RuntimeError(f"Checkpointer.save on a read-only Checkpointer of {self.directory}")
    meta = _checked_json(dict(meta), "meta")
    metrics = _checked_json(_metrics_to_json(metrics), "metrics")
    digest = digests.tree_digest(state) if self.verify else {}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(meta),
        _INFO: ocp.args.JsonSave({"metrics": metrics, "digest": digest,
                                   **({"meta_sha256": digests.meta_digest(meta)} if self.verify else {})}),
    })
    return bool(self._mngr.save(int(step), args=args, metrics=metrics, force=force))

  def read_meta(self, step: int) -> dict:
    """The JSON ``meta`` item of ``step`` alone (e.g. the config, to build the abstract state)."""
    restored = self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    return restored[_META]

  def newest_readable_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose ``meta`` item reads, or None (no step, or none reads).

    A step whose metadata is truncated or missing is passed over (with a `CheckpointRestoreWarning`),
    as `restore_latest` passes over a step that does not restore.
    """
    self._mngr.reload()
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
        if not isinstance(meta, Mapping) or not isinstance(meta.get("config"), Mapping):
          raise CheckpointCorruptError("its metadata holds no config")
        return step, dict(meta)
      except Exception as e:  # noqa: BLE001  (any failure: try the previous step)
        warnings.warn(f"checkpoint step {step} in {self.directory}: metadata unreadable "
                      f"({type(e).__name__}: {str(e)[:300]}); trying the previous step", CheckpointRestoreWarning,
                      stacklevel=2)
    return None

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores one step and checks its digest; raises on any problem."""
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _META: ocp.args.JsonRestore(),
        _INFO: ocp.args.JsonRestore(),
    })
    restored = self._mngr.restore(step, args=args)
    state, meta, info = restored[_STATE], restored[_META], restored[_INFO]
    expected = info["digest"]
    if self.verify and expected:
      bad = digests.digest_mismatches(expected, digests.tree_digest(state))
      if bad:
        raise CheckpointCorruptError(
            f"restored content differs from the digest saved with it at {len(bad)} leaves: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    # Checkpoints written before the metadata digest existed have none: nothing to check then.
    if self.verify and info.get("meta_sha256") and info["meta_sha256"] != digests.meta_digest(meta):
      raise CheckpointCorruptError("restored metadata (normaliser, config, data position) differs from the "
                                   "digest saved with it")
    return state, meta

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint ``step`` (no fallback): (state, meta); see `restore_latest` for ``abstract_state``."""
    self.wait_until_finished()
    self._mngr.reload()
    return self._restore_step(int(step), abstract_state)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores cleanly.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` (e.g. `jax.eval_shape`
        of the state initialiser plus the trainer's shardings); gives structure, dtypes and the
        placement of the restored arrays.

    Returns:
      (step, state, meta), or None when the directory holds no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none restores (nothing is quarantined then).
    """
    self.wait_until_finished()
    self._mngr.reload()  # The directory may have changed on disk since the manager opened it.
    failed: list[int] = []
    errors: list[str] = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        state, meta = self._restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001  (any failure means: try the previous checkpoint)
        message = f"{type(e).__name__}: {str(e)[:500]}"
        warnings.warn(f"checkpoint step {step} in {self.directory} failed to restore ({message}); "
                      "falling back to the previous checkpoint", CheckpointRestoreWarning,
                      stacklevel=2)
        failed.append(step)
        errors.append(f"step {step}: {message}")
        # orbax abandons the other array reads of a failed restore; collect them now, so that
        # their "Exception ignored" reports appear here rather than at some later random point.
        gc.collect()
        continue
      if failed and not self.read_only:
        self._quarantine(failed)
      return step, state, meta
    if failed:
      raise CheckpointRestoreError(
          f"none of the {len(failed)} checkpoints in {self.directory} restored (is the abstract "
          "state right?):\n" + "\n".join(errors))
    return None

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves broken step directories aside so that the resumed run can save those steps again."""
    if not object_store.is_remote(self.directory) and jax.process_index() == 0:
      target = pathlib.Path(self.directory) / QUARANTINE_DIRNAME
      target.mkdir(exist_ok=True)
      for step in steps:
        source = pathlib.Path(self.directory) / str(step)
        if source.exists():
          # Nanoseconds keep names unique when the same step number breaks twice.
          shutil.move(str(source), str(target / f"{step}-{time.time_ns()}"))
          _log.warning("moved unrestorable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("ddim_jax_checkpoint_quarantine")
    self._mngr.reload()

  # ---------------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._mngr.all_steps())

  def best_step(self) -> int | None:
    """The best step by `best_metric`, or None when no step has a finite value of it (or no `best_metric`).

    Best: the lowest finite value ("max" mode: the highest), ties to the lowest step, over the metrics
    saved with the steps that exist. The one definition of "best" (`--checkpoint best` uses it). A writer's
    retention keeps a step of the best value (orbax's BestN, ranking by the same `_metric_score`).
    """
    if self.best_metric is None:
      return None
    self.wait_until_finished()  # the metrics are read from the committed steps
    sign = 1.0 if self.best_mode == "min" else -1.0
    scores = {}
    for step in self.all_steps():
      score = _metric_score(self.metrics(step), self.best_metric, self.best_mode)
      if math.isfinite(score):
        scores[step] = sign * score
    return min(scores, key=lambda s: (scores[s], s)) if scores else None

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with `step` (None if saved without), read from the `info` item."""
    return self._mngr.restore(step, args=ocp.args.Composite(**{_INFO: ocp.args.JsonRestore()}))[
        _INFO]["metrics"]

  def reached_preemption(self, sync_id: int) -> bool:
    """True when the loop should save now and exit: `preemption.reached(sync_id, flag)`.

    One process: the SIGTERM flag (`preemption.install_sigterm_handler`). Several processes: JAX's
    preemption sync point, True on every process at the same `sync_id` (the loop's call counter:
    consecutive integers from 1 on every process, not the training step).
    """
    return preemption.reached(sync_id, self._flag)

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save is committed (and re-raises its error, if any)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; idempotent."""
    if not self._closed:
      self._closed = True
      self._mngr.close()

  def abandon(self) -> None:
    """Releases the manager after a failure, without waiting for or re-raising a failed save.

    For the error path of a trainer (a full disk): `close` would re-raise the save's error, hiding
    the one being reported. Completed checkpoints are untouched; a half-written step stays a tmp
    directory that the next writer removes.
    """
    if not self._closed:
      self._closed = True
      try:
        self._mngr.close()
      except Exception as e:  # noqa: BLE001  (the failure being reported is the one that matters)
        _log.warning("checkpoint manager closed with an error after a failure: %s", str(e)[:300])

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
