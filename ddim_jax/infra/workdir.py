"""The workdir's guards: where it may be, that it can be written, and a full disk said in one line.

- ``check_location``: a local folder, ``gs://bucket/path`` or ``s3://bucket/path``; anything else
  is refused before anything is read.
- ``ensure_writable``: creates a trainer's workdir; a read-only filesystem, a folder of another user
  or a full disk is one line naming the folder and the fix.
- ``is_disk_full`` / ``disk_full_error`` / ``check_room_for_checkpoint``: ENOSPC in any of its forms
  (Python, tensorstore's RESOURCE_EXHAUSTED with os_error_code 28, orbax's background threads)
  becomes one line naming the full device and the last good checkpoint.

What is in a workdir, and every write into it: ``run_dir.RunDir``. One trainer per workdir:
``workdir_lock``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys

from etils import epath

from ddim_jax import errors

SUPPORTED_SCHEMES = ("gs", "s3")


class DiskFullError(errors.Error):
  """The workdir's device is full (the message names it and the last good checkpoint)."""


# ------------------------------------------------------------------------------------------------
# Where a workdir may be.


def scheme_of(path: str | os.PathLike) -> str | None:
  """'gs' of 'gs://b/p', None of a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0].lower() if "://" in text else None


def check_location(workdir: str | os.PathLike, what: str = "--workdir") -> str:
  """``workdir`` as a string, after checking that it can be a workdir (not that it exists).

  Raises:
    errors.ConfigError: an unsupported URL scheme (only local folders, gs:// and s3://).
    errors.InputError: a local path that exists and is not a folder.
  """
  text = os.fspath(workdir)
  if not text.strip():
    raise errors.ConfigError(f"{what} is empty: give a folder, gs://bucket/path or s3://bucket/path")
  scheme = scheme_of(text)
  if scheme is not None:
    if scheme not in SUPPORTED_SCHEMES:
      raise errors.ConfigError(f"{what} {text!r}: {scheme}:// is not supported; use a local folder, "
                               "gs://bucket/path or s3://bucket/path")
    return text
  if os.path.exists(text) and not os.path.isdir(text):
    raise errors.InputError(f"{what} {text!r} is a file, not a folder; give a folder (it is created if missing)")
  return text


def _os_error_line(e: OSError, path: str) -> str | None:
  """One line for the OSErrors of creating or writing ``path`` that are the user's to fix, else None."""
  if e.errno == errno.EROFS:
    return f"{path} is on a read-only filesystem: train in a --workdir on a writable disk"
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"{path} is not writable by this user: fix its permissions or train in another --workdir"
  if e.errno == errno.ENOTDIR:
    return f"{path}: a part of the path is a file, not a folder: give another --workdir"
  if e.errno == errno.ENOSPC:
    return f"no space left on the device of {path}: free some space or train in another --workdir"
  if e.errno == errno.ENAMETOOLONG:
    return f"{path}: a name in the path is too long for the filesystem: give a --workdir with shorter names"
  if e.errno == errno.ELOOP:
    return f"{path}: too many symbolic links in the path: give another --workdir"
  return None


def ensure_writable(workdir: str) -> None:
  """Creates a trainer's workdir (a local folder: also checks it can be written).

  Raises:
    errors.InputError: a read-only filesystem, no permission, a file in the path, a full disk.
  """
  if scheme_of(workdir) is not None:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    line = _os_error_line(e, workdir)
    if line is None:
      raise
    raise errors.InputError(line) from e
  # access(2) answers for the filesystem too (EROFS, for root as well), without writing anything.
  if not os.access(workdir, os.W_OK | os.X_OK):
    read_only = bool(os.statvfs(workdir).f_flag & os.ST_RDONLY)
    raise errors.InputError(_os_error_line(OSError(errno.EROFS if read_only else errno.EACCES, ""), workdir))


# ------------------------------------------------------------------------------------------------
# A full disk.


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether ``exc`` (or an exception it was raised from) is ENOSPC, in any of the forms it takes."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
      return True
    text = str(exc)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def _mount_point(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.ismount(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def _existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def committed_steps(directory: str) -> list[int]:
  """The integer-named (committed) step folders of a local checkpoint directory, ascending."""
  try:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  except OSError:
    return []


def _free_bytes(path: str) -> int | None:
  try:
    return shutil.disk_usage(_existing(path)).free
  except OSError:
    return None


def disk_full_error(workdir: str, step: int | None, needed: int | None = None) -> DiskFullError:
  """The one-line error of a full disk under ``workdir`` (training stopped at ``step``; ``needed``:
  the bytes a checkpoint needs, when the check before a save refused it)."""
  where = workdir
  if scheme_of(workdir) is None:
    mount = _mount_point(_existing(workdir))
    free = _free_bytes(workdir)
    room = f"{free / 2**20:.1f} MiB free" if free is not None else ""
    if needed is not None:
      room = f"a checkpoint needs about {needed / 2**20:.1f} MiB, {room}"
    where = f"{mount}, the device of {workdir}" + (f" ({room})" if room else "")
  directory = os.path.join(workdir, "checkpoints")
  steps = committed_steps(directory) if scheme_of(workdir) is None else []
  kept = (f"the last good checkpoint is step {steps[-1]} in {directory} (nothing completed is lost)" if steps
          else "no checkpoint was completed yet")
  at = f" at step {step}" if step is not None else ""
  error = DiskFullError(f"no space left on {where}: training stopped{at}; {kept}. Free some space (or move the "
                       "workdir), then run the same command to resume")
  error.needed = needed
  return error


def quiet_closed_loop_reports() -> None:
  """Silences the reports of tensorstore writes that complete after orbax closed their event loop.

  After a save failed on a full disk, orbax stops its writer loop while tensorstore still finishes
  (fails) the other writes of that save; each completion then prints "RuntimeError: Event loop is
  closed" with a traceback through ``sys.excepthook``, up to hundreds of lines after the one-line
  error. Only that exact error is dropped; anything else still reaches the previous hook.
  """
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    if exc_type is RuntimeError and str(exc) == "Event loop is closed":
      return
    previous(exc_type, exc, tb)

  sys.excepthook = hook


# What a checkpoint needs beyond the raw bytes of the state: orbax's metadata, OCDBT manifests,
# sharding files, the JSON items (measured: about 140 KiB for the tiny test model).
CHECKPOINT_OVERHEAD_BYTES = 1 << 20


def check_room_for_checkpoint(workdir: str, state_bytes: int, step: int) -> None:
  """Refuses a save that a local disk has no room for, before anything is written.

  A save that fills the disk half-way fails inside orbax's writer threads (hundreds of lines of
  reports); checking first turns the common case into one line. Raw bytes bound the written ones
  (tensorstore compresses). Buckets are not checked (no disk).

  Raises:
    DiskFullError: less free space than ``state_bytes`` + ``CHECKPOINT_OVERHEAD_BYTES``.
  """
  if scheme_of(workdir) is not None:
    return
  needed = int(state_bytes) + CHECKPOINT_OVERHEAD_BYTES
  free = _free_bytes(workdir)
  if free is not None and free < needed:
    raise disk_full_error(workdir, step, needed)


class DiskFullLogFilter(logging.Filter):
  """Drops the log records of a full disk (orbax's background threads log each failed write with a
  traceback, hundreds of lines); the trainer reports it once, as ``disk_full_error``."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
      return False
    return not ("No space left on device" in text or "os_error_code='28'" in text)
