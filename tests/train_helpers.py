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
  the Keras learning rate, DDIM on the uniform grid: what the tests were written against, whatever the
  demo's own recipe)."""
  values = {
      "model.widths": "(8,16)", "model.block_depth": "1", "train.batch_size": "8", "train.num_steps": "8",
      "train.checkpoint_every": "2", "train.log_every": "2", "train.sample_every": "0",
      "data.cache_dir": str(cache_dir), "sample.num_images": "4", "sample.steps": "3",
      "sample.sampler": "ddim", "sample.time_grid": "uniform",
      "model.image_size": "16", "train.learning_rate": "1e-3",
  }
  values.update({k: str(v) for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


# The uninterrupted 2-process run (conftest.two_process_reference) that the SIGTERM and the bucket
# SIGKILL tests resume against: 2 steps per call (JAX's preemption sync point is matched by the
# loop's call counter), checkpoints mid-run.
TWO_PROCESS_RUN = {"train.num_steps": 100, "train.checkpoint_every": 20, "train.log_every": 10,
                   "train.steps_per_call": 2}


# How long a two-process test waits for training to be under way (two start-ups, the gloo connections,
# the first compilation; minutes on a loaded 2-core machine).
TWO_PROCESS_START_S = 600


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
  """A free TCP port on 127.0.0.1 (storage emulators and other servers that bind it themselves).

  Free when asked, not reserved: another process may take it before the server binds it (an outgoing
  connection's ephemeral port, say). A jax.distributed coordinator gets a reserved one
  (``reserved_port``, what ``two_processes`` does).
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def reserved_port(port: int | None = None) -> tuple[int, socket.socket | None]:
  """(port, socket holding it): a TCP port that a jax.distributed coordinator can bind and nothing else can.

  The socket is bound with ``SO_REUSEPORT`` and never listens: gRPC's server (the coordination
  service, bound to ``[::]:port`` with ``SO_REUSEPORT``) binds the port beside it, while the kernel
  hands the port to no other ``bind(0)`` or outgoing connection while the socket is open (a port
  picked free and released could be taken before the coordinator's bind: process 0 then dies with
  gRPC's "Failed to add port to server"). Close the socket once the processes have ended.
  ``port``: reserve this one if it is still free, else a new one (socket None: nothing reserved).
  """
  for want in ((port, 0) if port else (0,)):
    # Dual-stack [::] like the coordinator's bind; 127.0.0.1 where the host has no IPv6.
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "127.0.0.1")):
      try:
        s = socket.socket(family, socket.SOCK_STREAM)
      except OSError:
        continue
      try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, want))
      except OSError:
        s.close()
        continue
      return s.getsockname()[1], s
  return port or free_port(), None


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
  waits, then returns the two files' text; ``output`` reads them at any time (also after
  ``communicate``), ``tail`` their last lines for an assertion message."""

  def __init__(self, cmd, **kwargs):
    self._files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    self._texts = None
    super().__init__(cmd, stdout=self._files[0], stderr=self._files[1], text=True, **kwargs)

  def output(self) -> tuple[str, str]:
    """(stdout, stderr) so far. ``os.pread``: the child writes through the same file offset, which a
    seek here would move."""
    if self._texts is not None:
      return self._texts
    texts = []
    for f in self._files:
      f.flush()
      size = os.fstat(f.fileno()).st_size
      texts.append(os.pread(f.fileno(), size, 0).decode("utf-8", "replace"))
    return tuple(texts)

  def communicate(self, input=None, timeout=None):  # pylint: disable=redefined-builtin
    del input
    self.wait(timeout)
    if self._texts is None:
      self._texts = self.output()
      for f in self._files:
        f.close()
    return self._texts

  def tail(self, lines: int = 60) -> str:
    """The last ``lines`` lines of stdout and of stderr, headed by the exit status."""
    out, err = self.output()
    status = "running" if self.poll() is None else f"exit status {self.returncode}"
    parts = [f"({status})"]
    for name, text in (("stdout", out), ("stderr", err)):
      kept = text.splitlines()[-lines:]
      parts.append(f"{name}, last {len(kept)} of {len(text.splitlines())} lines:\n" + "\n".join(kept))
    return "\n".join(parts)


# What gRPC prints when the coordinator cannot bind its port (process 0 then dies, the others wait).
PORT_TAKEN = "Failed to add port to server"


class TwoProcesses(list):
  """Processes 0 and 1 of one jax.distributed run (a list of ``FileOutputProcess``): ``report()`` is
  both processes' output tails, for the assertion message of every check on them."""

  port: int = 0
  note: str = ""
  _reservation: socket.socket | None = None

  def report(self, lines: int = 60) -> str:
    parts = [f"two processes, coordinator 127.0.0.1:{self.port}" + (f" ({self.note})" if self.note else "")]
    for pid, proc in enumerate(self):
      text = proc.tail(lines)
      if pid == 0 and PORT_TAKEN in proc.output()[1]:
        text += f"\n[process 0 could not bind the coordinator's port {self.port}: another socket holds it]"
      parts.append(f"===== process {pid} {text}")
    return "\n".join(parts)

  def communicate(self, timeout=600) -> list[tuple[str, str]]:
    """Waits for both (each within ``timeout``), then frees the port; (stdout, stderr) of each. A
    process still running after ``timeout`` is killed (with the other) and the error shows both."""
    try:
      outputs = []
      for proc in self:
        try:
          outputs.append(proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired as e:
          for p in self:
            p.kill()
          raise AssertionError(f"still running after {timeout} s\n{self.report()}") from e
      return outputs
    finally:
      self.release_port()

  def release_port(self) -> None:
    if self._reservation is not None and all(p.poll() is not None for p in self):
      self._reservation.close()
      self._reservation = None


def two_processes(cmd, port=None, env=None) -> TwoProcesses:
  """Starts ``cmd`` as processes 0 and 1 of a jax.distributed run (2 CPU devices each) on 127.0.0.1.

  ``port``: the coordinator's (None: a new one). It is reserved while the processes run
  (``reserved_port``; a port taken since it was picked is replaced by a new one, which ``note``
  says). ``env``: extra environment variables (a bucket's endpoint settings, ...). Their output
  goes to files (``FileOutputProcess``); ``report()`` gives both tails.
  """
  reserved, reservation = reserved_port(port)
  procs = TwoProcesses()
  procs.port, procs._reservation = reserved, reservation  # pylint: disable=protected-access
  if port and reserved != port:
    procs.note = f"port {port} was taken before the start; reserved {reserved} instead"
  elif reservation is None:
    procs.note = "port not reserved"
  for pid in range(2):
    env_pid = {**subprocess_env(2), **(env or {})}
    env_pid.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{reserved}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
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
