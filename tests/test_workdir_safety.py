"""Nothing a user does harms a run: read-only readers, one trainer per workdir, records that survive
a crash mid-write, and a full disk said in one line.

The trainers are real ``ddim-jax train`` subprocesses of the tiny config (tests/train_helpers.py);
the readers run ``cli.main`` in this process. A read-only workdir is a read-only bind mount
(root) or a tree without write permission (other users); a full disk is a small tmpfs (root).
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from ddim_jax import cli
from ddim_jax.infra import checkpointing, workdir as workdir_lib, workdir_lock
from ddim_jax.infra.run_dir import RunDir
from train_helpers import run, subprocess_env, tiny_overrides, train_command, two_processes, wait_until


def snapshot(root) -> dict:
  """{relative path: (kind, size, mtime_ns)} of every entry under ``root``: what a reader must not change."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.lstat(path)
      out[os.path.relpath(path, root)] = ("d" if name in dirnames else "f", st.st_size if name in filenames else 0,
                                          st.st_mtime_ns)
  return out


def checkpoint_steps(workdir) -> list[int]:
  return workdir_lib.committed_steps(os.path.join(workdir, "checkpoints"))


def metric_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err, err[-3000:]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def _mount(*args) -> bool:
  return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def read_only_copy(src, tmp_path):
  """A copy of ``src`` that this process cannot write: a read-only bind mount as root (where permission
  bits do not bind), a tree without write permission otherwise."""
  copy = tmp_path / "copy"
  shutil.copytree(src, copy, symlinks=True)
  if os.geteuid() != 0:
    for dirpath, _, _ in os.walk(copy):
      os.chmod(dirpath, 0o555)
    try:
      yield copy
    finally:
      for dirpath, _, _ in os.walk(copy):
        os.chmod(dirpath, 0o755)
    return
  view = tmp_path / "read_only"
  view.mkdir()
  if not _mount("--bind", str(copy), str(view)):
    pytest.skip("root here, but mount --bind is not permitted (no CAP_SYS_ADMIN): a read-only workdir cannot be made")
  try:
    if not _mount("-o", "remount,bind,ro", str(view)):
      pytest.skip("mount -o remount,bind,ro is not permitted here: a read-only workdir cannot be made")
    yield view
  finally:
    subprocess.run(["umount", str(view)], check=False)


# ------------------------------------------------------------------------------------------------
# 1. Readers never write.


@pytest.mark.slow
def test_readers_work_on_a_read_only_workdir_and_change_nothing(trained, tmp_path, capsys):
  """export/sample/evaluate from a workdir this process cannot write, with a killed save's tmp folder
  and a damaged newest step in it: they read the older step and leave every file as it was."""
  staged = tmp_path / "staged"
  shutil.copytree(trained, staged)
  # What a reader used to "repair": a save in progress (orbax's tmp folder) and a damaged newest step.
  shutil.copytree(staged / "checkpoints" / "8", staged / "checkpoints" / "10.orbax-checkpoint-tmp")
  (staged / "checkpoints" / "8" / "meta" / "metadata").write_text('{"config": {"seed"')  # truncated JSON
  with read_only_copy(staged, tmp_path) as workdir:
    with pytest.raises(OSError):  # really read-only for this process
      (workdir / "probe").write_text("x")
    before = snapshot(workdir)
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out / "w.safetensors")]) == 0
    assert "EMA weights of step 6" in capsys.readouterr().out  # fell back past the truncated step 8
    assert cli.main(["sample", "--workdir", str(workdir), "--out", str(out / "g.png"), "--num-images", "2",
                     "--steps", "1", "--cpu-devices", "1"]) == 0
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out / "w4.safetensors"), "--step", "4"]) == 0
    assert snapshot(workdir) == before
    assert not (workdir / "checkpoints" / checkpointing.QUARANTINE_DIRNAME).exists()


@pytest.mark.slow  # its fixture trains a model
def test_export_falls_back_past_a_newest_step_without_metadata(trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8" / "meta")
  before = snapshot(workdir)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "w.safetensors")]) == 0
  assert "EMA weights of step 6" in capsys.readouterr().out
  assert any("step 8" in str(w.message) for w in caught)
  assert snapshot(workdir) == before


@pytest.mark.slow  # its fixture trains a model
def test_the_checkpoint_digest_covers_the_normaliser(trained, tmp_path, capsys):
  """A normaliser edited on disk (the weights then mean other images) is caught like a flipped weight bit."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  path = workdir / "checkpoints" / "8" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["normalizer"]["mean"][0] += 0.25
  path.write_text(json.dumps(meta))
  with pytest.warns(checkpointing.CheckpointRestoreWarning, match="step 8.*metadata"):
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "w.safetensors")]) == 0
  assert "EMA weights of step 6" in capsys.readouterr().out
  with pytest.raises(checkpointing.CheckpointCorruptError, match="metadata"):
    cli_step = ["export", "--workdir", str(workdir), "--out", str(tmp_path / "w8.safetensors"), "--step", "8"]
    cli.main(cli_step + ["--debug"])


@pytest.mark.slow
def test_readers_in_a_loop_against_a_live_run_leave_it_whole(tmp_path, cache_dir, capsys):
  """export and sample, again and again, while a trainer saves every 2 steps: the run finishes with
  every checkpoint and each logged step once (a reader once deleted the save in progress)."""
  workdir = tmp_path / "run"
  extra = {"train.num_steps": 40, "train.keep_checkpoints": 100}
  proc = subprocess.Popen(train_command(workdir, cache_dir, **extra), env=subprocess_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert wait_until(lambda: len(checkpoint_steps(workdir)) >= 1, proc), "no checkpoint"
  reads = 0
  while proc.poll() is None:
    out = str(tmp_path / "w.safetensors")
    assert cli.main(["export", "--workdir", str(workdir), "--out", out]) == 0, capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(workdir), "--out", str(tmp_path / "g.png"), "--num-images", "2",
                     "--steps", "1", "--cpu-devices", "1"]) == 0, capsys.readouterr().err
    reads += 1
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert reads >= 2, f"only {reads} reads overlapped the run"
  assert checkpoint_steps(workdir) == list(range(2, 41, 2))
  assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
  steps = metric_steps(workdir)
  assert steps == sorted(set(steps)) and steps[-1] == 40


# ------------------------------------------------------------------------------------------------
# 2. One trainer per workdir.


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_first(tmp_path, cache_dir, capsys):
  workdir = tmp_path / "run"
  extra = {"train.num_steps": 2000, "train.checkpoint_every": 100, "train.log_every": 10}
  first = subprocess.Popen(train_command(workdir, cache_dir, **extra), env=subprocess_env(1),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert wait_until(lambda: (workdir / "metrics.jsonl").exists(), first), "the first trainer never started"
    code = cli.main(["train", "--config", "demo", "--workdir", str(workdir), *tiny_overrides(cache_dir, **extra)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"pid {first.pid} on host {os.uname().nodename}" in line and "in use by another trainer" in line, line
    assert first.poll() is None  # the refusal did not disturb the first trainer
  finally:
    first.terminate()  # SIGTERM: save the current step and exit cleanly
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  steps = metric_steps(workdir)
  assert steps == sorted(set(steps))
  assert len([line for line in (workdir / "runs.jsonl").read_text().splitlines() if line.strip()]) == 1
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _record(pid: int, host: str | None = None, heartbeat: float = 0.0) -> bytes:
  return workdir_lock.Holder(host or os.uname().nodename, pid, "2026-01-01T00:00:00+00:00", heartbeat).to_bytes()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, cache_dir, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = _dead_pid()
  (workdir / workdir_lock.LOCK_FILE).write_bytes(_record(dead))  # a trainer killed with SIGKILL
  with pytest.warns(workdir_lock.WorkdirLockWarning, match=f"pid {dead} on host"):
    assert cli.main(["train", "--config", "demo", "--workdir", str(workdir),
                     *tiny_overrides(cache_dir, **{"train.num_steps": 2})]) == 0
  assert checkpoint_steps(workdir) == [2]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_without_posix_locks_the_record_decides(tmp_path, monkeypatch):
  """On a filesystem without POSIX locks: a live pid on this host holds the lock, a dead one does not."""
  def no_locks(*args, **kwargs):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "lockf", no_locks)
  path = tmp_path / workdir_lock.LOCK_FILE
  path.write_bytes(_record(os.getppid()))  # alive: the process that runs pytest
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getppid()} on host"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert workdir_lock.Holder.parse(path.read_bytes()).pid == os.getppid()  # untouched
  path.write_bytes(_record(_dead_pid()))
  with pytest.warns(workdir_lock.WorkdirLockWarning):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert workdir_lock.Holder.parse(path.read_bytes()).pid == os.getpid()
  lock.release()
  assert not path.exists()


@pytest.mark.slow
def test_a_locked_workdir_refuses_both_processes_of_a_two_process_run(tmp_path, cache_dir):
  """One lock per run: process 0 tries it, and both processes stop with the same line (no hang)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from ddim_jax.infra import workdir_lock as w; w.WorkdirLock(sys.argv[1]).acquire(); "
      "print('held', flush=True); time.sleep(600)"), str(workdir)], env=subprocess_env(1), stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    procs = two_processes(train_command(workdir, cache_dir))
    outputs = procs.communicate(timeout=300)
    assert [p.returncode for p in procs] == [2, 2], procs.report()
    for _, err in outputs:
      assert f"in use by another trainer: pid {holder.pid} on host" in err, procs.report()
      assert "Traceback" not in err, procs.report()
  finally:
    holder.kill()
    holder.wait()
  assert not (workdir / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# 3. Records that survive a crash mid-write, and a full disk.


@pytest.mark.slow
def test_a_partial_last_metrics_line_is_dropped_on_resume(trained, tmp_path, cache_dir, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 10, "loss": 0.1')  # a crash mid-write
  with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
    assert cli.main(["train", "--config", "demo", "--workdir", str(workdir),
                     *tiny_overrides(cache_dir, **{"train.num_steps": 10})]) == 0
  assert metric_steps(workdir) == [2, 4, 6, 8, 10]


@pytest.mark.slow  # its fixture trains a model
def test_a_start_that_fails_before_training_leaves_no_run_record(trained, tmp_path, cache_dir, monkeypatch):
  from ddim_jax.infra import parallel
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  runs_before = (workdir / "runs.jsonl").read_text()
  config_before = (workdir / "config.json").read_text()

  def broken(*args, **kwargs):
    raise RuntimeError("compilation failed")

  monkeypatch.setattr(parallel, "make_train_fn", broken)
  with pytest.raises(RuntimeError, match="compilation failed"):
    cli.main(["train", "--config", "demo", "--workdir", str(workdir),
              *tiny_overrides(cache_dir, **{"train.num_steps": 10})])
  assert (workdir / "runs.jsonl").read_text() == runs_before
  assert (workdir / "config.json").read_text() == config_before
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.fixture
def small_disk(tmp_path):
  """A 1300 KiB tmpfs: room for the tiny run's first checkpoint (about 0.3 MiB on disk; the check
  before a save asks for its 0.16 MiB of state + 1 MiB), not for the second (root only)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mount)):
    pytest.skip("a full disk needs a small tmpfs: mount -t tmpfs is not permitted here (not root)")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing(small_disk, cache_dir):
  workdir = small_disk / "run"
  cmd = train_command(workdir, cache_dir, **{"train.num_steps": 12})
  result = run(cmd, subprocess_env(1))
  assert result.returncode == 2, result.stderr[-3000:]
  line = one_error_line(result.stderr)
  kept = checkpoint_steps(workdir)
  assert kept, "the first checkpoint should fit"
  assert f"no space left on {small_disk}, the device of {workdir}" in line, line
  assert f"the last good checkpoint is step {kept[-1]} in {workdir}/checkpoints" in line, line
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  # More room, the same command: it resumes from that checkpoint and finishes.
  assert _mount("-o", "remount,size=64m", str(small_disk))
  result = run(cmd, subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from step {kept[-1]}" in result.stdout
  assert checkpoint_steps(workdir)[-1] == 12
  steps = metric_steps(workdir)
  assert steps == sorted(set(steps)) and steps[-1] == 12


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What tensorstore raises from orbax's writer threads.
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed to write 26981 bytes to file "
               "18: No space left on device [os_error_code='28']"),
], ids=["oserror", "tensorstore"])
@pytest.mark.slow
def test_enospc_inside_a_save_is_one_line_naming_the_last_checkpoint(trained, tmp_path, cache_dir, capsys,
                                                                      monkeypatch, error):
  """A disk that fills during a save (past the check before it) is reported the same way."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)

  def save(self, step, *args, **kwargs):
    raise error

  monkeypatch.setattr(checkpointing.Checkpointer, "save", save)
  code = cli.main(["train", "--config", "demo", "--workdir", str(workdir),
                   *tiny_overrides(cache_dir, **{"train.num_steps": 12})])
  line = one_error_line(capsys.readouterr().err)
  assert code == 2
  assert "no space left on" in line and "training stopped at step 10" in line, line
  assert f"the last good checkpoint is step 8 in {workdir}/checkpoints" in line, line
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.mark.slow  # its fixture trains a model
def test_a_read_only_workdir_is_refused_for_training_in_one_line(trained, tmp_path, cache_dir, capsys):
  with read_only_copy(trained, tmp_path) as workdir:
    before = snapshot(workdir)
    code = cli.main(["train", "--config", "demo", "--workdir", str(workdir),
                     *tiny_overrides(cache_dir, **{"train.num_steps": 10})])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(workdir) in line and ("read-only" in line or "not writable" in line), line
    assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------
# Starting over in a used workdir: --fresh sets the old run aside, whole.


@pytest.mark.slow  # its fixture trains a model
def test_fresh_sets_the_previous_run_aside_whole_and_starts_at_step_0(trained, tmp_path, cache_dir, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  before = snapshot(workdir)
  other = tiny_overrides(cache_dir, **{"train.num_steps": 4, "train.batch_size": 4})
  # Without --fresh another batch size is refused, and the message names the way to start over.
  assert cli.main(["train", "--config", "demo", "--workdir", str(workdir), *other]) == 2
  assert "--fresh" in one_error_line(capsys.readouterr().err)
  assert snapshot(workdir) == before

  assert cli.main(["train", "--config", "demo", "--workdir", str(workdir), "--fresh", *other]) == 0
  moved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("starting fresh")]
  previous = workdir / RunDir.PREVIOUS
  (stamp,) = os.listdir(previous)
  assert moved == [f"starting fresh: the previous run in {workdir} moved to {previous / stamp}"]
  assert snapshot(previous / stamp) == before  # every file, its size and its mtime: renamed, not rewritten
  assert checkpoint_steps(workdir) == [2, 4] and metric_steps(workdir) == [2, 4]
  with open(workdir / "runs.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["start_step"] for line in f] == [0]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_set_aside_moves_the_run_only_and_never_overwrites(tmp_path):
  assert RunDir(tmp_path / "missing").set_aside() is None
  assert RunDir(tmp_path).set_aside() is None  # empty
  (tmp_path / "metrics.jsonl").write_text("first")
  (tmp_path / workdir_lock.LOCK_FILE).write_text("held")
  (tmp_path / "notes.txt").write_text("the user's")
  with pytest.warns(UserWarning, match="notes.txt"):  # not the program's: left where it is, and said
    first = RunDir(tmp_path).set_aside()
  (tmp_path / "metrics.jsonl").write_text("second")
  with pytest.warns(UserWarning, match="notes.txt"):
    second = RunDir(tmp_path).set_aside()  # the same second: a suffix
  assert first != second and os.path.dirname(first) == os.path.dirname(second) == str(tmp_path / "previous")
  assert open(os.path.join(first, "metrics.jsonl")).read() == "first"
  assert open(os.path.join(second, "metrics.jsonl")).read() == "second"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "previous", workdir_lock.LOCK_FILE]
  with pytest.warns(UserWarning, match="notes.txt"):
    assert RunDir(tmp_path).set_aside() is None  # only earlier runs (and the user's file) left
