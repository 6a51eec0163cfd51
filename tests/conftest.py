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


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory):
  """Path-returning factory of the briefly trained parity models, built once per test session.

  Training (a few seconds to a minute on 2 cores) runs once per variant even under pytest-xdist:
  the first worker writes a weight file under a lock, the others read it.
  """
  from filelock import FileLock
  from ddim_jax.interop import parity, weight_files
  root = tmp_path_factory.getbasetemp().parent

  def get(variant: str):
    path = root / f"trained_{variant}.safetensors"
    with FileLock(str(path) + ".lock"):
      if not path.exists():
        model, variables, normalizer = parity.trained_reference(variant)
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
