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
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ddim_jax import errors, files
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
# What a failed restore prints: one warning line, nothing else.


def _reason(e: BaseException) -> str:
  """``e`` as one short line: tensorstore's errors carry their whole multi-line spec after the message."""
  text = str(e).split(" See full TensorStore details", 1)[0]
  text = " ".join(text.split())
  return f"{type(e).__name__}: {text[:300]}{' ...' if len(text) > 300 else ''}"


def _warn(message: str, category: type[Warning] = CheckpointRestoreWarning) -> None:
  """A warning of this module that shows as ONE line.

  `warnings.warn` prints the caller's source line under the message; no source line exists for
  line 0, so the warning is the message line alone (filters, ``-W`` and pytest.warns work as usual).
  """
  warnings.warn_explicit(message, category, filename="ddim-jax", lineno=0, module=__name__)


# The reports that follow a failed restore. orbax reads a step's arrays concurrently; when one read
# fails it closes its event loop and abandons the others, which tensorstore still completes: each
# completion reports "RuntimeError: Event loop is closed" with a traceback (sys.unraisablehook with no
# object, from tensorstore's threads, at any later moment; seen through sys.excepthook too), each
# abandoned read an "Exception ignored in: <coroutine ...>" report when it is collected, and asyncio
# logs "Future exception was never retrieved". Measured (docs/checkpoints.md): up to 18,000 lines for
# a truncated newest step, after the one warning that says which step was skipped.
_CLOSED_LOOP = "Event loop is closed"
_READ_FAILED = "Encountered error while reading array index"
# orbax's log lines of every read-only manager and of a step folder without its metadata file: a
# reader's routine, or a step that the fallback names in its own warning.
_READER_LOG_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                     "Metadata file does not exist")


# tensorstore's own errors end with the spec of the array they read: an abandoned read of the failed
# restore that failed on its own (a truncated file: OUT_OF_RANGE, DATA_LOSS), reported when its future
# is collected, at a moment that depends on the threads' timing (seen in 1 of 6 runs).
_TENSORSTORE_SPEC = "tensorstore_spec"


def _is_abandoned_read_error(exc: BaseException | None) -> bool:
  text = "" if exc is None else str(exc)
  return exc is not None and (text == _CLOSED_LOOP or text.startswith(_READ_FAILED) or _TENSORSTORE_SPEC in text)


def _is_orbax_coroutine(obj: Any) -> bool:
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _FailedRestoreLogFilter(logging.Filter):
  """Drops asyncio's reports of abandoned reads and orbax's routine reader lines (see above)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and _is_abandoned_read_error(record.exc_info[1]):
      return False
    text = record.getMessage()
    if record.name == "asyncio" and (_CLOSED_LOOP in text or _READ_FAILED in text):
      return False
    return not text.startswith(_READER_LOG_NOISE)


_LOG_FILTER = _FailedRestoreLogFilter()


def quiet_failed_restores() -> None:
  """Silences the reports of the abandoned reads of a failed restore, for this process (idempotent).

  Only those are dropped: "Event loop is closed" errors, orbax coroutines collected unfinished, asyncio's
  "Future exception was never retrieved" of a failed read, and orbax's routine reader log lines. Every
  other report still reaches the previous hook. The failure itself is reported by the caller (one
  warning line per skipped step, or one error line).
  """
  # Each hook is wrapped once; a hook someone set since (pytest does, per test) is wrapped again.
  if not getattr(sys.excepthook, "_ddim_jax_quiet", False):
    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc, tb):
      # From tensorstore's threads only: the main thread's own uncaught error is always shown.
      if (exc_type is RuntimeError and str(exc) == _CLOSED_LOOP
          and threading.current_thread() is not threading.main_thread()):
        return
      previous_excepthook(exc_type, exc, tb)

    excepthook._ddim_jax_quiet = True
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, "_ddim_jax_quiet", False):
    previous_unraisablehook = sys.unraisablehook

    def unraisablehook(unraisable):
      if _is_abandoned_read_error(unraisable.exc_value) or _is_orbax_coroutine(unraisable.object):
        return
      previous_unraisablehook(unraisable)

    unraisablehook._ddim_jax_quiet = True
    sys.unraisablehook = unraisablehook
  for name in ("asyncio", "absl"):
    logging.getLogger(name).addFilter(_LOG_FILTER)  # the same object: added once


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


def _check_meta_digest(meta: Mapping, info: Any) -> None:
  """Raises `CheckpointCorruptError` when ``meta`` differs from the digest saved with it in ``info``."""
  expected = info.get("meta_sha256") if isinstance(info, Mapping) else None
  # Checkpoints written before the metadata digest existed have none: nothing to check then.
  if expected and expected != digests.meta_digest(meta):
    raise CheckpointCorruptError("restored metadata (normaliser, config, data position) differs from the "
                                 "digest saved with it")


def _prepare_directory(directory: str | os.PathLike, read_only: bool = False) -> str:
  """Absolute checkpoint directory; a writer's is created if needed and checked for writing.

  Clear errors for files, permissions and (read-only) a missing directory.
  """
  directory = os.fspath(directory)
  if object_store.is_remote(directory):  # gs:// and friends: let orbax/epath deal with remote storage.
    object_store.check_access(directory)  # once per bucket and process: reachable, with credentials
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
# Which folders are steps: only those orbax wrote.

# The file orbax writes into every step folder it saves (and commits); a folder without it is not a
# checkpoint of this program's, whatever its name.
STEP_MARK = "_CHECKPOINT_METADATA"


# What orbax puts in a step folder of this program's: its items and orbax's own files.
ORBAX_STEP_NAMES = {_STATE, _META, _INFO, "commit_success.txt", "_METADATA", "_sharding"}


class ForeignFolderWarning(UserWarning):
  """A folder in checkpoints/ that looks like a step but was not written by orbax: left alone."""


_warned_foreign: set[str] = set()


class ProgramSteps(ocp.path.step.NameFormat):
  """orbax's standard step names, restricted to folders orbax wrote (``STEP_MARK`` inside).

  A user's ``checkpoints/7/`` (notes, a copy of something) is then no step: retention never deletes
  it, a restore never tries it and a broken-step quarantine never moves it. It is named once in a
  ``ForeignFolderWarning``.
  """

  def __init__(self, standard):
    self._standard = standard

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def _is_orbax_step(self, metadata) -> bool:
    path = epath.Path(metadata.path)
    if (path / STEP_MARK).exists():
      return True
    # A step orbax was deleting (retention) when the process was killed has lost its mark but keeps
    # orbax's items (or nothing at all): still orbax's, to restore-or-quarantine and delete as before.
    names = {p.name for p in path.iterdir()} if path.is_dir() else {"?"}
    if not names or names & ORBAX_STEP_NAMES:
      return True
    where = os.fspath(metadata.path)
    if where not in _warned_foreign:
      _warned_foreign.add(where)
      _warn(f"{where} is not a checkpoint this program wrote (no {STEP_MARK} in it): it is left alone, "
            "never restored, moved or deleted", ForeignFolderWarning)  # one line (see _warn)
    return False

  def find_all(self, base_path):
    return (m for m in self._standard.find_all(base_path) if self._is_orbax_step(m))

  def find_step(self, base_path, step: int):
    metadata = self._standard.find_step(base_path, step)
    if not self._is_orbax_step(metadata):
      raise ValueError(f"no checkpoint of step {step} under {base_path}: {metadata.path} was not written by orbax")
    return metadata

  def __str__(self):
    return f"ProgramSteps({self._standard})"


def _step_format(atomicity_options=None):
  return ProgramSteps(ocp.path.step.standard_name_format(atomicity_options=atomicity_options))


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
    if read_only:  # before orbax opens the directory: its routine lines of a read-only manager are dropped
      quiet_failed_restores()
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
                                             max_to_keep=None, enable_async_checkpointing=False,
                                             step_name_format=_step_format())
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
    atomicity = (ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
                 if self.directory.startswith("s3://") else None)
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
        atomicity_options=atomicity,
        # Only folders orbax wrote are steps: retention and quarantine never touch a user's folder.
        step_name_format=_step_format(atomicity),
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
    """The JSON ``meta`` item of ``step`` alone (e.g. the config, to build the abstract state).

    With ``verify`` it is checked against the digest saved with it (a step written before that digest
    existed has none), so that an edited newest step never decides how the older ones are read.

    Raises:
      CheckpointCorruptError: the metadata is no JSON object or differs from its digest.
      Exception: what orbax raises for a step that does not read (an item missing, invalid JSON).
    """
    items = {_META: ocp.args.JsonRestore(), **({_INFO: ocp.args.JsonRestore()} if self.verify else {})}
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    meta = restored[_META]
    if not isinstance(meta, Mapping):
      raise CheckpointCorruptError("its metadata is no JSON object")
    if self.verify:
      _check_meta_digest(meta, restored[_INFO])
    return dict(meta)

  def newest_readable_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose ``meta`` item reads, or None (no step, or none reads).

    A step whose metadata is truncated, missing or differs from its digest is passed over (with a
    one-line `CheckpointRestoreWarning`), as `restore_latest` passes over a step that does not restore.
    """
    quiet_failed_restores()
    self._mngr.reload()
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
        if not isinstance(meta.get("config"), Mapping):
          raise CheckpointCorruptError("its metadata holds no config")
        return step, meta
      except Exception as e:  # noqa: BLE001  (any failure: try the previous step)
        _warn(f"checkpoint step {step} in {self.directory}: metadata unreadable ({_reason(e)}); trying the "
              "previous step")
    return None

  def readable_steps(self) -> list[int]:
    """The steps whose ``meta`` item reads (and matches its digest), ascending: the candidates a user may name."""
    quiet_failed_restores()
    steps = []
    for step in self.all_steps():
      try:
        self.read_meta(step)
      except Exception:  # noqa: BLE001  (a step that does not read is no candidate)
        continue
      steps.append(step)
    return steps

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
    if self.verify:
      _check_meta_digest(meta, info)
    return state, meta

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint ``step`` (no fallback): (state, meta); see `restore_latest` for ``abstract_state``."""
    self.wait_until_finished()
    self._mngr.reload()
    quiet_failed_restores()
    return self._restore_step(int(step), abstract_state)

  def restore_chosen(self, step: int, abstract_for: Callable[[dict], Any]) -> tuple[Any, dict]:
    """A reader's restore of a step the user named (no fallback), with the abstract state of its own config.

    Args:
      step: the step.
      abstract_for: the abstract state (see `restore_latest`) of a step's ``meta`` (its config).

    Returns:
      (state, meta).

    Raises:
      CheckpointCorruptError: the step's content or metadata differs from the digest saved with it.
      CheckpointRestoreError: it does not restore (damaged, or no checkpoint of this program).
      Both in one line naming the step's folder and the steps whose metadata reads.
    """
    self.wait_until_finished()
    self._mngr.reload()
    quiet_failed_restores()
    step = int(step)
    try:
      return self._restore_step(step, abstract_for(self.read_meta(step)))
    except Exception as e:  # noqa: BLE001  (every failure of a named step is the same one line)
      gc.collect()  # the abandoned reads of the failed restore, now (see quiet_failed_restores)
      others = [s for s in self.readable_steps() if s != step]
      valid = (f"the steps whose metadata reads: {', '.join(map(str, others))}" if others
               else "no other step's metadata reads")
      kind = CheckpointCorruptError if isinstance(e, CheckpointCorruptError) else CheckpointRestoreError
      raise kind(f"checkpoint step {step} ({self.directory.rstrip('/')}/{step}) does not restore ({_reason(e)}); "
                 f"{valid}") from e

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
    return self._restore_newest(lambda step: abstract_state, "is the abstract state right?")

  def restore_newest(self, abstract_for: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
    """A reader's `restore_latest`: each step is read with the abstract state of its own config.

    The config comes from the step's own metadata, checked against its digest: a newest step whose
    metadata was edited or damaged is skipped (one warning line) and never decides how the older
    steps are read.

    Args:
      abstract_for: the abstract state (see `restore_latest`) of a step's ``meta``.

    Returns:
      (step, state, meta), or None when the directory holds no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none restores.
    """
    return self._restore_newest(lambda step: abstract_for(self.read_meta(step)),
                                "they are damaged: train again, or restore the workdir from a copy")

  def _restore_newest(self, abstract_of_step: Callable[[int], Any], hint: str) -> tuple[int, Any, dict] | None:
    """`restore_latest` and `restore_newest`: newest first, one warning line per step passed over."""
    self.wait_until_finished()
    self._mngr.reload()  # The directory may have changed on disk since the manager opened it.
    quiet_failed_restores()
    failed: list[int] = []
    reasons: list[str] = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        state, meta = self._restore_step(step, abstract_of_step(step))
      except Exception as e:  # noqa: BLE001  (any failure means: try the previous checkpoint)
        _warn(f"checkpoint step {step} in {self.directory} failed to restore ({_reason(e)}); falling back to the "
              "previous checkpoint")
        failed.append(step)
        reasons.append(f"step {step}: {_reason(e)}")
        # orbax abandons the other array reads of a failed restore; collect them now, so that
        # their "Exception ignored" reports (silenced) happen here rather than at some later random point.
        gc.collect()
        continue
      if failed and not self.read_only:
        self._quarantine(failed)
      return step, state, meta
    if failed:
      raise CheckpointRestoreError(
          f"none of the {len(failed)} checkpoints in {self.directory} restored ({hint}): " + "; ".join(reasons))
    return None

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves broken step directories aside so that the resumed run can save those steps again."""
    if not object_store.is_remote(self.directory) and jax.process_index() == 0:
      target = pathlib.Path(self.directory) / QUARANTINE_DIRNAME
      files.ensure_folder(str(target), "the checkpoints' quarantine folder")  # never a link to elsewhere
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
      try:
        metrics = self.metrics(step)
      except Exception:  # noqa: BLE001  (a step whose info does not read has no metric; it cannot be best)
        continue
      score = _metric_score(metrics, self.best_metric, self.best_mode)
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
