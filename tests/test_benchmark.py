"""Smoke test of scripts/benchmark.py: runs at a tiny size (not a timing test) and checks the JSON keys."""

import json
import os
import subprocess
import sys

from train_helpers import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark.py")

REQUIRED_KEYS = ("jax_train_img_s", "torch_eager_train_img_s", "torch_compile_train_img_s", "jax_sample_img_s",
                 "torch_eager_sample_img_s", "torch_compile_sample_img_s", "flops_per_image", "device",
                 "jax_vs_torch_eager_train", "jax_vs_torch_eager_sample")


def test_benchmark_runs_tiny_and_writes_the_json_keys(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)  # the script must find the repository itself
  env["XLA_FLAGS"] = xla_flags(2)
  # torch.compile needs a C++ toolchain and a long first compile: the smoke test skips it.
  cmd = [sys.executable, SCRIPT, "--image-size", "8", "--batch-size", "4", "--widths", "4,8", "--block-depth", "1",
         "--sample-steps", "2", "--repeats", "1", "--train-iters", "2", "--frameworks", "jax,torch_eager",
         "--json", str(out)]
  proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in REQUIRED_KEYS:
    assert key in result, key
  assert result["jax_train_img_s"] > 0 and result["torch_eager_train_img_s"] > 0
  assert result["jax_sample_img_s"] > 0 and result["torch_eager_sample_img_s"] > 0
  assert result["torch_compile_train_img_s"] is None  # not requested
  assert result["flops_per_image"] > 0
  assert result["devices"]["jax"].endswith("x2")  # the sharded step ran over both host devices
  assert "JAX / torch_eager train" in proc.stderr  # the readable table
