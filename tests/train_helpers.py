"""Shared pieces of the training tests: a tiny config, subprocess runs (one or two processes),
reading a run's final state and comparing states bit for bit."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(cache_dir, **extra) -> list[str]:
  """``--config.*`` overrides that make the demo preset a seconds-long CPU run (16x16, widths 8/16,
  the Keras learning rate: what the tests were written against, whatever the demo's own recipe)."""
  values = {
      "model.widths": "(8,16)", "model.block_depth": "1", "train.batch_size": "8", "train.num_steps": "8",
      "train.checkpoint_every": "2", "train.log_every": "2", "train.sample_every": "0",
      "data.cache_dir": str(cache_dir), "sample.num_images": "4", "sample.steps": "3",
      "model.image_size": "16", "train.learning_rate": "1e-3",
  }
  values.update({k: str(v) for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


# The uninterrupted 2-process run (conftest.two_process_reference) that the SIGTERM and the bucket
# SIGKILL tests resume against: 2 steps per call (JAX's preemption sync point is matched by the
# loop's call counter), checkpoints mid-run.
TWO_PROCESS_RUN = {"train.num_steps": 100, "train.checkpoint_every": 20, "train.log_every": 10,
                   "train.steps_per_call": 2}


# The bucket workdir test's run (tests/test_bucket_workdir.py): a sample grid and a checkpoint every 2
# steps; the first run stops at 4, the resumed one at 8.
BUCKET_RUN = {"train.sample_every": "4", "train.checkpoint_every": "2", "train.log_every": "2"}


def tiny_config(cache_dir, **extra):
  """The tiny config as a ConfigDict."""
  from ddim_jax import configs
  return configs.load_config("demo", tiny_overrides(cache_dir, **extra))


def final_weights(workdir, ema=False) -> dict[str, np.ndarray]:
  """The newest checkpoint's weights as a flat torch-named dict of NumPy arrays."""
  from ddim_jax.inference import pipeline
  from ddim_jax.interop import weight_files
  _, variables, _, _, step = pipeline.restore_checkpoint(str(workdir), ema=ema)
  out = weight_files.flax_to_torch_state_dict(variables)
  out["__step__"] = np.asarray(step)
  return out


def final_state(workdir):
  """(step, TrainState, meta) of the newest checkpoint: EVERY leaf (raw weights, BatchNorm
  statistics, AdamW state, EMA, step) as NumPy, and the metadata (data-iterator position, ...)."""
  import jax
  import ml_collections
  from ddim_jax.core import models, step as step_lib
  from ddim_jax.infra import checkpointing
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
    config = ml_collections.ConfigDict(ckpt.read_meta(ckpt.latest_step())["config"])
    model = models.create_model(**config.model)
    abstract = step_lib.abstract_train_state(model, step_lib.StepConfig.from_config(config), int(config.model.image_size),
                                          jax.random.key(0), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    step, state, meta = ckpt.restore_latest(abstract)
  return step, jax.device_get(state), meta


def train_command(workdir, cache_dir, **extra) -> list[str]:
  """The `ddim-jax train` command line of the tiny config (run with the test's Python)."""
  return [sys.executable, "-m", "ddim_jax.cli", "train", "--config", "demo", "--workdir", str(workdir),
          *tiny_overrides(cache_dir, **extra)]


def caller_xla_flags() -> str:
  """The XLA_FLAGS the suite was started with (conftest.py records them), less any forced device
  count: what a subprocess must keep, e.g. ``--xla_cpu_max_isa=AVX2`` reproducing another processor."""
  flags = os.environ.get("DDIM_JAX_TEST_CALLER_XLA_FLAGS", "").split()
  return " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))


def xla_flags(devices: int | None) -> str:
  """The caller's XLA_FLAGS plus ``devices`` forced virtual CPU devices (None: no forced count)."""
  count = "" if devices is None else f" --xla_force_host_platform_device_count={devices}"
  return (caller_xla_flags() + count).strip()


def subprocess_env(devices: int | None = 1) -> dict:
  """Environment for a training subprocess: CPU, ``devices`` virtual devices (None: XLA_FLAGS force
  no count), and the caller's other XLA_FLAGS."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(cmd, env, timeout=600):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (coordinators, storage emulators)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_same_state(got, want):
  """Bit-exact: step, raw weights, BatchNorm statistics, AdamW moments and count, EMA, data position."""
  import jax
  (got_step, got_state, got_meta), (want_step, want_state, want_meta) = got, want
  assert got_step == want_step == int(want_state.step)
  assert got_meta["data_iterator"] == want_meta["data_iterator"]
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(want_state))
  got_leaves = jax.tree.leaves(got_state)
  assert len(got_leaves) == len(leaves)
  for path, a, b in zip(paths, got_leaves, leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def wait_until(predicate, proc, timeout=300) -> bool:
  """Polls ``predicate`` until it holds (True) or the process ends or ``timeout`` passes (False)."""
  start = time.time()
  while time.time() - start < timeout and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.02)
  return False


class FileOutputProcess(subprocess.Popen):
  """A process whose stdout and stderr go to temporary files, not pipes: the two processes of one
  distributed run are waited for one after the other, and a pipe the test is not reading yet fills
  at 64 KiB, blocks its writer and with it both processes at their next collective. ``communicate``
  waits, then returns the two files' text."""

  def __init__(self, cmd, **kwargs):
    self._files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    super().__init__(cmd, stdout=self._files[0], stderr=self._files[1], text=True, **kwargs)

  def communicate(self, input=None, timeout=None):  # pylint: disable=redefined-builtin
    del input
    self.wait(timeout)
    texts = []
    for f in self._files:
      f.seek(0)
      texts.append(f.read())
      f.close()
    return tuple(texts)


def two_processes(cmd, port, env=None):
  """Starts ``cmd`` as processes 0 and 1 of a jax.distributed run (2 CPU devices each) on 127.0.0.1.

  ``env``: extra environment variables (a bucket's endpoint settings, ...). Their output goes to
  files (``FileOutputProcess``).
  """
  procs = []
  for pid in range(2):
    env_pid = {**subprocess_env(2), **(env or {})}
    env_pid.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(FileOutputProcess(cmd, env=env_pid))
  return procs


def run_with_deadline(fn, seconds=60):
  """``fn()`` in a thread; fails (instead of hanging the suite) when it does not return in time (a
  command waiting on a FIFO, say)."""
  import threading  # pylint: disable=import-outside-toplevel
  result = {}

  def target():
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"still running after {seconds}s (blocked reading a FIFO?)"
  if "error" in result:
    raise result["error"]
  return result["value"]
