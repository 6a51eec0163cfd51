"""Test set-up: CPU only, 4 virtual devices, loud rank promotion, float32 everywhere.

The environment must be set before JAX is imported anywhere, hence module level.
"""

import os

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

import pytest  # noqa: E402  (after the environment set-up above)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Runs the slow tests first (otherwise in collection order).

  pytest-xdist hands out tests in order: a minute-long test near the end keeps one worker busy
  while the other has finished. With the slow ones first, the last tests are the short ones and
  both workers end within seconds of each other.
  """
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory):
  """Path-returning factory of the briefly trained parity models, built once per test session.

  Training (a few seconds to a minute on 2 cores) runs once per variant even under pytest-xdist:
  the first worker writes a weight file under a lock, the others read it.
  """
  from filelock import FileLock
  from ddim_jax.interop import parity_fixtures, weight_files
  root = tmp_path_factory.getbasetemp().parent

  def get(variant: str):
    path = root / f"trained_{variant}.safetensors"
    with FileLock(str(path) + ".lock"):
      if not path.exists():
        model, variables, normalizer = parity_fixtures.trained_reference(variant)
        weight_files.save_weights(str(path), model, variables, normalizer, 16, weights="raw")
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
  path = tmp_path_factory.getbasetemp().parent / "random_inception.pth"
  with FileLock(str(path) + ".lock"):
    if not path.exists():
      tmp = path.with_suffix(".tmp")
      write_random_inception(tmp)
      tmp.rename(path)
  return str(path)


@pytest.fixture(scope="session")
def kid_run(tmp_path_factory, inception_file):
  """The workdir of the tiny KID run the command tests share (cli_helpers.train_kid_run), trained once
  per session even under pytest-xdist (a file lock; a finished run leaves a marker). Tests only read it."""
  from filelock import FileLock
  from cli_helpers import train_kid_run
  root = tmp_path_factory.getbasetemp().parent / "kid_run"
  done = root / "trained"
  with FileLock(str(root) + ".lock"):
    if not done.exists():
      import shutil
      shutil.rmtree(root, ignore_errors=True)  # a run that failed half-way in another worker
      root.mkdir()
      train_kid_run(root, inception_file)
      done.write_text("ok")
  return str(root / "run")
