"""One trainer per workdir: ``<workdir>/train.lock``, taken at start, removed at the end.

Two trainers on one workdir would both resume from the same step and overwrite each other's
checkpoints and records. A second trainer is refused with one line naming the holder (host, pid,
start time); a holder that died is taken over with a warning. Local and shared disks use
``fcntl.lockf`` (dropped by the kernel when the holder dies); buckets use an atomic
create-if-absent and a heartbeat. Which holds where, and why: docs/checkpoints.md ("The workdir
lock").
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings

from ddim_jax import errors
from ddim_jax.infra.workdir import scheme_of

LOCK_FILE = "train.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0

_log = logging.getLogger(__name__)


class WorkdirLockedError(errors.Error):
  """Another trainer holds the workdir (the message names it: host, pid, start time)."""


class WorkdirLockWarning(UserWarning):
  """A stale lock (its holder is gone) was taken over."""


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
