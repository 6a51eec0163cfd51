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
import secrets
import socket
import stat
import sys
import threading
import time
import warnings

from ddim_jax import errors, files
from ddim_jax.infra import workdir as workdir_lib
from ddim_jax.infra.run_dir import RunDir
from ddim_jax.infra.workdir import scheme_of

LOCK_FILE = RunDir.LOCK
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
  token: str = ""  # random, per start: a lock is released only by the holder whose token it holds

  @classmethod
  def me(cls) -> Holder:
    now = time.time()
    return cls(socket.gethostname(), os.getpid(),
               datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"), now,
               " ".join(sys.argv)[:500], secrets.token_hex(8))

  @classmethod
  def parse(cls, data: bytes) -> Holder | None:
    """The holder recorded in a lock file (None: empty or unreadable, e.g. a crash mid-write)."""
    try:
      fields = json.loads(data.decode("utf-8"))
      return cls(str(fields["host"]), int(fields["pid"]), str(fields.get("started", "?")),
                 float(fields.get("heartbeat", 0.0)), str(fields.get("command", "")), str(fields.get("token", "")))
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


_NOT_OURS = ("a trainer never writes through or waits on what someone put at its lock's name: remove it, "
             "or train in another --workdir")


def _refused(workdir: str, holder: Holder | None, lock_path: str, posix_locks: bool = True) -> WorkdirLockedError:
  who = holder.describe() if holder else "another trainer (its record is unreadable)"
  # Deleting a live trainer's lock lets a second trainer in: never suggest it where the lock of a
  # dead trainer is taken over by itself (POSIX locks: the kernel drops a dead holder's lock).
  gone = ("a lock whose trainer is gone is taken over automatically" if posix_locks else
          f"a lock whose trainer is gone is taken over once its record is {int(STALE_SECONDS // 60)} minutes old")
  return WorkdirLockedError(
      f"{workdir} is in use by another trainer: {who} (lock {lock_path}). Wait for it to finish or stop it, "
      f"or train in another --workdir ({gone})")


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
    self.path = RunDir(self.workdir).lock
    self.holder = Holder.me()
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None
    self.held = False

  # -- local ------------------------------------------------------------------------------------

  def _open_local(self) -> tuple[int, bool]:
    """(fd, created) of the lock file: opened O_NOFOLLOW|O_NONBLOCK and checked to be a regular file with
    one link, so a link, a FIFO or a hard link planted at ``train.lock`` is refused, never written
    through or waited on."""
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
      return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
      pass
    except OSError as e:
      raise self._os_error(e) from None
    try:
      fd = os.open(self.path, flags)
    except FileNotFoundError:  # released between the two opens
      return self._open_local()
    except OSError as e:
      raise self._os_error(e) from None
    try:
      info = os.fstat(fd)
      if not stat.S_ISREG(info.st_mode):
        raise files.unsafe(self.path, "the workdir lock", files.describe(info.st_mode), _NOT_OURS)
      if info.st_nlink != 1:
        raise files.unsafe(self.path, "the workdir lock", f"a hard link ({info.st_nlink} names share it)", _NOT_OURS)
    except BaseException:
      os.close(fd)
      raise
    return fd, False

  def _os_error(self, e: OSError) -> errors.Error:
    info = files.lstat_or_none(self.path)
    if info is not None and not stat.S_ISREG(info.st_mode):
      return files.unsafe(self.path, "the workdir lock", files.describe(info.st_mode), _NOT_OURS)
    if e.errno == errno.ENOSPC:
      return workdir_lib.disk_full_error(self.workdir, None)
    return files.os_error(e, self.path, "the workdir lock", "create")

  def _acquire_local(self) -> None:
    import fcntl
    while True:
      fd, created = self._open_local()
      try:
        try:
          fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          posix_locks = True
        except OSError as e:
          if e.errno in (errno.EAGAIN, errno.EACCES):  # held by a live process (any host with working locks)
            raise _refused(self.workdir, Holder.parse(_read_fd(fd)), self.path, posix_locks=True) from None
          if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            raise
          posix_locks = False  # this filesystem has no POSIX locks: the record decides
        # A holder that released the lock removes the file: if that happened between our open and our
        # lock, we hold a lock on an unlinked file. Start again on the file that is there now.
        if not self._is_at_path(fd):
          os.close(fd)
          continue
        previous = Holder.parse(_read_fd(fd)) if os.fstat(fd).st_size else None
        if not posix_locks and previous is not None and not previous.is_stale():
          raise _refused(self.workdir, previous, self.path, posix_locks=False)
        if os.fstat(fd).st_size:
          _took_over(previous, self.path)
        try:
          os.ftruncate(fd, 0)
          os.pwrite(fd, self.holder.to_bytes(), 0)
          os.fsync(fd)
        except OSError as e:
          if created:  # an empty lock of ours would only confuse the next start
            files.remove_own(self.path, os.fstat(fd))
          raise self._os_error(e) from None
        self._fd = fd
        return
      except BaseException:
        if self._fd != fd:
          os.close(fd)
        raise

  def _is_at_path(self, fd: int) -> bool:
    """Whether the file of ``fd`` is still the one at ``train.lock`` (not removed or replaced)."""
    info, now = os.fstat(fd), files.lstat_or_none(self.path)
    return now is not None and (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)

  def _is_mine(self, holder: Holder | None) -> bool:
    """Whether a lock record is this trainer's (its token; the heartbeat changes)."""
    return holder is not None and (holder.host, holder.pid, holder.token) == (
        self.holder.host, self.holder.pid, self.holder.token)

  def still_held(self) -> bool:
    """Whether ``train.lock`` is still this trainer's (a user may have deleted it, and another trainer
    may have taken the workdir since): the trainer checks before each save, so that two trainers never
    interleave their checkpoints."""
    if not self.held:
      return False
    if self.remote:
      try:
        fs, path = self._fs()
        fs.invalidate_cache(path)
        return self._is_mine(Holder.parse(fs.cat_file(path)))
      except Exception:  # noqa: BLE001  (an unreachable bucket: the save itself will say so)
        return True
    return self._fd is not None and self._is_at_path(self._fd)

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
          raise _refused(self.workdir, previous, self.path, posix_locks=False)
        _took_over(previous, self.path)
        fs.rm_file(path)
      try:
        fs.pipe_file(path, self.holder.to_bytes(), mode="create")  # create-if-absent: atomic on S3 and GCS
      except FileExistsError:  # another trainer created it between our check and our write
        continue
      except TypeError:  # an fsspec backend without mode="create": check-then-write is the best it allows
        fs.pipe_file(path, self.holder.to_bytes())
      fs.invalidate_cache(path)
      if self._is_mine(Holder.parse(fs.cat_file(path))):  # read back: ours
        self._heartbeat = threading.Thread(target=self._beat, name="ddim-jax-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return
    raise _refused(self.workdir, Holder.parse(fs.cat_file(path)) if fs.exists(path) else None, self.path,
                   posix_locks=False)

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
    """Removes the lock file if it is still this trainer's, and drops the lock; idempotent, never raises
    (it runs on error paths)."""
    if not self.held:
      return
    self.held = False
    try:
      if self.remote:
        self._stop.set()
        if self._heartbeat is not None:
          self._heartbeat.join(timeout=10)
        fs, path = self._fs()
        fs.invalidate_cache(path)
        if self._is_mine(Holder.parse(fs.cat_file(path))):  # compare, then remove: never another's lock
          fs.rm_file(path)
        else:
          _log.warning("the workdir lock %s is not this trainer's any more: left alone", self.path)
      elif self._fd is not None and self._is_at_path(self._fd):
        # Compare (the same file as the one we hold), then remove, while still holding it: a waiting
        # opener then retries on a fresh file. Another trainer's lock (ours was deleted) stays.
        os.remove(self.path)
      else:
        _log.warning("the workdir lock %s is not this trainer's any more: left alone", self.path)
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


class LockLostError(errors.Error):
  """The workdir lock was removed or replaced while this trainer ran: it stops without saving, so that
  two trainers never interleave their checkpoints."""


def check_still_held(lock: WorkdirLock | None, step: int, last_saved: int | None) -> None:
  """Raises ``LockLostError`` (before a save) when ``lock`` is no longer this trainer's.

  ``lock`` None: nothing to check (not process 0 of a run, or a run of several processes, where a
  refusal on process 0 alone would leave the others waiting in the save's collective).
  """
  if lock is None or lock.still_held():
    return
  kept = f"its last checkpoint is step {last_saved}" if last_saved is not None else "it saved no checkpoint"
  raise LockLostError(
      f"the workdir lock {lock.path} was removed or replaced while this trainer ran (another trainer may be "
      f"writing {lock.workdir} now): stopped at step {step} without saving; {kept}. Make sure one trainer runs "
      "there, then run the same command to resume")


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
