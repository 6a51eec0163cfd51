"""Training checkpoints: orbax `CheckpointManager` with fallback, integrity digests, preemption.

One checkpoint is one step directory holding three orbax items:

  state    the TrainState pytree (`StandardSave`/`StandardRestore`), restored into the
           structure and shardings of an abstract state (`jax.ShapeDtypeStruct`s with `.sharding`).
  meta     a JSON dict (`JsonSave`/`JsonRestore`): normaliser statistics, config, data-iterator
           position, ... whatever the trainer passes; returned unchanged by `restore_latest`.
  info     a JSON dict written by this module: {"metrics": the step's metrics, "digest": {leaf
           key path: uint32 digest of the state}, "meta_sha256": the SHA-256 of the canonical JSON of
           `meta` (normaliser, config, data position: what the weights mean)}. The digest exists because a flipped bit inside a
           compressed tensorstore chunk restores *silently* to wrong values (verified with orbax
           0.12.8); truncated or missing files do raise. The metrics live here because orbax
           writes its own `metrics` item only when `best_fn` is set (it is, with `best_metric`).

API:
  `Checkpointer(directory, max_to_keep=3, best_metric=None, best_mode="min", async_save=True,
                verify=True, preemption_flag=None, read_only=False)`
  `.save(step, state, meta, metrics=None, force=False) -> bool`
  `.restore_latest(abstract_state) -> (step, state, meta) | None`, `.restore(step, abstract_state) -> (state, meta)`
  `.newest_readable_meta() -> (step, meta) | None`,
  `.latest_step()`, `.all_steps()`, `.best_step()`, `.metrics(step)`, `.reached_preemption(step)`,
  `.wait_until_finished()`, `.close()`, and use as a context manager.
  `install_sigterm_handler(flag=None, signums=(SIGTERM,)) -> PreemptionFlag`, `PREEMPTION_FLAG`.

Retention. orbax 0.12.8's legacy options rank by `best_fn` *instead of* recency: with
`max_to_keep=N, best_fn=f` it keeps the best N and may delete the newest checkpoint (verified:
losses 5,1,4,3,6 at steps 1..5 with N=2 keep steps [2, 4]). We want "the last N plus the best one",
so we pass `preservation_policy=AnyPreservationPolicy([LatestN(N), BestN(n=1)])`, which is
mutually exclusive with `max_to_keep`. `best_fn`/`best_mode` are still set, but only so that
`CheckpointManager.best_step()` ranks by the metric (it reads them; the policy overrides deletion).

Atomicity. orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
after all items are written (`AtomicRenameTemporaryPath`); steps are found only by their integer
names, so a save killed mid-way leaves a tmp directory that is never restored, and
`cleanup_tmp_directories=True` deletes it when the next `Checkpointer` starts.

Readers and writers. Only a trainer opens a directory for writing. Every other command (export,
sample, evaluate, a second trainer's resume check, ...) opens it with `read_only=True`: orbax's
read-only mode, no tmp-directory clean-up, nothing created, moved or quarantined, no write check.
A reader's clean-up of `<step>.orbax-checkpoint-tmp` once deleted a live trainer's save in progress.

Failed restores. `restore_latest` walks back from the newest step; a step that fails to restore
(missing or truncated file, digest mismatch) is reported with a `CheckpointRestoreWarning` and
moved to `<directory>/quarantined/` once an older step restored (writers only), so that the resumed run can save
that step number again (orbax skips saving a step <= the latest existing one). If *no* step
restores, nothing is moved and `CheckpointRestoreError` is raised: that pattern means a wrong
abstract state far more often than every checkpoint being corrupt.

Multi-host. Every process must call `save`, `restore_latest` and `reached_preemption` at the same
steps (orbax saves collectively; never guard with `jax.process_index() == 0`). Preemption with
several processes is JAX's preemption sync manager (what orbax's `reached_preemption` and MaxText
use), not the SIGTERM flag: `jax.distributed.initialize` installs JAX's own SIGTERM notifier; a
notice on ANY process starts a background protocol over the coordination service that agrees on
the sync id max(every process's current id) + 1, and `reached_preemption(sync_id)` returns True on
every process at that id. An ordinary call is a local, mutex-guarded compare: no host sync per
step. (The flag all-gathered at every call, as before, cost one blocking collective per step.)
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ddim_jax import errors

_STATE, _META, _INFO = "state", "meta", "info"
QUARANTINE_DIRNAME = "quarantined"
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# s3:// workdirs. orbax (0.12.8, and its main branch in 2026-08) gives tensorstore a native kvstore
# only for gs:// paths; any other path becomes a local `file` kvstore, and an s3:// one fails with
# "Checkpoint path should be absolute. Got s3:/bucket/..." (os.path.normpath ate a slash). Its
# non-array files (metadata, JSON items, renames) go through etils.epath, which handles s3:// via
# s3fs. So only the path -> tensorstore kvstore step is routed here: s3://bucket/key becomes
# tensorstore's `s3` driver. tensorstore reads credentials (AWS_ACCESS_KEY_ID, ...) from the
# environment itself but not an endpoint: a custom one (MinIO, moto, ...) is taken from
# AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, the variables botocore (so s3fs) honours too.


def _s3_kvstore_spec(path: str) -> dict[str, Any]:
  """tensorstore's kvstore spec of ``s3://bucket/key`` (endpoint and region from the AWS env vars)."""
  bucket, _, key = path[len("s3://"):].partition("/")
  spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    spec["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  return spec


def _route_s3_paths_to_tensorstore() -> None:
  """Makes orbax's array I/O use tensorstore's s3 driver for s3:// paths (idempotent).

  Patches three private names of orbax 0.12.8 (called for s3:// directories only, so that local and
  gs:// runs never depend on them); if a later orbax renamed them, says so instead of failing obscurely.
  """
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  if getattr(ts_utils, "_ddim_jax_s3", False):
    return
  try:
    normalize, use_native, native_spec = ts_utils._normalize_path, ts_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs
  except AttributeError as e:
    raise NotImplementedError(f"s3:// checkpoints need orbax-checkpoint 0.12.x internals ({e}); "
                              f"this is {ocp.__version__}") from e

  def normalize_path(path: str) -> str:
    out = normalize(path)  # os.path.normpath: "s3://b/k" -> "s3:/b/k"
    return "s3://" + out[len("s3:/"):] if out.startswith("s3:/") and not out.startswith("s3://") else out

  def get_kvstore(path: str) -> dict[str, Any]:
    return _s3_kvstore_spec(path) if str(path).startswith("s3://") else native_spec(path)

  ts_utils._normalize_path = normalize_path
  ts_utils._use_gcs_driver = lambda directory: use_native(directory) or directory.startswith("s3://")
  gcs_utils.get_kvstore_for_gcs = get_kvstore
  ts_utils._ddim_jax_s3 = True


class CheckpointError(errors.Error):
  """Base class of this module's errors."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint restored, but its content does not match the digest written with it."""


class CheckpointRestoreError(CheckpointError):
  """No checkpoint in the directory could be restored."""


class CheckpointRestoreWarning(UserWarning):
  """A checkpoint failed to restore and an older one is tried instead."""


# ----------------------------------------------------------------------------------------------
# Preemption: a SIGTERM handler that only sets a flag.


class PreemptionFlag:
  """A thread- and signal-safe boolean set when this process is asked to stop.

  The signal handler only sets it; the training loop polls it (via
  `Checkpointer.reached_preemption`), finishes the step, saves and exits cleanly.
  """

  def __init__(self):
    self._event = threading.Event()
    self.signum: int | None = None

  def set(self, signum: int | None = None) -> None:
    """Marks the process as preempted (what the signal handler calls)."""
    self.signum = signum
    self._event.set()

  def clear(self) -> None:
    """Resets the flag (tests; or after a handled preemption that does not exit)."""
    self.signum = None
    self._event.clear()

  def is_set(self) -> bool:
    """True once `set` was called."""
    return self._event.is_set()


# Process-wide default: signals are process-wide, so one flag is the natural default.
PREEMPTION_FLAG = PreemptionFlag()


def install_sigterm_handler(flag: PreemptionFlag | None = None,
                            signums: Sequence[int] = (signal.SIGTERM,)) -> PreemptionFlag:
  """Installs a handler that sets `flag` on SIGTERM (or `signums`) instead of dying.

  Must be called from the main thread (a Python `signal` rule). Single-process runs only: with
  several processes JAX's preemption service owns SIGTERM (see the module docstring), and a Python
  handler installed after `jax.distributed.initialize` would replace JAX's notifier.

  Args:
    flag: the flag to set; defaults to the module's `PREEMPTION_FLAG`.
    signums: the signals to catch.

  Returns:
    The flag, to pass to `Checkpointer(preemption_flag=...)` or to poll directly.
  """
  flag = PREEMPTION_FLAG if flag is None else flag

  def handler(signum, frame):  # noqa: ARG001  (the signal API's signature)
    # Only set the flag: anything heavier (saving, logging with locks) is unsafe in a handler.
    flag.set(signum)

  for signum in signums:
    signal.signal(signum, handler)
  return flag


# ----------------------------------------------------------------------------------------------
# Integrity digests, computed on device so that a save does not copy the state to host twice.


def _leaf_digest(x: jax.Array) -> jax.Array:
  """A uint32 position-weighted sum of the bits of `x`.

  Every weight is odd, so any single flipped bit changes the sum (odd * 2^k != 0 mod 2^32), and
  distinct weights catch swapped elements. Integer arithmetic makes it exact and independent of
  the reduction order, hence of the device layout.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = x.dtype.itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
    # 64-bit words split into two uint32 (an extra trailing axis); narrower ones widen.
    bits = (jax.lax.bitcast_convert_type(bits, jnp.uint32) if width == 64
            else bits.astype(jnp.uint32))
  bits = bits.ravel()
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _tree_digest_device(tree: Any) -> Any:
  return jax.tree.map(_leaf_digest, tree)


def _digestible(x: Any) -> bool:
  """Numeric or boolean array leaves; Python scalars and other objects are not digested."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return False
  return bool(dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
              or jnp.issubdtype(dtype, jnp.floating))


def tree_digest(tree: Any) -> dict[str, int]:
  """{key path: uint32 digest} of every numeric array leaf of `tree` (see `_leaf_digest`)."""
  leaves = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if _digestible(leaf)]
  digests = jax.device_get(_tree_digest_device([leaf for _, leaf in leaves]))
  return {key: int(d) for (key, _), d in zip(leaves, digests)}


def meta_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 (hex) of the canonical JSON of a checkpoint's ``meta`` (sorted keys)."""
  text = json.dumps(meta, sort_keys=True, allow_nan=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _digest_mismatches(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
  keys = sorted(set(expected) | set(actual))
  return [k for k in keys if expected.get(k) != actual.get(k)]


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


def is_remote(path: str | os.PathLike) -> bool:
  """True for a bucket path (``gs://...``, ``s3://...``, any ``scheme://``), False for a local one."""
  return "://" in os.fspath(path)


def _prepare_directory(directory: str | os.PathLike, read_only: bool = False) -> str:
  """Absolute checkpoint directory; a writer's is created if needed and checked for writing.

  Clear errors for files, permissions and (read-only) a missing directory.
  """
  directory = os.fspath(directory)
  if is_remote(directory):  # gs:// and friends: let orbax/epath deal with remote storage.
    if directory.startswith("s3://"):
      _route_s3_paths_to_tensorstore()
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
  that metric. See the module docstring for atomicity, fallback and multi-host rules.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "min", async_save: bool = True,
               verify: bool = True, preemption_flag: PreemptionFlag | None = None, read_only: bool = False):
    """Opens (a writer: creating if needed) a checkpoint directory.

    Args:
      directory: where step directories live; created if missing.
      max_to_keep: how many of the newest steps to keep (None: all).
      best_metric: name of a metric passed to `save`; the best step by it is kept in addition.
      best_mode: "min" or "max": which values of `best_metric` are better.
      async_save: write in a background thread (`save` returns after the device-to-host copy).
      verify: write a digest of the state with each save and check it on restore.
      preemption_flag: flag polled by `reached_preemption`; defaults to `PREEMPTION_FLAG`.
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
    self._flag = PREEMPTION_FLAG if preemption_flag is None else preemption_flag
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
        # Only read by best_step(); deletion follows the policy above.
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
    digest = tree_digest(state) if self.verify else {}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(meta),
        _INFO: ocp.args.JsonSave({"metrics": metrics, "digest": digest,
                                   **({"meta_sha256": meta_digest(meta)} if self.verify else {})}),
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
      bad = _digest_mismatches(expected, tree_digest(state))
      if bad:
        raise CheckpointCorruptError(
            f"restored content differs from the digest saved with it at {len(bad)} leaves: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    # Checkpoints written before the metadata digest existed have none: nothing to check then.
    if self.verify and info.get("meta_sha256") and info["meta_sha256"] != meta_digest(meta):
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
    if not is_remote(self.directory) and jax.process_index() == 0:
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
    """The best step by `best_metric` (the latest step if no metric is configured), or None."""
    return self._mngr.best_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with `step` (None if saved without), read from the `info` item."""
    return self._mngr.restore(step, args=ocp.args.Composite(**{_INFO: ocp.args.JsonRestore()}))[
        _INFO]["metrics"]

  def reached_preemption(self, sync_id: int) -> bool:
    """True when the loop should save now and exit.

    One process: the SIGTERM flag (`install_sigterm_handler`). Several processes: JAX's preemption
    sync point, True on every process at the same `sync_id` after a SIGTERM to any of them (see the
    module docstring); `jax.distributed.initialize` must have started the preemption service (the
    default, `jax_enable_preemption_service=True`).

    Args:
      sync_id: the loop's call counter: consecutive integers from 1, the same sequence on every
        process and called at every one of them (JAX matches ids exactly, so a training step that
        advances by `steps_per_call` must not be passed).
    """
    if jax.process_count() == 1:
      return self._flag.is_set()
    return bool(multihost_utils.reached_preemption_sync_point(sync_id))

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
