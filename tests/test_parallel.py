"""CPU device configuration (ddim_jax/parallel.py): how many JAX devices the CPU backend gets."""

import os
import sys

import pytest

from ddim_jax import parallel
from train_helpers import run, subprocess_env


def test_cpu_device_count_auto_divides_the_batch(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
  assert parallel.cpu_device_count("auto", 8) == 4
  assert parallel.cpu_device_count("auto", 6) == 3  # the largest count <= 4 cores dividing 6
  assert parallel.cpu_device_count("auto", 5) == 1
  assert parallel.cpu_device_count("auto", 2) == 2
  assert parallel.cpu_device_count("auto", 8, num_processes=4) == 2  # this process's share: 2 images
  assert parallel.cpu_device_count("3", 64) == parallel.cpu_device_count(3, 64) == 3
  for bad in ("0", "-1", "two", "1.5", None):
    with pytest.raises(ValueError, match="config.cpu_devices"):
      parallel.cpu_device_count(bad, 8)


@pytest.mark.parametrize("spec", ["auto", "3"])
def test_configure_cpu_devices_sets_the_backend_device_count(spec):
  """Without XLA_FLAGS forcing a count, the CPU backend starts with the configured devices."""
  env = subprocess_env(1)
  del env["XLA_FLAGS"]
  code = ("import jax; from ddim_jax import parallel; "
          f"n = parallel.configure_cpu_devices({spec!r}, 12); "
          f"print(n, jax.local_device_count(), parallel.cpu_device_count({spec!r}, 12)); "
          "import os; print(os.environ.get('XLA_FLAGS', ''))")
  result = run([sys.executable, "-c", code], env)
  assert result.returncode == 0, result.stderr[-2000:]
  counts, flags = result.stdout.split("\n")[:2]
  configured, devices, expected = map(int, counts.split())
  assert configured == devices == expected
  # With one device per core, XLA's concurrency-oriented scheduler is switched off (it only helps
  # one device spread over many cores).
  assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags) == (devices > 1)
  # XLA_FLAGS takes precedence (the tests' own virtual devices are left alone).
  result = run([sys.executable, "-c", code], subprocess_env(2))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[:2] == ["None", "2"]
