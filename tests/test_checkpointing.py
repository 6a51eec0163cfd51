"""Tests of ddim_jax.infra.checkpointing (with digests and preemption): round trip, retention, fallback,
crash and preemption safety.

Tiny pytrees stand in for the U-Net; crash and SIGTERM behaviour is tested in subprocesses that
run the script below.
"""

import json
import math
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
import warnings

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from ddim_jax.infra import checkpointing, digests, preemption
from ddim_jax.infra.checkpointing import Checkpointer, CheckpointRestoreError, CheckpointRestoreWarning
from ddim_jax.infra.preemption import PreemptionFlag
from train_helpers import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class TinyState:
  """The trainer's TrainState layout, with tiny arrays."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  ema_params: dict
  ema_batch_stats: dict


def make_state(seed: int, sharding=None) -> TinyState:
  """A TrainState-like pytree after one adamw step, so that mu, nu and count are non-trivial."""
  keys = jax.random.split(jax.random.key(seed), 3)
  params = {"conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 16)), "bias": jnp.zeros(16)},
            "dense": {"kernel": jax.random.normal(keys[1], (16, 2))}}
  batch_stats = {"bn": {"mean": jax.random.normal(keys[2], (4,)), "var": jnp.ones(4)}}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  state = TinyState(step=jnp.int32(seed), params=new_params, batch_stats=batch_stats,
                    opt_state=opt_state, ema_params=params,
                    ema_batch_stats=jax.tree.map(lambda x: 0.5 * x, batch_stats))
  return state if sharding is None else jax.device_put(state, sharding)


def abstract_of(state, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def make_meta(step: int) -> dict:
  config = ml_collections.ConfigDict({"model": {"widths": [8, 16]}, "optim": {"lr": 1e-3}})
  return {"normalizer": {"mean": [0.1, 0.2, 0.3], "variance": [1.0, 0.5, 0.25]},
          "config": json.loads(config.to_json()),
          "data": {"epoch": step // 10, "index": step % 10}}


def assert_bit_equal(a, b):
  """Same tree structure, dtypes and bits (NaN-safe: compares raw bytes)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 4, "conftest.py should provide 4 virtual CPU devices"
  return jax.make_mesh((4,), ("data",))


def no_restore_warnings(record):
  return [w for w in record if issubclass(w.category, CheckpointRestoreWarning)] == []


# ----------------------------------------------------------------------------------------------
# Round trip and retention.


@pytest.mark.parametrize("target", ["replicated", "single_device"])
@pytest.mark.slow
def test_round_trip_is_bit_exact_and_uses_requested_shardings(tmp_path, mesh, target):
  saved = make_state(1, NamedSharding(mesh, P()))
  # Restoring onto a different placement than the saved one proves the sharding comes from
  # the abstract state, not from the files.
  sharding = (NamedSharding(mesh, P()) if target == "replicated"
              else SingleDeviceSharding(jax.devices()[2]))
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    assert ckpt.restore_latest(abstract_of(saved, sharding)) is None
    assert ckpt.save(7, saved, make_meta(7), {"loss": 0.25, "kid": np.float32(0.5)})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    assert ckpt.metrics(7) == {"loss": 0.25, "kid": 0.5}
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:  # a fresh process's view
    step, state, meta = ckpt.restore_latest(abstract_of(saved, sharding))
  assert step == 7
  assert meta == make_meta(7)
  assert isinstance(state, TinyState)
  assert isinstance(state.opt_state[0], optax.ScaleByAdamState)
  assert state.opt_state[0].count.dtype == jnp.int32 and int(state.opt_state[0].count) == 1
  assert_bit_equal(state, saved)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding == sharding


def test_keep_last_n_without_metric(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, make_state(step), make_meta(step), {"loss": float(step)})
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.best_step() is None  # without best_metric no step has a value to rank
    assert not ckpt.save(5, make_state(5), make_meta(5))  # existing step: skipped, not clobbered


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint_is_kept_in_addition_to_last_n(tmp_path, mode):
  sign = 1.0 if mode == "min" else -1.0
  values = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0}  # step 2 is the best for "min"
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="loss", best_mode=mode) as ckpt:
    for step, value in values.items():
      ckpt.save(step, make_state(step), make_meta(step), {"loss": sign * value, "other": 0.0})
    ckpt.wait_until_finished()
    # orbax's own max_to_keep + best_fn would keep [2, 4] here: the newest would be gone.
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="loss", best_mode=mode) as ckpt:
    assert ckpt.best_step() == 2  # ranking survives a restart (metrics are on disk)
    ckpt.save(6, make_state(6), make_meta(6), {"loss": sign * 0.5})  # a new best...
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5, 6]  # ...so the old best goes
    assert ckpt.best_step() == 6


def test_missing_or_nan_metric_ranks_worst(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, best_metric="loss", async_save=False) as ckpt:
    ckpt.save(1, make_state(1), make_meta(1), {"loss": 2.0})
    ckpt.save(2, make_state(2), make_meta(2), {"loss": math.nan})
    ckpt.save(3, make_state(3), make_meta(3), {"kid": 0.1})
    ckpt.save(4, make_state(4), make_meta(4), None)
    assert ckpt.all_steps() == [1, 4]
    assert ckpt.best_step() == 1


# ----------------------------------------------------------------------------------------------
# Fallback from damaged checkpoints.


_ZSTD_MAGIC = bytes.fromhex("28b52ffd")


def _array_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of zstd-compressed array chunks (OCDBT stores leaves over 1 KiB there)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()
           and p.read_bytes()[:4] == _ZSTD_MAGIC]
  assert files, "no array data file found: did orbax's layout change?"
  return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir: pathlib.Path, how: str) -> None:
  if how == "truncate_meta":
    path = step_dir / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[:3])
    return
  path = _array_data_file(step_dir)
  data = bytearray(path.read_bytes())
  if how == "delete":
    path.unlink()
  elif how == "truncate":
    path.write_bytes(data[: len(data) // 2])
  elif how == "bitflip":  # orbax restores this without error; only the digest catches it
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


# orbax leaves the other reads of a failed restore to the garbage collector, which reports them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["delete", "truncate", "bitflip", "truncate_meta"])
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, how):
  sharding = SingleDeviceSharding(jax.devices()[0])
  abstract = abstract_of(make_state(0), sharding)
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(step), make_meta(step))
    ckpt.wait_until_finished()
  _damage(tmp_path / "3", how)
  if how == "bitflip":  # why the digest exists: without it the flip goes unnoticed
    with Checkpointer(tmp_path, verify=False) as ckpt:
      state, _ = ckpt._restore_step(3, abstract)  # noqa: SLF001
    with pytest.raises(AssertionError):
      assert_bit_equal(state, make_state(3))

  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    with pytest.warns(CheckpointRestoreWarning, match=r"checkpoint step 3 .*failed to restore"):
      step, state, meta = ckpt.restore_latest(abstract)
    assert step == 2 and meta == make_meta(2)
    assert_bit_equal(state, make_state(2))
    # The broken step is moved aside, so the manager is usable and step 3 can be saved again.
    assert ckpt.all_steps() == [1, 2]
    assert len(list((tmp_path / checkpointing.QUARANTINE_DIRNAME).iterdir())) == 1
    assert ckpt.save(3, make_state(33), make_meta(3))
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      step, state, _ = ckpt.restore_latest(abstract)
    assert no_restore_warnings(record)
    assert step == 3
    assert_bit_equal(state, make_state(33))


def test_wrong_abstract_state_raises_and_moves_nothing(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, make_state(1), make_meta(1))
    ckpt.save(2, make_state(2), make_meta(2))
    wrong = abstract_of(make_state(0), SingleDeviceSharding(jax.devices()[0]))
    wrong = wrong.replace(params={"other": jax.ShapeDtypeStruct((5,), jnp.float32)})
    with pytest.warns(CheckpointRestoreWarning), pytest.raises(CheckpointRestoreError):
      ckpt.restore_latest(wrong)
    assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path / checkpointing.QUARANTINE_DIRNAME).exists()


def test_tree_digest_catches_single_bit_flips_and_ignores_layout(mesh):
  tree = {"f": jnp.linspace(-1, 1, 16), "h": jnp.ones(8, jnp.bfloat16),
          "i": jnp.arange(8, dtype=jnp.int32), "b": jnp.array([True, False, True, True])}
  base = digests.tree_digest(tree)
  sharded = jax.device_put(tree, NamedSharding(mesh, P("data")))
  assert digests.tree_digest(sharded) == base
  for key, leaf in tree.items():
    raw = np.asarray(leaf).copy()
    flat = raw.view(np.uint8).reshape(-1)
    flat[0] ^= 0x01  # the lowest bit of the first element (little-endian)
    flipped = dict(tree, **{key: jnp.asarray(raw)})
    changed = digests.tree_digest(flipped)
    assert changed[f"['{key}']"] != base[f"['{key}']"], key
  swapped = dict(tree, i=tree["i"][::-1])
  assert digests.tree_digest(swapped)["['i']"] != base["['i']"]


# ----------------------------------------------------------------------------------------------
# Errors and preemption flag.


def test_bad_directories_and_arguments_raise_clear_errors(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    Checkpointer(a_file)
  with pytest.raises(NotADirectoryError, match="cannot create checkpoint directory"):
    Checkpointer(a_file / "sub")
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(tmp_path / "c", max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    Checkpointer(tmp_path / "c", best_mode="lowest")
  with Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(TypeError, match="meta must be JSON"):
      ckpt.save(1, make_state(1), {"bad": object()})
    assert ckpt.all_steps() == []
  with pytest.raises(RuntimeError, match="after close"):
    ckpt.save(2, make_state(2), make_meta(2))


def test_unwritable_or_uncreatable_directory_raises(tmp_path, monkeypatch):
  """A directory that cannot hold checkpoints is refused when the Checkpointer opens, under any uid.

  Root bypasses permission bits, so the uid-proof cases are a path through a dangling symlink and
  a directory that the OS reports as unwritable (os.access, what the check asks).
  """
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "nowhere" / "target")
  with pytest.raises(OSError, match="cannot create checkpoint directory"):
    Checkpointer(dangling)

  locked = tmp_path / "locked"
  locked.mkdir()
  real_access = os.access

  def access(path, mode, *args, **kwargs):
    if pathlib.Path(path) == locked and mode & os.W_OK:
      return False  # what a read-only mount or a directory of another user reports, root included
    return real_access(path, mode, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(os, "access", access)
    with pytest.raises(PermissionError, match="not writable"):
      Checkpointer(locked)
  assert list(locked.iterdir()) == []

  if os.geteuid() != 0:  # real permission bits, where they apply
    locked.chmod(0o500)
    try:
      with pytest.raises(PermissionError, match="not writable"):
        Checkpointer(locked)
    finally:
      locked.chmod(0o700)


def test_reached_preemption_follows_flag_and_sigterm_handler(tmp_path):
  flag = PreemptionFlag()
  with Checkpointer(tmp_path, preemption_flag=flag) as ckpt:
    assert not ckpt.reached_preemption(1)
    flag.set()
    assert ckpt.reached_preemption(2)
  other = PreemptionFlag()
  previous = signal.getsignal(signal.SIGTERM)
  try:
    assert preemption.install_sigterm_handler(other) is other
    os.kill(os.getpid(), signal.SIGTERM)  # handled by setting the flag, not by dying
    deadline = time.monotonic() + 5
    while not other.is_set() and time.monotonic() < deadline:
      time.sleep(0.01)
    assert other.is_set() and other.signum == signal.SIGTERM
  finally:
    signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# Crash and preemption in subprocesses.

_SCRIPT = r'''
import asyncio, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from ddim_jax.infra import checkpointing, preemption

mode, directory = sys.argv[1], sys.argv[2]

def state_at(step):
  return {"step": jnp.int32(step), "x": jnp.full((256, 1024), float(step), jnp.float32)}

if mode == "block_commit":
  # A complete save of step 1, then a save of step 2 that hangs just before its commit rename.
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(1, state_at(1), {"step": 1})
  ckpt.wait_until_finished()
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self):
    if self.get().parent.name.startswith("2."):  # an item inside the step: let it commit
      return await original(self)
    print("BLOCKED", self.get(), flush=True)
    await asyncio.sleep(3600)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  ckpt.save(2, state_at(2), {"step": 2})
  time.sleep(3600)

elif mode == "save_forever":
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=2)
  for step in range(1, 100000):
    ckpt.save(step, state_at(step), {"step": step})
    print("SAVING", step, flush=True)

elif mode == "loop":
  # The training-loop pattern: regular saves, and on preemption save the current step and exit 0.
  max_steps = int(sys.argv[3])
  preemption.install_sigterm_handler()
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=2)
  abstract = jax.eval_shape(lambda: state_at(0))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract)
  restored = ckpt.restore_latest(abstract)
  if restored is None:
    step, state = 0, state_at(0)
  else:
    step, state, meta = restored
    assert meta == {"step": step} and int(state["step"]) == step, (meta, state["step"])
    print("RESUMED", step, float(state["x"][0, 0]), flush=True)
  for _ in range(max_steps):
    step += 1
    state = {"step": state["step"] + 1, "x": state["x"] + 1.0}
    time.sleep(0.02)
    print("STEP", step, flush=True)
    if ckpt.reached_preemption(step):
      ckpt.save(step, state, {"step": step}, force=True)
      ckpt.close()
      print("PREEMPTED_SAVED", step, flush=True)
      sys.exit(0)
    if step % 4 == 0:
      ckpt.save(step, state, {"step": step})
  ckpt.close()
  print("DONE", step, flush=True)
'''


@pytest.fixture
def spawn(tmp_path):
  """Starts the script above in a subprocess; kills whatever is left at teardown."""
  script = tmp_path / "ckpt_script.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = []

  def start(*args):
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(proc)
    return proc

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    proc.stdout.close()


def _read_until(proc, prefix: str, timeout: float = 60.0) -> str:
  """The first stdout line starting with `prefix`; fails on timeout or exit."""
  selector = selectors.DefaultSelector()
  selector.register(proc.stdout, selectors.EVENT_READ)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if selector.select(timeout=max(0.0, deadline - time.monotonic())):
      line = proc.stdout.readline()
      if not line:
        break
      if line.startswith(prefix):
        return line.strip()
  proc.kill()
  pytest.fail(f"subprocess never printed {prefix!r} (rc={proc.poll()})")


def _abstract_small(sharding=None):
  sharding = sharding or SingleDeviceSharding(jax.devices()[0])
  return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
          "x": jax.ShapeDtypeStruct((256, 1024), jnp.float32, sharding=sharding)}


def _tmp_dirs(directory: pathlib.Path) -> list:
  return [p for p in directory.iterdir() if "tmp" in p.name]


def test_sigkill_before_commit_leaves_previous_checkpoint_and_tmp_dir_is_cleaned(tmp_path, spawn):
  directory = tmp_path / "ckpt"
  proc = spawn("block_commit", directory)
  blocked = _read_until(proc, "BLOCKED")
  tmp_dir = pathlib.Path(blocked.split(maxsplit=1)[1])
  # Everything of step 2 is written, but only under the tmp name: not yet a checkpoint.
  assert tmp_dir.parent == directory and tmp_dir.name.startswith("2.")
  assert (tmp_dir / "state").is_dir() and (tmp_dir / "meta").is_dir()
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert tmp_dir.is_dir()  # the half-committed save is still on disk...
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1"]  # ...unseen

  with Checkpointer(directory) as ckpt:
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      step, state, meta = ckpt.restore_latest(_abstract_small())
    assert no_restore_warnings(record)
    assert step == 1 and meta == {"step": 1} and float(state["x"][3, 5]) == 1.0
    assert ckpt.save(2, {"step": jnp.int32(2), "x": jnp.full((256, 1024), 2.0)}, {"step": 2})
  assert _tmp_dirs(directory) == []  # the killed save's leftover was removed on start-up
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1", "2"]


def test_sigkill_at_an_arbitrary_moment_of_async_saving(tmp_path, spawn):
  directory = tmp_path / "ckpt"
  proc = spawn("save_forever", directory)
  _read_until(proc, "SAVING 3")
  time.sleep(0.137)  # some point inside later saves
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  with Checkpointer(directory, max_to_keep=2) as ckpt:
    steps = ckpt.all_steps()
    assert steps and steps[-1] >= 2
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      step, state, meta = ckpt.restore_latest(_abstract_small())
    assert no_restore_warnings(record)
    assert step == steps[-1] and meta == {"step": step}
    assert int(state["step"]) == step and float(state["x"].min()) == float(state["x"].max()) == step


@pytest.mark.slow
def test_sigterm_saves_current_step_exits_cleanly_and_restart_resumes(tmp_path, spawn):
  directory = tmp_path / "ckpt"
  proc = spawn("loop", directory, 100000)
  _read_until(proc, "STEP 6")
  proc.send_signal(signal.SIGTERM)
  saved = int(_read_until(proc, "PREEMPTED_SAVED").split()[1])
  assert proc.wait(timeout=30) == 0
  assert saved >= 6
  with Checkpointer(directory, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == saved

  proc = spawn("loop", directory, 2)
  resumed = _read_until(proc, "RESUMED").split()
  assert int(resumed[1]) == saved and float(resumed[2]) == saved
  assert _read_until(proc, "DONE") == f"DONE {saved + 2}"
  assert proc.wait(timeout=30) == 0
