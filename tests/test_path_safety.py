"""What can sit at a path (issue 31): every file the program writes or reads, times every kind of thing
that can be there.

Kinds: nothing, a regular file, a symbolic link to a file outside, a dangling link, a hard link to a
file outside, a FIFO, a folder, a copy of a device node (``os.mknod`` of /dev/full's numbers) and an
unwritable parent. Paths: each name of the run directory (``RunDir``) under ``train``, each output
option (``sample --out/--array-out/--trajectory/--out-dir``, ``convert --out`` to .pt/.h5/.safetensors,
``export --out``, ``parity --json``) and each input option that names a file (``--weights``,
``--noise-file``, ``--config``, ``convert``'s source).

Every row: the command works, or exits 2 with one line (no traceback) naming the path; it writes nothing
outside its workdir or output path, changes no file it did not create (the planted thing is still
there, as it was), and finishes within a time limit (a FIFO is never waited on). Below the matrix: the
primitives themselves (``ddim_jax.files``, the lock), the journalled ``--fresh`` and ``runs.jsonl``
with a kill injected at each step, and Ctrl-C-free retention (a user's ``checkpoints/7/`` survives).
"""

import hashlib
import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddim_jax import cli, errors, files
from ddim_jax.core import models
from ddim_jax.infra import checkpointing, workdir_lock
from ddim_jax.infra.run_dir import RunDir
from ddim_jax.interop import weight_files
from train_helpers import REPO, run_with_deadline, subprocess_env, tiny_overrides

DEADLINE = 120  # seconds: a command that waits on a FIFO would hang far longer
IS_ROOT = os.geteuid() == 0
SMALL = {"widths": (8, 16), "block_depth": 1, "embedding_dims": 8}
NORMALIZER = {"mean": np.array([0.5, 0.5, 0.5], np.float32), "variance": np.array([0.1, 0.1, 0.1], np.float32)}
OUTSIDE_TEXT = b"a file of someone else's, outside the workdir\n"


# ------------------------------------------------------------------------------------------------
# Planting things at paths, and watching what changed.


KINDS = ("nothing", "regular", "link_outside", "dangling_link", "hard_link", "fifo", "folder", "device",
         "unwritable_parent")


class Scene:
  """A temporary world: ``outside/`` (another user's files), the path under test, and a snapshot."""

  def __init__(self, root):
    self.root = str(root)
    self.outside = os.path.join(self.root, "outside")
    os.makedirs(self.outside, exist_ok=True)
    self.victim = os.path.join(self.outside, "victim.txt")
    with open(self.victim, "wb") as f:
      f.write(OUTSIDE_TEXT)
    os.chmod(self.victim, 0o600)
    self.victim_dir = os.path.join(self.outside, "victim_dir")
    os.makedirs(self.victim_dir, exist_ok=True)

  def plant(self, path: str, kind: str, folder_expected: bool = False, content: bytes = b"existing\n") -> None:
    """Puts a thing of ``kind`` at ``path`` (its parent is created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "nothing" or kind == "unwritable_parent":
      return
    if kind == "regular":
      with open(path, "wb") as f:
        f.write(content)
      os.chmod(path, 0o640)
    elif kind == "link_outside":
      os.symlink(self.victim_dir if folder_expected else self.victim, path)
    elif kind == "dangling_link":
      os.symlink(os.path.join(self.outside, "not_there_yet"), path)
    elif kind == "hard_link":
      os.link(self.victim, path)
    elif kind == "fifo":
      os.mkfifo(path)
    elif kind == "folder":
      os.makedirs(path)
    elif kind == "device":
      os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # /dev/full's numbers
    else:
      raise ValueError(kind)

  def snapshot(self) -> dict:
    """Every entry under the scene (links not followed): kind, size, mtime, content digest, inode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(self.root):
      for name in dirnames + filenames:
        path = os.path.join(dirpath, name)
        info = os.lstat(path)
        digest = None
        if stat.S_ISREG(info.st_mode):
          with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out[path] = (stat.S_IFMT(info.st_mode), info.st_size if not stat.S_ISDIR(info.st_mode) else None,
                     info.st_mtime_ns if not stat.S_ISDIR(info.st_mode) else None, digest, info.st_ino)
    return out

  def outside_intact(self) -> None:
    with open(self.victim, "rb") as f:
      assert f.read() == OUTSIDE_TEXT, "a file outside was written through"
    assert stat.S_IMODE(os.stat(self.victim).st_mode) == 0o600
    assert sorted(os.listdir(self.outside)) == ["victim.txt", "victim_dir"], "something was created outside"
    assert os.listdir(self.victim_dir) == [], "something was written into a folder outside"




def run_cli(argv, capsys) -> tuple[int, str]:
  """``cli.main(argv)`` within the deadline: (status, stderr)."""
  capsys.readouterr()
  try:
    status = run_with_deadline(lambda: cli.main(argv))
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().err


def assert_one_line(status, err, command, needle) -> None:
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2, err
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith(f"ddim-jax {command}: error: "), err
  assert needle in lines[0], (needle, lines[0])


def _skip_unplantable(kind):
  if kind == "device" and not IS_ROOT:
    pytest.skip("os.mknod of a device node needs root (CAP_MKNOD); run the suite as root to cover it")


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
  """A folder no write can enter: a read-only tmpfs as root (root ignores permissions), else mode 0555."""
  path = tmp_path_factory.mktemp("ro") / "ro"
  path.mkdir()
  mounted = IS_ROOT and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                                       capture_output=True, check=False).returncode == 0
  if not mounted:
    path.chmod(0o555)
  yield str(path)
  if mounted:
    subprocess.run(["umount", str(path)], check=False)
  else:
    path.chmod(0o755)


def _target(scene, name, kind, read_only_dir, folder_expected=False, **plant):
  """The path of the thing under test: in the scene, or below the unwritable folder."""
  if kind == "unwritable_parent":
    return os.path.join(read_only_dir, "sub", name) if folder_expected else os.path.join(read_only_dir, name)
  path = os.path.join(scene.root, "io", name)
  scene.plant(path, kind, folder_expected, **plant)
  return path


# ------------------------------------------------------------------------------------------------
# A small weight file (random weights, scaled: bounded samples; nothing trained, nothing compiled).


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
  model = models.create_model("keras", **SMALL)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 16))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    value = (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return np.abs(value) + np.float32(0.5) if getattr(path[-1], "key", "") == "var" else value

  path = str(tmp_path_factory.mktemp("weights") / "model.safetensors")
  weight_files.save_weights(path, model, jax.tree_util.tree_map_with_path(fill, shapes), NORMALIZER, 16)
  return path


# ------------------------------------------------------------------------------------------------
# Outputs: every option that names a file the program writes.


def _outputs(weights):
  """(id, argv with {out}, command) of each output option."""
  sample = ["sample", "--weights", weights, "--num-images", "2", "--steps", "1", "--cpu-devices", "1"]
  return [
      ("sample-out", sample + ["--out", "{out}"], "sample"),
      ("sample-array-out", sample + ["--out", "{aux}/grid.png", "--array-out", "{out}"], "sample"),
      ("sample-trajectory", sample + ["--out", "{aux}/grid.png", "--trajectory", "{out}"], "sample"),
      ("convert-pt", ["convert", weights, "--out", "{out}"], "convert"),
      ("convert-h5", ["convert", weights, "--out", "{out}"], "convert"),
  ]


OUTPUT_NAMES = {"sample-out": "grid.png", "sample-array-out": "images.npy", "sample-trajectory": "t.png",
                "convert-pt": "model.pt", "convert-h5": "model.weights.h5"}
OUTPUT_IDS = list(OUTPUT_NAMES)
# What each kind must give: "works" (written; modes as below) or the words of the one-line refusal.
OUTPUT_EXPECT = {"nothing": "works", "regular": "works", "hard_link": "works", "link_outside": "a symbolic link",
                 "dangling_link": "a symbolic link", "fifo": "FIFO", "folder": "is a folder",
                 "device": "a character device", "unwritable_parent": "not writable"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", OUTPUT_IDS)
def test_an_output_path_holds_whatever_is_there(option, kind, weight_file, tmp_path, read_only_dir, capsys):
  _skip_unplantable(kind)
  if option == "convert-h5":
    pytest.importorskip("h5py", reason="h5py (the keras extra) is not installed: the .weights.h5 writer is untested")
  scene = Scene(tmp_path)
  out = _target(scene, OUTPUT_NAMES[option], kind, read_only_dir)
  aux = os.path.join(scene.root, "aux")
  _, argv, command = next(o for o in _outputs(weight_file) if o[0] == option)
  argv = [a.format(out=out, aux=aux) for a in argv]
  before = scene.snapshot()
  status, err = run_cli(argv, capsys)
  expect = OUTPUT_EXPECT[kind]
  scene.outside_intact()
  if expect != "works":
    assert_one_line(status, err, command, expect)
    after = scene.snapshot()
    assert after == before or set(after) - set(before) <= {p for p in after if p.startswith(aux)}, \
        "a refused command changed a file"
    if kind not in ("nothing", "unwritable_parent"):
      info = os.lstat(out)
      assert stat.S_IFMT(info.st_mode) == before[out][0], "what was at the path was replaced"
    return
  assert status == 0, err
  info = os.lstat(out)
  assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1
  # A new file: 0666 & ~umask (0644 under the usual 022); a replaced file keeps its mode.
  want = {"nothing": 0o666 & ~files.umask(), "regular": 0o640, "hard_link": 0o600}[kind]
  assert stat.S_IMODE(info.st_mode) == want, oct(info.st_mode)
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.endswith(".tmp")], "a temporary file was left"


@pytest.mark.slow  # its fixture trains a tiny run
@pytest.mark.parametrize("kind", ["nothing", "link_outside", "fifo", "device", "folder"])
def test_export_out_holds_whatever_is_there(kind, trained_workdir, tmp_path, read_only_dir, capsys):
  _skip_unplantable(kind)
  scene = Scene(tmp_path)
  out = _target(scene, "exported.safetensors", kind, read_only_dir)
  before = scene.snapshot()
  status, err = run_cli(["export", "--workdir", trained_workdir, "--out", out], capsys)
  scene.outside_intact()
  if kind == "nothing":
    assert status == 0, err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~files.umask()  # not safetensors' own 0600
    return
  assert_one_line(status, err, "export", OUTPUT_EXPECT[kind])
  assert scene.snapshot() == before


@pytest.mark.parametrize("kind", ["nothing", "link_outside", "fifo", "regular"])
def test_sample_out_dir_is_the_users_folder(kind, weight_file, tmp_path, capsys):
  """``--out-dir`` is the user's folder (a link to a folder is followed: their choice); a FIFO or a file
  there is refused; the PNGs inside are replaced like every output file."""
  scene = Scene(tmp_path)
  out_dir = os.path.join(scene.root, "io", "pngs")
  scene.plant(out_dir, kind, folder_expected=True)
  status, err = run_cli(["sample", "--weights", weight_file, "--num-images", "2", "--steps", "1", "--cpu-devices",
                         "1", "--out", os.path.join(scene.root, "grid.png"), "--out-dir", out_dir], capsys)
  if kind in ("fifo", "regular"):
    assert_one_line(status, err, "sample", "--out-dir")
    return
  assert status == 0, err
  written = os.path.realpath(out_dir)
  assert sorted(os.listdir(written)) == ["sample_00000.png", "sample_00001.png"]
  if kind == "link_outside":  # the user's link: followed, and nothing else outside changed
    os.remove(os.path.join(written, "sample_00000.png"))
    os.remove(os.path.join(written, "sample_00001.png"))
  scene.outside_intact()


def test_a_full_disk_keeps_the_existing_grid(weight_file, tmp_path, capsys):
  """``sample --out grid.png`` on a full disk: one line, and the valid grid.png that was there stays."""
  if not IS_ROOT:
    pytest.skip("a small tmpfs to fill needs root (mount); run the suite as root to cover it")
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                    check=False).returncode != 0:
    pytest.skip("mounting a tmpfs failed here; the full-disk case is not covered")
  try:
    grid = disk / "grid.png"
    grid.write_bytes(b"\x89PNG the user's valid grid")
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:  # fill the disk to the last byte
      for size in (4096, 1):
        try:
          while True:
            os.write(fd, b"\0" * size)
        except OSError:
          pass
    finally:
      os.close(fd)
    status, err = run_cli(["sample", "--weights", weight_file, "--num-images", "4", "--steps", "1", "--cpu-devices",
                           "1", "--out", str(grid)], capsys)
    assert_one_line(status, err, "sample", "No space left on device")
    assert grid.read_bytes() == b"\x89PNG the user's valid grid"
    assert sorted(os.listdir(disk)) == ["filler", "grid.png"]  # no temporary left behind
  finally:
    subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------
# Inputs: every option that names a file the program reads. A link the user gives is followed (model
# hubs keep weights as links to blobs); what it resolves to must be a regular file.


INPUT_EXPECT = {"link_outside": "works", "hard_link": "works", "dangling_link": "does not exist",
                "fifo": "not a regular file", "folder": "", "device": "not a regular file"}


@pytest.mark.parametrize("kind", list(INPUT_EXPECT))
@pytest.mark.parametrize("option", ["weights", "noise-file", "convert-source", "config"])
def test_an_input_path_holds_whatever_is_there(option, kind, weight_file, tmp_path, capsys):
  _skip_unplantable(kind)
  scene = Scene(tmp_path)
  # The real input lives outside; the option names a thing planted in io/.
  if option == "weights":
    real = weight_file
    argv = ["sample", "--weights", "{in}", "--num-images", "2", "--steps", "1", "--cpu-devices", "1", "--out",
            os.path.join(scene.root, "grid.png")]
  elif option == "noise-file":
    real = os.path.join(scene.root, "noise.npy")
    np.save(real, np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32))
    argv = ["sample", "--weights", weight_file, "--num-images", "2", "--steps", "1", "--cpu-devices", "1",
            "--out", os.path.join(scene.root, "grid.png"), "--noise-file", "{in}"]
  elif option == "convert-source":
    real = weight_file
    argv = ["convert", "{in}", "--out", os.path.join(scene.root, "model.pt")]
  else:
    real = os.path.join(scene.root, "my_config.py")
    with open(real, "w", encoding="utf-8") as f:
      f.write("from ddim_jax.configs import demo\n\ndef get_config():\n  return demo.get_config()\n")
    argv = ["train", "--workdir", os.path.join(scene.root, "never_trained"), "--config", "{in}",
            "--config.train.num_steps=abc"]  # an override that fails after the file was read: nothing trains
  path = os.path.join(scene.root, "io", os.path.basename(real) if option != "config" else "config.py")
  os.makedirs(os.path.dirname(path))
  if kind == "link_outside":
    os.symlink(real, path)
  elif kind == "hard_link":
    os.link(real, path)
  else:
    scene.plant(path, kind)
  before = scene.snapshot()
  status, err = run_cli([a.replace("{in}", path) for a in argv], capsys)
  scene.outside_intact()
  expect = INPUT_EXPECT[kind]
  if option == "config" and expect == "works":  # read, then the bad override refused: the file was read
    assert_one_line(status, err, "train", "--config.train.num_steps=abc")
    return
  if expect == "works":
    assert status == 0, err
    return
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert expect in lines[0] or kind == "folder" or (kind == "dangling_link" and "not a file" in lines[0]), lines[0]
  after = scene.snapshot()
  assert {p: v for p, v in after.items() if p in before} == before, "an input was changed"


# ------------------------------------------------------------------------------------------------
# The run directory under `train`: each of its names x each kind. Every refusal comes before anything
# is compiled, locked or written.


WORKDIR_FILES = (RunDir.LOCK, RunDir.CONFIG, RunDir.RUNS, RunDir.METRICS, RunDir.JOURNAL)
WORKDIR_FOLDERS = (RunDir.CHECKPOINTS, RunDir.SAMPLES, RunDir.TENSORBOARD, RunDir.PROFILE, RunDir.PREVIOUS)
FILE_KINDS = ("link_outside", "dangling_link", "hard_link", "fifo", "folder", "device")
FOLDER_KINDS = ("link_outside", "dangling_link", "regular", "fifo", "device")


def _workdir_cases():
  cases = []
  for name in WORKDIR_FILES:
    for kind in FILE_KINDS:
      if name in (RunDir.CONFIG, RunDir.JOURNAL) and kind == "hard_link":
        continue  # replaced by a rename (the other name keeps its file): the "works" run below covers it
      cases.append((name, kind))
  cases += [(name, kind) for name in WORKDIR_FOLDERS for kind in FOLDER_KINDS]
  return cases


@pytest.mark.parametrize("name, kind", _workdir_cases(), ids=[f"{n}-{k}" for n, k in _workdir_cases()])
def test_a_workdir_name_holding_something_else_is_refused_before_any_work(name, kind, tmp_path, capsys):
  _skip_unplantable(kind)
  scene = Scene(tmp_path)
  workdir = os.path.join(scene.root, "run")
  os.makedirs(workdir)
  scene.plant(os.path.join(workdir, name), kind, folder_expected=name in WORKDIR_FOLDERS)
  before = scene.snapshot()
  status, err = run_cli(["train", "--config", "demo", "--workdir", workdir,
                         *tiny_overrides(os.path.join(scene.root, "cache"))], capsys)
  assert_one_line(status, err, "train", os.path.join(workdir, name))
  assert scene.snapshot() == before, "a refused trainer changed something"
  scene.outside_intact()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run trained in a workdir holding the kinds that work: a stale lock of a dead trainer (a
  regular file), config.json a hard link to a file outside (replaced, the outside file untouched), a
  user's folder ``checkpoints/1/`` (never a step) and empty program folders. Returns the workdir."""
  scene = Scene(tmp_path_factory.mktemp("trained"))
  workdir = os.path.join(scene.root, "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  with open(os.path.join(workdir, "checkpoints", "1", "notes.txt"), "w", encoding="utf-8") as f:
    f.write("the user's notes")
  os.makedirs(os.path.join(workdir, "samples"))
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True)
  with open(os.path.join(workdir, RunDir.LOCK), "w", encoding="utf-8") as f:
    f.write(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "then"}))
  os.link(scene.victim, os.path.join(workdir, RunDir.CONFIG))
  result = subprocess.run([sys.executable, "-m", "ddim_jax.cli", "train", "--config", "demo", "--workdir", workdir,
                           *tiny_overrides(os.path.join(scene.root, "cache"), **{"train.num_steps": 4,
                                                                                  "train.keep_checkpoints": 1,
                                                                                  "train.sample_every": 2})],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoints/1 is not a checkpoint this program wrote" in result.stderr, result.stderr[-3000:]
  scene.outside_intact()
  return workdir


@pytest.mark.slow  # trains a tiny run
def test_the_kinds_that_work_leave_everything_else_alone(trained_workdir):
  workdir = trained_workdir
  config = os.path.join(workdir, RunDir.CONFIG)
  assert os.lstat(config).st_nlink == 1 and json.load(open(config, encoding="utf-8"))["seed"] is not None
  assert stat.S_IMODE(os.stat(config).st_mode) == 0o600  # the mode of the file it replaced
  # Retention kept one step; the user's folder named like a step is untouched.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "4"]
  assert os.listdir(os.path.join(workdir, "checkpoints", "1")) == ["notes.txt"]
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000002.png", "step_0000004.png"]
  assert not os.path.exists(os.path.join(workdir, RunDir.LOCK))  # the stale lock taken over, then released
  for name in (RunDir.METRICS, RunDir.RUNS, RunDir.CONFIG):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) in (0o600, 0o666 & ~files.umask())


# ------------------------------------------------------------------------------------------------
# The primitives, on their own.


@pytest.mark.parametrize("kind", KINDS)
def test_primitives_never_write_through_or_wait(kind, tmp_path, read_only_dir):
  _skip_unplantable(kind)
  scene = Scene(tmp_path)
  path = _target(scene, "f", kind, read_only_dir)
  before = scene.snapshot()
  outcomes = {}
  for name, fn in (("append", lambda: files.append_record(path, b"record\n", "f")),
                   ("read", lambda: files.read_bytes(path, "f", follow=False)),
                   ("replace", lambda: files.replace_file(path, b"new\n", "f"))):
    try:
      run_with_deadline(fn, 20)
      outcomes[name] = "ok"
    except errors.Error as e:
      outcomes[name] = str(e)
      assert "\n" not in str(e)
  scene.outside_intact()
  refuse_all = kind in ("link_outside", "dangling_link", "fifo", "folder", "device")
  if refuse_all:
    assert all(v != "ok" for v in outcomes.values()), outcomes
    assert scene.snapshot() == before
  elif kind == "hard_link":
    assert outcomes["replace"] == "ok"  # a rename: the other name keeps its file
    assert "hard link" in outcomes["append"]
  elif kind == "unwritable_parent":
    assert outcomes["replace"] != "ok" and outcomes["append"] != "ok"
  else:
    assert outcomes == {"replace": "ok", "append": "ok", "read": "ok"}
    assert open(path, "rb").read() == b"new\n"


def test_replace_file_keeps_a_short_temporary_name_for_a_long_name(tmp_path):
  path = tmp_path / ("x" * 250 + ".png")
  files.replace_file(str(path), b"data")
  assert path.read_bytes() == b"data" and os.listdir(tmp_path) == [path.name]


def test_the_lock_is_released_only_by_its_holder(tmp_path):
  """A trainer whose lock was deleted (and taken by another trainer) leaves the other's lock alone,
  and knows it lost the lock (it refuses to save: no interleaved checkpoints)."""
  first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  os.remove(first.path)  # a user deletes the live trainer's lock
  assert not first.still_held()
  second = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lock.LockLostError, match="removed or replaced"):
    workdir_lock.check_still_held(first, 10, 8)
  first.release()
  assert os.path.exists(second.path) and second.still_held()  # the other trainer's lock stays
  # A third trainer (another process: POSIX locks are per process) is refused.
  third = subprocess.run([sys.executable, "-c", "import sys; from ddim_jax.infra import workdir_lock as w\n"
                          "try:\n  w.WorkdirLock(sys.argv[1]).acquire()\nexcept w.WorkdirLockedError:\n  print('refused')",
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
  assert third.stdout.strip() == "refused", third.stderr
  second.release()
  assert not os.path.exists(second.path)


@pytest.mark.parametrize("kind", ["link_outside", "dangling_link", "hard_link", "fifo", "device"])
def test_the_lock_never_writes_through_what_is_at_its_name(kind, tmp_path):
  """The lock itself (not only the trainer's layout check before it) refuses what is not its own file."""
  _skip_unplantable(kind)
  scene = Scene(tmp_path)
  workdir = os.path.join(scene.root, "run")
  scene.plant(os.path.join(workdir, RunDir.LOCK), kind)
  before = scene.snapshot()
  with pytest.raises(files.UnsafePathError, match="train.lock"):
    run_with_deadline(lambda: workdir_lock.WorkdirLock(workdir).acquire(), 20)
  scene.outside_intact()
  assert scene.snapshot() == before


def test_a_full_disk_at_the_lock_write_leaves_no_empty_lock(tmp_path, monkeypatch):
  real_pwrite = os.pwrite

  def full(fd, data, offset):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "pwrite", full)
  with pytest.raises(errors.Error, match="no space left"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  monkeypatch.setattr(os, "pwrite", real_pwrite)
  assert os.listdir(tmp_path) == []


def test_retention_and_restore_never_touch_a_users_step_named_folder(tmp_path):
  directory = tmp_path / "checkpoints"
  (directory / "7").mkdir(parents=True)
  (directory / "7" / "notes.txt").write_text("mine")
  with pytest.warns(checkpointing.ForeignFolderWarning, match="checkpoints/7 is not a checkpoint"):
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=1, async_save=False)
    for step in (2, 4, 9):
      ckpt.save(step, {"x": np.full(3, step, np.float32)}, {"config": {}})
    ckpt.wait_until_finished()
  assert ckpt.all_steps() == [9]
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["7", "9"] and (directory / "7" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# Kills: the journalled --fresh and the appended runs.jsonl, with a SIGKILL-like exit at each step.


KILL_AT_RENAME = """
import os, sys
from ddim_jax.infra.run_dir import RunDir
kill_at, calls = int(sys.argv[2]), [0]
real = os.rename
def rename(*a, **k):
  if calls[0] == kill_at:
    os._exit(9)  # no clean-up of any kind runs: what a SIGKILL leaves
  calls[0] += 1
  return real(*a, **k)
os.rename = rename
print(RunDir(sys.argv[1]).set_aside())
"""


def _a_run(workdir):
  os.makedirs(os.path.join(workdir, "checkpoints", "4", "state"))
  for name, text in (("checkpoints/4/state/data", "weights"), ("metrics.jsonl", '{"step": 2}\n'),
                     ("runs.jsonl", '{"start_step": 0}\n'), ("config.json", "{}"), ("notes.txt", "the user's")):
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
      f.write(text)
  os.makedirs(os.path.join(workdir, "samples"))


def _tree(root):
  out = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = open(path, encoding="utf-8").read()
  return out


def test_a_fresh_killed_at_any_step_is_finished_by_the_next_start(tmp_path):
  """``train --fresh``'s move with a kill before each rename (the journal's, then each entry's): the next
  start (``finish_set_aside``) completes it, and the old run ends up whole in previous/<time>/."""
  reference = tmp_path / "reference"
  _a_run(reference)
  want = {k: v for k, v in _tree(reference).items() if k != "notes.txt"}
  renames = 1 + 5  # the journal's rename, then checkpoints, config.json, metrics.jsonl, runs.jsonl, samples
  for kill_at in range(renames + 1):
    workdir = tmp_path / f"run{kill_at}"
    _a_run(workdir)
    result = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(workdir), str(kill_at)], capture_output=True,
                            text=True, timeout=120, cwd=REPO, check=False)
    assert (result.returncode == 9) == (kill_at < renames) and result.returncode in (0, 9), (kill_at, result.stderr)
    run_dir = RunDir(workdir)
    run_dir.finish_set_aside()  # what the next `train` does first, under the lock
    entries = sorted(os.listdir(workdir))
    if kill_at == 0:  # killed before the journal existed: nothing moved, the run is still here to resume
      assert entries == ["checkpoints", "config.json", "metrics.jsonl", "notes.txt", "previous", "runs.jsonl",
                         "samples"]
      continue
    assert entries == ["notes.txt", "previous"], (kill_at, entries)
    (stamp,) = os.listdir(workdir / "previous")
    assert _tree(workdir / "previous" / stamp) == want, kill_at
    assert os.path.isdir(workdir / "previous" / stamp / "samples")


KILL_IN_APPEND = """
import builtins, io, os, sys
from ddim_jax.infra.run_dir import RunDir
limit, real_write, real_open = int(sys.argv[2]), os.write, builtins.open

def write(fd, data):
  real_write(fd, bytes(data)[:limit])  # part of the record reaches the disk, then the process dies
  os._exit(9)

class Dying:  # the same for a file object opened for writing (a rewrite of the file would use one)
  def __init__(self, f):
    self._f = f
  def write(self, data):
    self._f.write(data[:limit])
    self._f.flush()
    os._exit(9)
  def __getattr__(self, name):
    return getattr(self._f, name)
  def __enter__(self):
    return self
  def __exit__(self, *exc):
    return self._f.__exit__(*exc)

def opener(file, mode="r", *args, **kwargs):
  f = real_open(file, mode, *args, **kwargs)
  return Dying(f) if str(file).endswith("runs.jsonl") and set(mode) & set("wa+") else f

os.write, builtins.open, io.open = write, opener, opener
RunDir(sys.argv[1]).append_run({"start_step": 99, "argv": ["a long record"] * 20})
"""


@pytest.mark.parametrize("written", [0, 1, 40])
def test_a_killed_runs_jsonl_write_loses_no_record(written, tmp_path):
  run_dir = RunDir(tmp_path)
  for step in (0, 10):
    run_dir.append_run({"start_step": step})
  result = subprocess.run([sys.executable, "-c", KILL_IN_APPEND, str(tmp_path), str(written)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
  assert result.returncode == 9, result.stderr
  assert [r["start_step"] for r in run_dir.read_runs()] == [0, 10]  # the partial line is dropped
  run_dir.append_run({"start_step": 20})
  assert [r["start_step"] for r in run_dir.read_runs()][-1] == 20
