"""Test set-up: CPU only, 4 virtual devices, loud rank promotion, float32 everywhere.

The environment must be set before JAX is imported anywhere, hence module level.
"""

import os
import signal
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The caller's own XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2 to reproduce another processor), recorded
# before the additions below so that subprocess environments keep them (tests/train_helpers.py,
# caller_xla_flags). setdefault: xdist workers inherit the controller's already-extended XLA_FLAGS.
os.environ.setdefault("DDIM_JAX_TEST_CALLER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
if os.environ.get("PYTEST_XDIST_WORKER"):
  # One thread per xdist worker: oversubscribing 2 cores with 2 workers x (XLA + torch) pools
  # made the suite 3x slower.
  _xla_flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  import torch
  torch.set_num_threads(1)
os.environ["XLA_FLAGS"] = _xla_flags.strip()
# A (B,) vector of rates silently broadcasting against the channel axis is the classic diffusion
# bug; make implicit rank promotion an error.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
# One persistent XLA compilation cache for the session: the workers, their in-process runs
# (JAX_COMPILATION_CACHE_DIR) and every `ddim-jax` subprocess (DDIM_JAX_COMPILATION_CACHE) load the
# programs another one compiled (a tiny training subprocess: 29 s -> 11 s). A cached program is the
# same executable: the same numbers. setdefault: the controller creates it, the workers inherit it.
if not os.environ.get("DDIM_JAX_TEST_COMPILATION_CACHE"):
  import tempfile
  os.environ["DDIM_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="ddim_jax_test_xla_")
  os.environ["DDIM_JAX_TEST_COMPILATION_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("DDIM_JAX_COMPILATION_CACHE", os.environ["DDIM_JAX_TEST_COMPILATION_CACHE"])
# An empty torch hub cache for the session (the workers and every subprocess): a developer's real
# Inception files there (the standard FID's among them) must not change what the tests compute or
# how long they take; the tests that need weights write their own random ones.
if not os.environ.get("DDIM_JAX_TEST_TORCH_HOME"):
  import tempfile
  os.environ["DDIM_JAX_TEST_TORCH_HOME"] = tempfile.mkdtemp(prefix="ddim_jax_test_torch_home_")
os.environ["TORCH_HOME"] = os.environ["DDIM_JAX_TEST_TORCH_HOME"]
from ddim_jax.infra import compilation_cache  # noqa: E402  (no jax import)
if compilation_cache.cache_dir() is not None:  # DDIM_JAX_COMPILATION_CACHE=off turns it off here too
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", compilation_cache.cache_dir())
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(compilation_cache.MIN_COMPILE_SECONDS))

import pytest  # noqa: E402  (after the environment set-up above)

# A suite started in the background by a non-interactive shell (`make test &`, some CI runners)
# inherits SIGINT ignored, and every command it starts would too (an ignored signal stays ignored
# across exec, and the commands rightly leave it so): the Ctrl-C tests need Python's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """The process that made the session's compilation cache (and empty torch hub) removes them."""
  if os.environ.get("DDIM_JAX_TEST_COMPILATION_CACHE_OWNER") == str(os.getpid()):
    import shutil
    shutil.rmtree(os.environ["DDIM_JAX_TEST_COMPILATION_CACHE"], ignore_errors=True)
    shutil.rmtree(os.environ["DDIM_JAX_TEST_TORCH_HOME"], ignore_errors=True)


# The tests that take a minute or more on 2 cores (several processes, bucket servers; measured):
# they start first. A stale entry only changes the order.
LONGEST = ("test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step",
           "test_two_processes_sigkilled_in_a_bucket_resume_bit_exactly",
           "test_train_resume_export_and_sample_with_a_bucket_workdir",
           "test_a_run_of_k_steps_per_call_logs_and_saves_at_its_steps_and_resumes_exactly",
           "test_multi_host_two_processes_equal_one_process",
           "test_two_processes_train_the_same_in_both_placements")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Runs the longest tests first, then the other slow ones, then the rest (each in collection order).

  pytest-xdist hands out tests in order (``make test`` sends them one at a time,
  ``--maxschedchunk 1``): a minute-long test near the end keeps one worker busy while the other has
  finished. Longest first, the last tests are the short ones and both workers end together.
  """
  items.sort(key=lambda item: (item.originalname not in LONGEST, item.get_closest_marker("slow") is None))


def _session_dir(tmp_path_factory):
  """A folder of this test session that every xdist worker shares (the workers' base temps are
  its sub-folders; without xdist, the session's own base temp, never an older session's)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once_per_session(root, build):
  """``build(root)`` into the empty folder ``root`` once per test session, whichever xdist worker asks
  first (a file lock; a finished build leaves a marker, a half-finished one is started again)."""
  from filelock import FileLock
  done = root / "built"
  with FileLock(str(root) + ".lock"):
    if not done.exists():
      import shutil
      shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way in another worker
      root.mkdir()
      build(root)
      done.write_text("ok")
  return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One preprocessed-data cache (the bundled digits) shared by every training test, across the xdist
  workers (the parent of each worker's base temp)."""
  return tmp_path_factory.getbasetemp().parent / "data_cache"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  """A finished tiny run (one per test module that asks): checkpoints at steps 4, 6 and 8 (every 2, the
  last 3 kept)."""
  from train_helpers import run, subprocess_env, train_command  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = run(train_command(workdir, cache_dir), subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory):
  """Path-returning factory of the briefly trained parity models, built once per test session.

  Training (a few seconds to a minute on 2 cores) runs once per variant even under pytest-xdist:
  the first worker writes a weight file under a lock, the others read it. The file records the demo
  preset's data (the bundled digits) as its data, which the commands that need real images read;
  the reference itself trained on all 1,797 digits, so its "validation" digits are not held out.
  """
  from filelock import FileLock
  from ddim_jax import configs
  from ddim_jax.interop import parity_fixtures, weight_files
  root = _session_dir(tmp_path_factory)

  def get(variant: str):
    path = root / f"trained_{variant}.safetensors"
    with FileLock(str(path) + ".lock"):
      if not path.exists():
        model, variables, normalizer = parity_fixtures.trained_reference(variant)
        weight_files.save_weights(str(path), model, variables, normalizer, 16, weights="raw",
                                  data=configs.load_config("demo").data)
    return str(path)

  return get


@pytest.fixture(scope="session")
def trained_model(trained_weights):
  """(model, variables, normalizer) of the trained parity model of a variant (see trained_weights)."""
  from ddim_jax.interop import weight_files
  cache = {}

  def get(variant: str):
    if variant not in cache:
      model, variables, normalizer, _ = weight_files.load_weights(trained_weights(variant))
      cache[variant] = (model, variables, normalizer)
    return cache[variant]

  return get


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
  """Random InceptionV3 weights as a .pth file (cli_helpers.write_random_inception), once per session."""
  from filelock import FileLock
  from cli_helpers import write_random_inception
  path = _session_dir(tmp_path_factory) / "random_inception.pth"
  with FileLock(str(path) + ".lock"):
    if not path.exists():
      tmp = path.with_suffix(".tmp")
      write_random_inception(tmp)
      tmp.rename(path)
  return str(path)


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory):
  """An uninterrupted 2-process x 2-device ``train_helpers.TWO_PROCESS_RUN`` of the tiny config,
  trained once per session even under pytest-xdist (a file lock; a finished run leaves a marker):
  the SIGTERM and the bucket SIGKILL tests resume against it. It starts with an empty data cache.

  Returns:
    ``.workdir``, ``.cache_dir`` and ``.stdout`` (of process 0 and process 1).
  """
  from train_helpers import TWO_PROCESS_RUN, train_command, two_processes

  def train(root):
    procs = two_processes(train_command(root / "run", root / "data_cache", **TWO_PROCESS_RUN))
    outputs = procs.communicate(timeout=600)
    assert [p.returncode for p in procs] == [0, 0], procs.report()
    for i, (out, _) in enumerate(outputs):
      (root / f"stdout_{i}.txt").write_text(out)

  root = _once_per_session(_session_dir(tmp_path_factory) / "two_process_reference", train)
  return types.SimpleNamespace(workdir=root / "run", cache_dir=root / "data_cache",
                               stdout=[(root / f"stdout_{i}.txt").read_text() for i in range(2)])


@pytest.fixture(scope="session")
def bucket_run_reference(tmp_path_factory):
  """The uninterrupted local 8-step ``train_helpers.BUCKET_RUN`` that the gs:// and the s3:// runs of
  tests/test_bucket_workdir.py must equal bit for bit: (workdir, its exported EMA weight file), built
  once per session."""
  from train_helpers import BUCKET_RUN, run, subprocess_env, train_command

  def build(root):
    result = run(train_command(root / "run", root / "data_cache", **{**BUCKET_RUN, "train.num_steps": "8"}),
                 subprocess_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    from ddim_jax.inference import pipeline
    pipeline.export_weights(str(root / "run"), str(root / "run.safetensors"))

  root = _once_per_session(_session_dir(tmp_path_factory) / "bucket_run_reference", build)
  return root / "run", root / "run.safetensors"


@pytest.fixture(scope="session")
def kid_run(tmp_path_factory, inception_file):
  """The workdir of the tiny KID run the command tests share (cli_helpers.train_kid_run), trained once
  per session even under pytest-xdist (a file lock; a finished run leaves a marker). Tests only read it."""
  from cli_helpers import train_kid_run
  root = _once_per_session(_session_dir(tmp_path_factory) / "kid_run", lambda root: train_kid_run(root, inception_file))
  return str(root / "run")
