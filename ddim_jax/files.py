"""How the program touches a file: the only module that opens a path for writing (a base module, like
``errors``: every layer writes files, so every layer may import it; it imports nothing else of ddim_jax).

Whatever sits at a path (a link, a FIFO, a device node, a folder, a hard link to someone else's file)
is never written through, waited on or deleted. Four primitives:

- ``replace_file``: a temporary in the same folder (``O_CREAT|O_EXCL|O_NOFOLLOW``, a short name, so a
  255-character name still fits), written, fsynced, renamed over the path. A crash leaves the old file
  or the new one, never half of one. What is at the path must be nothing or a regular file; a link, a
  FIFO, a device or a folder there is refused (``UnsafePathError``, one line), checked before the write
  and again just before the rename. An existing file keeps its mode; a new one gets ``0666 & ~umask``
  (the kernel applies the umask to the temporary's 0666), whatever the library writing it would do.
- ``append_record``: one ``write`` of a whole record with ``O_APPEND|O_NOFOLLOW``, to a regular file
  with a single link (a hard link would write into the other name's file).
- ``read_bytes`` / ``open_regular``: ``O_NONBLOCK`` (a FIFO is never waited on) and ``fstat`` before a
  byte is read: only a regular file, under a size cap, is read. Files of the program's own folders are
  opened ``O_NOFOLLOW``; a file the user names may be a link (model hubs keep weights as links to
  blobs), but what it resolves to must be a regular file too.
- ``ensure_folder``: a folder the program owns (``samples/``, ``checkpoints/``) is created, or must
  already be a real folder: a link or a file there is refused, so nothing lands outside the workdir.

Deleting: ``remove_own`` removes a file only if it is still the one this process created (same inode).

Remote paths (``gs://``, ``s3://``) are not handled here: an object write replaces the object whole
(atomic on both stores), and there are no links, FIFOs or devices in a bucket.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ddim_jax import errors

# A file the program reads whole (a config, a record file, a lock) is never this large; the cap
# bounds the memory of reading whatever a co-user left at the path.
DEFAULT_READ_CAP = 64 << 20

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class UnsafePathError(errors.InputError):
  """What sits at a path is not what the program may write or read there (a link, a FIFO, a device,
  a folder, a hard link); the message names the path, what is there and the fix."""


def describe(mode: int) -> str:
  """What a ``st_mode`` is, in words: 'a symbolic link', 'a FIFO', 'a character device', ..."""
  for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                      (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                      (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file")):
    if test(mode):
      return words
  return "not a regular file"


def _label(path: str, what: str | None) -> str:
  return f"{what} {path!r}" if what else repr(path)


def unsafe(path: str, what: str | None, there: str, fix: str) -> UnsafePathError:
  """The one-line refusal of ``path`` (``what``: the option or file it is, e.g. '--out')."""
  return UnsafePathError(f"{_label(path, what)} is {there}; {fix}")


def os_error(e: OSError, path: str, what: str | None, doing: str = "write") -> errors.InputError:
  """An OSError of reading or writing ``path`` as one line naming the path and the fix."""
  reason = e.strerror or str(e)
  if e.errno == errno.ENOSPC:
    fix = "free some space or choose a path on another disk"
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "fix the permissions or choose another path"
  elif e.errno == errno.ENAMETOOLONG:
    fix = "choose a shorter name"
  elif e.errno == errno.ELOOP:
    return unsafe(path, what, "a symbolic link", "remove the link or choose another path")
  elif e.errno == errno.ENXIO:
    return unsafe(path, what, "a FIFO or a device without a reader", "remove it or choose another path")
  else:
    fix = "choose another path"
  return errors.InputError(f"cannot {doing} {_label(path, what)} ({reason}); {fix}")


# ------------------------------------------------------------------------------------------------
# What sits at a path.


def lstat_or_none(path: str) -> os.stat_result | None:
  """``os.lstat(path)``, or None when nothing is there."""
  try:
    return os.lstat(path)
  except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file in the path, so nothing can be there
    return None


def check_replaceable(path: str, what: str | None = None) -> os.stat_result | None:
  """What is at ``path`` before a ``replace_file``: None (nothing) or the regular file's stat.

  Raises:
    UnsafePathError: a link, a FIFO, a device, a socket or a folder is there.
  """
  info = lstat_or_none(path)
  if info is None or stat.S_ISREG(info.st_mode):
    return info
  if stat.S_ISDIR(info.st_mode):
    raise unsafe(path, what, "a folder", "give the path of a file (in it or elsewhere)")
  raise unsafe(path, what, describe(info.st_mode), "it is left alone: remove it or choose another path")


def ensure_folder(path: str, what: str | None = None, create: bool = True) -> str:
  """``path`` as a real folder of the program's: created (with its parents) when missing.

  A folder the program owns is never a link: a link there (to anywhere) would put the program's
  files outside the folder it was given.

  Raises:
    UnsafePathError: a link, a file or anything else that is not a folder is at ``path``.
    errors.InputError: it cannot be created (permissions, a full disk, a read-only disk).
  """
  info = lstat_or_none(path)
  if info is None:
    if not create:
      raise errors.MissingInputError(f"{_label(path, what)} does not exist")
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise os_error(e, path, what, "create the folder") from None
    info = os.lstat(path)
  if stat.S_ISDIR(info.st_mode):
    return path
  there = describe(info.st_mode)
  raise unsafe(path, what, there, "the program writes only into a folder of its own there: remove it (or move it "
               "away) and run again")


def ensure_parent(path: str, what: str | None = None) -> str:
  """Creates the missing folders above an output file (the user's path: links above it are the user's
  choice and followed); returns the parent."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    try:
      os.makedirs(parent, exist_ok=True)
    except FileExistsError:
      raise errors.InputError(f"{_label(path, what)}: {parent!r} is not a folder; choose another path") from None
    except OSError as e:
      raise os_error(e, parent, what, "create the folder of") from None
  return parent


# ------------------------------------------------------------------------------------------------
# Writing.


TEMPORARY_NAME = re.compile(r"^\.ddim-[0-9a-f]{16}\.tmp$")


def _temporary(parent: str) -> tuple[str, int]:
  """A new file of this process in ``parent``: (path, fd), created with O_EXCL|O_NOFOLLOW and mode
  0666 (the umask applies). The name is short (``.ddim-<16 hex>.tmp``, ``TEMPORARY_NAME``)."""
  for _ in range(16):
    tmp = os.path.join(parent, f".ddim-{secrets.token_hex(8)}.tmp")
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
    except FileExistsError:
      continue
    return tmp, fd
  raise FileExistsError(errno.EEXIST, "no free temporary name", parent)


def remove_own(path: str, info: os.stat_result) -> None:
  """Removes ``path`` if it is still the file of ``info`` (same device and inode), else leaves it."""
  now = lstat_or_none(path)
  if now is not None and (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
    with contextlib.suppress(OSError):
      os.unlink(path)


def _keep_owner_and_mode(fd: int, existing: os.stat_result | None) -> None:
  """The temporary takes the replaced file's mode (and, for root, its owner): replacing a file keeps
  who may read it."""
  if existing is None:
    return
  os.fchmod(fd, stat.S_IMODE(existing.st_mode))
  if os.geteuid() == 0 and (existing.st_uid, existing.st_gid) != (0, 0):
    with contextlib.suppress(OSError):
      os.fchown(fd, existing.st_uid, existing.st_gid)


def _sync_folder(folder: str) -> None:
  """fsync a folder (the rename's entry); best effort: some filesystems refuse it."""
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY | _O_CLOEXEC)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def replace_file(path: str, content: bytes | Callable[[BinaryIO], None], what: str | None = None,
                 sync: bool = True) -> None:
  """Writes ``content`` (bytes, or a function that writes to a binary file object) to ``path`` whole.

  See the module docstring: a temporary in the same folder, fsync, rename; nothing but a regular file
  at ``path`` is replaced; the mode of an existing file is kept. The parent folder must exist
  (``ensure_parent`` / ``ensure_folder``).

  Raises:
    UnsafePathError: what is at ``path`` is not a regular file (or changed into one that is not
      while the file was written).
    errors.InputError: the write failed (a full disk, permissions, a name too long), one line.
  """
  existing = check_replaceable(path, what)
  parent = os.path.dirname(os.path.abspath(path))
  try:
    tmp, fd = _temporary(parent)
  except OSError as e:
    raise os_error(e, path, what) from None
  mine = os.fstat(fd)
  try:
    with os.fdopen(fd, "wb", closefd=False) as f:
      if callable(content):
        content(f)
      else:
        f.write(content)
      f.flush()
    _keep_owner_and_mode(fd, existing)
    if sync:
      os.fsync(fd)
    os.close(fd)
    fd = -1
    check_replaceable(path, what)  # again: a link or a FIFO planted while we wrote is not replaced either
    os.rename(tmp, path)
  except OSError as e:
    remove_own(tmp, mine)
    raise os_error(e, path, what) from None
  except BaseException:
    remove_own(tmp, mine)
    raise
  finally:
    if fd >= 0:
      os.close(fd)
  if sync:
    _sync_folder(parent)


def replace_text(path: str, text: str, what: str | None = None) -> None:
  """``replace_file`` of UTF-8 text."""
  replace_file(path, text.encode("utf-8"), what)


def _open_appendable(path: str, what: str | None) -> int:
  """An O_APPEND descriptor of the regular, single-link file at ``path`` (created if missing)."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, 0o666)
  except OSError as e:
    info = lstat_or_none(path)
    if info is not None and not stat.S_ISREG(info.st_mode):
      raise unsafe(path, what, describe(info.st_mode), "records are appended only to a regular file: remove it "
                   "and run again") from None
    raise os_error(e, path, what) from None
  try:
    _check_single_regular(fd, path, what)
  except BaseException:
    os.close(fd)
    raise
  return fd


def _check_single_regular(fd: int, path: str, what: str | None) -> os.stat_result:
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode):
    raise unsafe(path, what, describe(info.st_mode), "remove it and run again")
  if info.st_nlink != 1:
    raise unsafe(path, what, f"a hard link ({info.st_nlink} names share it)", "writing it would change the other "
                 "names' file too: remove it (or replace it with a copy) and run again")
  return info


class RecordFile:
  """An append-only file of records (``metrics.jsonl``, ``runs.jsonl``): each ``append`` is one
  ``write`` of whole lines with ``O_APPEND``, so a crash leaves the earlier records intact and at most
  one partial last line (which readers drop)."""

  def __init__(self, path: str, what: str | None = None):
    self.path, self.what = path, what
    self._fd = _open_appendable(path, what)
    # A write killed half-way left a partial last line: the next record starts on a line of its own
    # (readers drop the partial one), instead of being glued to it and lost with it.
    size = os.fstat(self._fd).st_size
    self._newline_first = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"

  def append(self, record: bytes | str) -> None:
    """Appends ``record`` (one or more whole lines) in one write."""
    data = record.encode("utf-8") if isinstance(record, str) else record
    if self._newline_first:
      data, self._newline_first = b"\n" + data, False
    view = memoryview(data)
    try:
      while view:  # a regular file takes it in one write; the loop only guards a short write
        view = view[os.write(self._fd, view):]
    except OSError as e:
      raise os_error(e, self.path, self.what) from None

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def __enter__(self) -> RecordFile:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def append_record(path: str, record: bytes | str, what: str | None = None) -> None:
  """Opens ``path`` for appending (see ``RecordFile``), appends one record and closes it."""
  with RecordFile(path, what) as f:
    f.append(record)


# ------------------------------------------------------------------------------------------------
# Reading.


@contextlib.contextmanager
def open_regular(path: str, what: str | None = None, follow: bool = True,
                 max_bytes: int | None = None) -> Iterator[BinaryIO]:
  """A binary file object of the regular file at ``path``, checked before anything is read.

  ``follow``: whether ``path`` itself may be a symbolic link (files the user names: yes; files of the
  program's own folders: no). A FIFO is opened without blocking and refused; so are devices, sockets
  and folders. ``max_bytes``: refuse a larger file.

  Raises:
    errors.MissingInputError: nothing is at ``path``.
    UnsafePathError: not a regular file (or a link where ``follow`` is False), or over ``max_bytes``.
  """
  flags = os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | (0 if follow else _O_NOFOLLOW)
  try:
    fd = os.open(path, flags)
  except FileNotFoundError:
    raise errors.MissingInputError(f"{_label(path, what)} does not exist") from None
  except OSError as e:
    raise os_error(e, path, what, "read") from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise unsafe(path, what, describe(info.st_mode), "give a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
      raise unsafe(path, what, f"{info.st_size} bytes, more than the {max_bytes} such a file can be",
                   "give the right file")
    if _O_NONBLOCK:  # a regular file: blocking reads from here on
      import fcntl  # pylint: disable=import-outside-toplevel
      fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
    f = os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise
  with f:
    yield f


def read_bytes(path: str, what: str | None = None, follow: bool = True,
               max_bytes: int = DEFAULT_READ_CAP) -> bytes:
  """The bytes of the regular file at ``path`` (see ``open_regular``), at most ``max_bytes`` of them."""
  with open_regular(path, what, follow, max_bytes) as f:
    return f.read(max_bytes + 1)[:max_bytes]


def read_text(path: str, what: str | None = None, follow: bool = True, max_bytes: int = DEFAULT_READ_CAP) -> str:
  """``read_bytes`` as UTF-8 text (undecodable bytes replaced)."""
  return read_bytes(path, what, follow, max_bytes).decode("utf-8", errors="replace")


def buffer_writer(write: Callable[[BinaryIO], None]) -> bytes:
  """What ``write(file)`` writes, as bytes (for libraries that seek in their output, e.g. HDF5)."""
  buffer = io.BytesIO()
  write(buffer)
  return buffer.getvalue()


def umask() -> int:
  """This process's umask, read without changing it (``/proc/self/status`` on Linux; elsewhere set and
  restored at once)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
