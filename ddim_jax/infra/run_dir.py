"""The run directory (a trainer's ``--workdir``): every path in it is named here and nowhere else, and
every write into it goes through ``ddim_jax.files``'s primitives.

    checkpoints/     orbax step folders (``checkpointing``; only folders orbax wrote are ever deleted)
    samples/         step_<n>.png grids of the EMA weights
    tensorboard/     event files
    profile/         ``jax.profiler`` traces of ``train.profile_steps``
    metrics.jsonl    one JSON record per logged step (appended)
    runs.jsonl       one JSON record per start of a trainer (appended)
    config.json      the resolved config of the newest start (replaced whole)
    train.lock       who trains here now (``workdir_lock``)
    previous/        runs that ``train --fresh`` set aside, one ``<UTC time>/`` folder each
    set_aside.json   a ``--fresh`` in progress (its journal; gone when the move is done)
    demo.safetensors, samples.png   ``ddim-jax demo``'s final weights and sample grid

Inside the workdir nothing is followed: a link, a FIFO or a device at one of these names is refused
with one line (``check_layout``), never written through or waited on; a file of the user's that is not
one of these names is never moved or deleted. The workdir itself may be a link (the user's choice).

``train --fresh`` is journalled: the list of entries to move is written first (replace, atomic), then
each entry is renamed into ``previous/<time>/``, then the journal is removed. A trainer killed in
between leaves the journal, and the next trainer on that workdir finishes the move (``finish_set_aside``)
before anything else: the old run is never half resumed, half overwritten.
"""

from __future__ import annotations

import json
import os
import stat
import time
import warnings
from collections.abc import Mapping
from typing import Any

from ddim_jax import errors, files
from ddim_jax.infra.workdir import scheme_of


class RunDirWarning(UserWarning):
  """Something in a workdir that the program did not make, left alone (the message names it)."""


class RunDir:
  """The paths of one workdir (a local folder, ``gs://`` or ``s3://``) and the writes into it."""

  CHECKPOINTS = "checkpoints"
  SAMPLES = "samples"
  TENSORBOARD = "tensorboard"
  PROFILE = "profile"
  PREVIOUS = "previous"
  METRICS = "metrics.jsonl"
  RUNS = "runs.jsonl"
  CONFIG = "config.json"
  LOCK = "train.lock"
  JOURNAL = "set_aside.json"
  DEMO_WEIGHTS = "demo.safetensors"  # `ddim-jax demo` only: the final EMA weights
  DEMO_GRID = "samples.png"  # `ddim-jax demo` only: a grid of their samples

  FOLDERS = (CHECKPOINTS, SAMPLES, TENSORBOARD, PROFILE, PREVIOUS)
  FILES = (METRICS, RUNS, CONFIG, LOCK, JOURNAL, DEMO_WEIGHTS, DEMO_GRID)
  # Files written where they are (appended, or the lock), not replaced by a rename: one link only.
  WRITTEN_IN_PLACE = (METRICS, RUNS, LOCK)
  # What a run is made of: what `train --fresh` moves to previous/<time>/.
  RUN_ENTRIES = (CHECKPOINTS, SAMPLES, TENSORBOARD, PROFILE, METRICS, RUNS, CONFIG, DEMO_WEIGHTS, DEMO_GRID)

  def __init__(self, workdir: str | os.PathLike):
    text = os.fspath(workdir)
    self.remote = scheme_of(text) is not None
    self.root = text.rstrip("/") if self.remote else text

  def path(self, *names: str) -> str:
    """The path of ``names`` under the workdir (a URL for a bucket)."""
    return "/".join([self.root, *names]) if self.remote else os.path.join(self.root, *names)

  @property
  def checkpoints(self) -> str:
    return self.path(self.CHECKPOINTS)

  @property
  def samples(self) -> str:
    return self.path(self.SAMPLES)

  @property
  def tensorboard(self) -> str:
    return self.path(self.TENSORBOARD)

  @property
  def previous(self) -> str:
    return self.path(self.PREVIOUS)

  @property
  def metrics(self) -> str:
    return self.path(self.METRICS)

  @property
  def runs(self) -> str:
    return self.path(self.RUNS)

  @property
  def config(self) -> str:
    return self.path(self.CONFIG)

  @property
  def lock(self) -> str:
    return self.path(self.LOCK)

  @property
  def journal(self) -> str:
    return self.path(self.JOURNAL)

  def sample_grid(self, step: int) -> str:
    """The path of step ``step``'s sample grid (its folder is created, and checked, here)."""
    self.folder(self.SAMPLES)
    return self.path(self.SAMPLES, f"step_{int(step):07d}.png")

  # -- what is there ------------------------------------------------------------------------------

  def check_layout(self) -> None:
    """Refuses (one line) a workdir where one of the program's names holds something else: a link,
    a FIFO, a device, a file where a folder belongs or a folder where a file belongs.

    Raises:
      files.UnsafePathError: names the path, what is there and the fix.
    """
    if self.remote:
      return
    for name in self.FOLDERS + self.FILES:
      path = self.path(name)
      info = files.lstat_or_none(path)
      if info is None:
        continue
      want_folder = name in self.FOLDERS
      there = files.describe(info.st_mode)
      if want_folder and stat.S_ISDIR(info.st_mode):
        continue
      if not want_folder and stat.S_ISREG(info.st_mode):
        if name not in self.WRITTEN_IN_PLACE or info.st_nlink == 1:
          continue
        # Appending to (or locking) a file with another name would write into that name's file too.
        there = f"a hard link ({info.st_nlink} names share the file)"
      kind = "a folder" if want_folder else "a regular file"
      raise files.unsafe(path, "the workdir's", there,
                         f"the program keeps {kind} of its own there and never writes through or replaces what "
                         "someone else put at that name: remove or rename it, or train in another --workdir")

  def folder(self, name: str) -> str:
    """The program's folder ``name`` of the workdir, created if missing (a link there is refused)."""
    path = self.path(name)
    if self.remote:
      from etils import epath  # pylint: disable=import-outside-toplevel
      epath.Path(path).mkdir(parents=True, exist_ok=True)
      return path
    files.ensure_folder(self.root, "--workdir")
    return files.ensure_folder(path, "the workdir's")

  # -- the run's records ------------------------------------------------------------------------

  def write_config(self, text: str) -> None:
    """Replaces ``config.json`` (atomic: a crash leaves the old file or the new one)."""
    if self.remote:
      _write_object(self.config, text.encode("utf-8"))
    else:
      files.replace_text(self.config, text, "the workdir's")

  def append_run(self, record: Mapping[str, Any]) -> None:
    """Adds one record to ``runs.jsonl``: an O_APPEND write of one line (a bucket object, which
    cannot be appended to, is replaced whole, which a bucket does atomically)."""
    line = json.dumps(dict(record), sort_keys=True) + "\n"
    if self.remote:
      from etils import epath  # pylint: disable=import-outside-toplevel
      runs = epath.Path(self.runs)
      previous = runs.read_text() if runs.exists() else ""
      _write_object(self.runs, (previous + line).encode("utf-8"))
    else:
      files.append_record(self.runs, line, "the workdir's")

  def read_runs(self) -> list[dict]:
    """The records of ``runs.jsonl`` ([] when there is none); a partial last line (a killed write) is
    dropped."""
    text = self._read_text(self.RUNS)
    out = []
    for line in (text or "").splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        out.append(record)
    return out

  def _read_text(self, name: str) -> str | None:
    if self.remote:
      from etils import epath  # pylint: disable=import-outside-toplevel
      path = epath.Path(self.path(name))
      return path.read_text() if path.exists() else None
    try:
      return files.read_text(self.path(name), "the workdir's", follow=False)
    except errors.MissingInputError:
      return None

  # -- train --fresh ------------------------------------------------------------------------------

  def set_aside(self) -> str | None:
    """Moves the run in the workdir (``RUN_ENTRIES``) to ``previous/<UTC time>/``, journalled.

    Anything else in the workdir (a file of the user's) stays, named in one warning. Local: renames.
    Bucket: a server-side copy of every object, then the deletes.

    Returns:
      The folder the run went to, or None when the workdir held no run.
    """
    self.finish_set_aside()
    present = self._present_entries()
    moved = [name for name in present if name in self.RUN_ENTRIES]
    others = [name for name in present if name not in self.RUN_ENTRIES + (self.PREVIOUS, self.LOCK, self.JOURNAL)]
    if others:
      warnings.warn(f"left in {self.root} (not made by the program, not moved to {self.PREVIOUS}/): "
                    f"{', '.join(others[:10])}{' ...' if len(others) > 10 else ''}", RunDirWarning, stacklevel=2)
    if not moved:
      return None
    dest = self._free_previous_name(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    journal = json.dumps({"to": f"{self.PREVIOUS}/{dest}", "entries": moved}, sort_keys=True) + "\n"
    if self.remote:
      _write_object(self.journal, journal.encode("utf-8"))
    else:
      self.folder(self.PREVIOUS)
      files.replace_text(self.journal, journal, "the workdir's")
    return self.finish_set_aside()

  def finish_set_aside(self) -> str | None:
    """Completes a ``set_aside`` that a crash interrupted (its journal is still there); returns where
    the run went, or None when no set-aside was in progress."""
    self._remove_stale_temporaries()
    text = self._read_text(self.JOURNAL)
    if text is None:
      return None
    try:
      journal = json.loads(text)
      dest, entries = str(journal["to"]), [str(e) for e in journal["entries"]]
      if not dest.startswith(f"{self.PREVIOUS}/") or "/" in dest[len(self.PREVIOUS) + 1:] or \
          any(e not in self.RUN_ENTRIES for e in entries):
        raise ValueError(dest)
    except (ValueError, KeyError, TypeError):
      raise errors.InputError(f"{self.journal} (the journal of an interrupted `train --fresh`) is unreadable: "
                              f"move what you want to keep out of {self.root}, remove {self.JOURNAL}, and run "
                              "again") from None
    if self.remote:
      self._move_objects(entries, dest)
    else:
      self._move_local(entries, dest)
    return self.path(*dest.split("/"))

  def _remove_stale_temporaries(self) -> None:
    """Removes the temporaries of a replace that a kill interrupted (``files.TEMPORARY_NAME``, regular
    files) from the workdir's top folder: called under the lock, so no write of another trainer's."""
    if self.remote or not os.path.isdir(self.root):
      return
    for name in os.listdir(self.root):
      path = self.path(name)
      info = files.lstat_or_none(path)
      if files.TEMPORARY_NAME.match(name) and info is not None and stat.S_ISREG(info.st_mode):
        files.remove_own(path, info)

  def _move_local(self, entries: list[str], dest: str) -> None:
    target = self.path(*dest.split("/"))
    files.ensure_folder(self.previous, "the workdir's")
    files.ensure_folder(target, "the workdir's")
    for name in entries:
      source, to = self.path(name), os.path.join(target, name)
      if files.lstat_or_none(source) is None:
        continue  # moved before the interruption
      if files.lstat_or_none(to) is not None:
        raise errors.InputError(f"finishing an interrupted `train --fresh`: both {source} and {to} exist; keep one "
                                f"of them (move the other out of {self.root}), then run again")
      try:
        os.rename(source, to)
      except OSError as e:
        raise files.os_error(e, source, "the workdir's", f"move to {to}") from None
    files.remove_own(self.journal, os.lstat(self.journal))

  def _move_objects(self, entries: list[str], dest: str) -> None:
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, root = fsspec.core.url_to_fs(self.root)
    root = root.rstrip("/")
    fs.invalidate_cache()
    objects = sorted(o for o in fs.find(root) if o.startswith(root + "/")) if fs.exists(root) else []
    moved = [o for o in objects if o[len(root) + 1:].split("/", 1)[0] in entries]
    for obj in moved:  # copy all first: an interruption leaves copies, never a loss
      fs.copy(obj, f"{root}/{dest}/{obj[len(root) + 1:]}")
    if moved:
      fs.rm(moved)
    fs.rm_file(f"{root}/{self.JOURNAL}")

  def _present_entries(self) -> list[str]:
    if not self.remote:
      return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, root = fsspec.core.url_to_fs(self.root)
    fs.invalidate_cache()
    if not fs.exists(root):
      return []
    return sorted({o[len(root.rstrip("/")) + 1:].split("/", 1)[0] for o in fs.find(root)
                   if o.startswith(root.rstrip("/") + "/")})

  def _free_previous_name(self, stamp: str) -> str:
    taken = set(self._previous_names())
    name, n = stamp, 0
    while name in taken:
      n += 1
      name = f"{stamp}-{n}"
    return name

  def _previous_names(self) -> list[str]:
    if not self.remote:
      return os.listdir(self.previous) if os.path.isdir(self.previous) else []
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, root = fsspec.core.url_to_fs(self.previous)
    root = root.rstrip("/")
    return [o[len(root) + 1:].split("/", 1)[0] for o in fs.find(root) if o.startswith(root + "/")] \
        if fs.exists(root) else []


def _write_object(url: str, data: bytes) -> None:
  """Writes a bucket object whole (the store replaces it atomically)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  epath.Path(url).write_bytes(data)
