"""The workdir's guards: where it may be, one trainer at a time, and a full disk said in one line.

- ``check_location``: a workdir is a local folder, ``gs://bucket/path`` or ``s3://bucket/path``;
  anything else (``ftp://``, ``hdfs://``, a path to a file) is refused before anything is read.
- ``ensure_writable``: a trainer's workdir is created; a read-only filesystem, a folder of another
  user or a full disk is one line naming the folder and the fix.
- ``WorkdirLock`` / ``lock_for_training``: one trainer per workdir. Two trainers on one workdir
  both resume from the same step and then overwrite each other's checkpoints and records (seen:
  orbax timeouts, each logged step twice). A trainer takes ``<workdir>/train.lock`` at start and
  removes it when it ends; a second one is refused naming the holder (host, pid, start time).

  What holds where:
    local and shared disks  ``fcntl.lockf`` (POSIX record locks: NFS v4 and Lustre lock across
                            hosts too), held on the open file; the kernel drops it when the holder
                            dies, so a crashed trainer never blocks the next one: its leftover
                            record is taken over with a warning. Where the filesystem has no POSIX
                            locks, the record decides: a live pid on this host (or a heartbeat under
                            ``STALE_SECONDS`` old) holds it, a dead pid on this host does not.
    s3://                   create-if-absent (``If-None-Match: *``, an atomic precondition on S3).
    gs://                   create-if-absent (``ifGenerationMatch=0``: atomic on GCS).
    Buckets have no process that dies with the holder: the holder rewrites its record every
    ``HEARTBEAT_SECONDS``; a record from this host whose pid is dead, or one whose heartbeat is
    older than ``STALE_SECONDS`` (a holder on another host that was killed), is taken over with a
    warning.

  Several processes (``jax.distributed``): one lock per run, taken by process 0; its outcome is
  broadcast, so every process of a refused run stops with the same line.
- ``is_disk_full`` / ``disk_full_error``: ENOSPC raised anywhere (Python, tensorstore's
  RESOURCE_EXHAUSTED with os_error_code 28, orbax's background threads) becomes one line naming
  the full device and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import warnings

from etils import epath

from ddim_jax import errors

LOCK_FILE = "train.lock"
SUPPORTED_SCHEMES = ("gs", "s3")
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0

_log = logging.getLogger(__name__)


class WorkdirLockedError(errors.Error):
  """Another trainer holds the workdir (the message names it: host, pid, start time)."""


class DiskFullError(errors.Error):
  """The workdir's device is full (the message names it and the last good checkpoint)."""


class WorkdirLockWarning(UserWarning):
  """A stale lock (its holder is gone) was taken over."""


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
# One trainer per workdir.


@dataclasses.dataclass
class Holder:
  """Who holds a workdir lock."""
  host: str
  pid: int
  started: str  # ISO time, UTC
  heartbeat: float = 0.0  # time.time() of the holder's last refresh (bucket locks)
  command: str = ""

  @classmethod
  def me(cls) -> Holder:
    now = time.time()
    return cls(socket.gethostname(), os.getpid(),
               datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"), now,
               " ".join(sys.argv)[:500])

  @classmethod
  def parse(cls, data: bytes) -> Holder | None:
    """The holder recorded in a lock file (None: empty or unreadable, e.g. a crash mid-write)."""
    try:
      fields = json.loads(data.decode("utf-8"))
      return cls(str(fields["host"]), int(fields["pid"]), str(fields.get("started", "?")),
                 float(fields.get("heartbeat", 0.0)), str(fields.get("command", "")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
      return None

  def to_bytes(self) -> bytes:
    return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode("utf-8")

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host}, started {self.started}"

  def is_local(self) -> bool:
    return self.host == socket.gethostname()

  def is_alive(self) -> bool:
    """Whether the holder still runs: known only on this host (elsewhere: assumed alive)."""
    if not self.is_local():
      return True
    if self.pid == os.getpid():
      return True
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # a live process of another user
      return True
    return True

  def is_stale(self, now: float | None = None) -> bool:
    """Gone: a dead pid on this host, or (elsewhere) no heartbeat for ``STALE_SECONDS``."""
    if self.is_local():
      return not self.is_alive()
    return self.heartbeat > 0 and (now or time.time()) - self.heartbeat > STALE_SECONDS


def _refused(workdir: str, holder: Holder | None, lock_path: str) -> WorkdirLockedError:
  who = holder.describe() if holder else "another trainer (its record is unreadable)"
  return WorkdirLockedError(
      f"{workdir} is in use by another trainer: {who} (lock {lock_path}). Wait for it to finish or stop it, "
      "or train in another --workdir; if that trainer is gone, delete the lock file")


def _took_over(holder: Holder | None, lock_path: str) -> None:
  who = holder.describe() if holder else "a trainer whose record is unreadable"
  warnings.warn(f"took over the lock {lock_path} of a trainer that is gone ({who}): it did not end cleanly; "
                "resuming from its last checkpoint", WorkdirLockWarning, stacklevel=3)


class WorkdirLock:
  """The exclusive training lock of one workdir (``<workdir>/train.lock``); see the module docstring.

  Use ``acquire()`` / ``release()`` or a ``with`` block. ``acquire`` raises ``WorkdirLockedError``
  while another live trainer holds it.
  """

  def __init__(self, workdir: str):
    self.workdir = os.fspath(workdir)
    self.remote = scheme_of(self.workdir) is not None
    self.path = (f"{self.workdir.rstrip('/')}/{LOCK_FILE}" if self.remote
                 else os.path.join(self.workdir, LOCK_FILE))
    self.holder = Holder.me()
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None
    self.held = False

  # -- local ------------------------------------------------------------------------------------

  def _acquire_local(self) -> None:
    import fcntl
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        try:
          fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          posix_locks = True
        except OSError as e:
          if e.errno in (errno.EAGAIN, errno.EACCES):  # held by a live process (any host with working locks)
            raise _refused(self.workdir, Holder.parse(_read_fd(fd)), self.path) from None
          if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            raise
          posix_locks = False  # this filesystem has no POSIX locks: the record decides
        # A holder that released the lock removes the file: if that happened between our open and our
        # lock, we hold a lock on an unlinked file. Start again on the file that is there now.
        try:
          same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
          same = False
        if not same:
          os.close(fd)
          continue
        previous = Holder.parse(_read_fd(fd)) if os.fstat(fd).st_size else None
        if not posix_locks and previous is not None and not previous.is_stale():
          raise _refused(self.workdir, previous, self.path)
        if os.fstat(fd).st_size:
          _took_over(previous, self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.to_bytes(), 0)
        os.fsync(fd)
        self._fd = fd
        return
      except BaseException:
        if self._fd != fd:
          os.close(fd)
        raise

  # -- bucket -----------------------------------------------------------------------------------

  def _fs(self):
    import fsspec
    return fsspec.core.url_to_fs(self.path)

  def _acquire_remote(self) -> None:
    fs, path = self._fs()
    for _ in range(3):
      if fs.exists(path):
        previous = Holder.parse(fs.cat_file(path))
        if previous is not None and not previous.is_stale():
          raise _refused(self.workdir, previous, self.path)
        _took_over(previous, self.path)
        fs.rm_file(path)
      try:
        fs.pipe_file(path, self.holder.to_bytes(), mode="create")  # create-if-absent: atomic on S3 and GCS
      except FileExistsError:  # another trainer created it between our check and our write
        continue
      except TypeError:  # an fsspec backend without mode="create": check-then-write is the best it allows
        fs.pipe_file(path, self.holder.to_bytes())
      fs.invalidate_cache(path)
      if Holder.parse(fs.cat_file(path)) == self.holder:  # read back: ours
        self._heartbeat = threading.Thread(target=self._beat, name="ddim-jax-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return
    raise _refused(self.workdir, Holder.parse(fs.cat_file(path)) if fs.exists(path) else None, self.path)

  def _beat(self) -> None:
    fs, path = self._fs()
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self.holder.heartbeat = time.time()
      try:
        fs.pipe_file(path, self.holder.to_bytes())
      except Exception as e:  # noqa: BLE001  (a missed heartbeat is not worth stopping the run)
        _log.warning("could not refresh the workdir lock %s: %s", self.path, e)

  # -- both -------------------------------------------------------------------------------------

  def acquire(self) -> WorkdirLock:
    """Takes the lock (raises ``WorkdirLockedError`` naming the holder when a live trainer has it)."""
    if self.remote:
      self._acquire_remote()
    else:
      self._acquire_local()
    self.held = True
    return self

  def release(self) -> None:
    """Removes the lock file and drops the lock; idempotent, never raises (it runs on error paths)."""
    if not self.held:
      return
    self.held = False
    try:
      if self.remote:
        self._stop.set()
        if self._heartbeat is not None:
          self._heartbeat.join(timeout=10)
        fs, path = self._fs()
        fs.rm_file(path)
      else:
        os.remove(self.path)  # while still holding it: a waiting opener then retries on a fresh file
    except Exception as e:  # noqa: BLE001  (e.g. a full disk or a lost bucket: the next start takes it over)
      _log.warning("could not remove the workdir lock %s: %s", self.path, e)
    finally:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def _read_fd(fd: int) -> bytes:
  return os.pread(fd, 4096, 0)


def lock_for_training(workdir: str) -> WorkdirLock | None:
  """Process 0 takes ``workdir``'s lock; every process raises the same error if it cannot.

  The outcome travels through the coordination service's key-value store, not a device collective:
  a collective here left the other processes inside it when process 0 then failed (a missing
  dataset), and the run hung at exit until JAX's shutdown timeout.

  Returns the lock on process 0 (release it when training ends), None on the others.
  """
  import jax
  if jax.process_count() == 1:
    return WorkdirLock(workdir).acquire()
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  key = "ddim_jax/workdir_lock"
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except errors.Error as e:
      client.key_value_set(key, "refused:" + str(e))
      raise
    client.key_value_set(key, "ok")
    return lock
  outcome = client.blocking_key_value_get(key, int(STALE_SECONDS * 1000))
  if outcome != "ok":
    raise WorkdirLockedError(outcome.removeprefix("refused:"))
  return None


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
