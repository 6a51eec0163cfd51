"""Smoke test of scripts/benchmark.py: runs at a tiny size (not a timing test) and checks the JSON keys,
the FLOPs (the jaxpr count of ddim_jax.infra.flops, not XLA's cost analysis) and that no MFU is made up on CPU."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark.py")

REQUIRED_KEYS = ("jax_train_img_s", "torch_eager_train_img_s", "torch_compile_train_img_s", "jax_sample_img_s",
                 "torch_eager_sample_img_s", "torch_compile_sample_img_s", "flops_per_image", "device",
                 "jax_vs_torch_eager_train", "jax_vs_torch_eager_sample", "forward_flops_per_image",
                 "sample_flops_per_image", "flops_method", "xla_cost_analysis_flops_per_image",
                 "xla_cost_analysis_sample_flops_per_image", "peak_flops", "peak_flops_source", "jax_train_mfu",
                 "jax_sample_mfu", "torch_eager_train_mfu")


@pytest.mark.slow
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
  # FLOPs per image: the jaxpr count of the same step and sampler (closed form: tests/test_flops.py).
  from test_flops import closed_form_forward, closed_form_train
  assert result["flops_per_image"] == closed_form_train("keras", (4, 8), 8, block_depth=1)
  assert result["forward_flops_per_image"] == closed_form_forward("keras", (4, 8), 8, block_depth=1)
  assert result["sample_flops_per_image"] == 2 * result["forward_flops_per_image"]  # --sample-steps 2
  assert "jaxpr" in result["flops_method"]
  assert result["xla_cost_analysis_flops_per_image"] is None or result["xla_cost_analysis_flops_per_image"] > 0
  # No peak is known for a CPU: no MFU, and the table says so.
  assert result["peak_flops"] is None and result["peak_flops_source"].startswith("unknown peak")
  for name in ("jax", "torch_eager", "torch_compile"):
    assert result[f"{name}_train_mfu"] is None and result[f"{name}_sample_mfu"] is None
  assert "unknown peak" in proc.stderr and "GFLOP per training image" in proc.stderr
  assert result["devices"]["jax"].endswith("x2")  # the sharded step ran over both host devices
  assert "JAX / torch_eager train" in proc.stderr  # the readable table


def _load_benchmark():
  import importlib.util
  spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_mfu_on_a_known_device_uses_the_jaxpr_flops_and_every_jax_device():
  """The first H200 run (accelerator notes, 2026-12-04) redone from its rates: bf16, 64x64, keras.

  XLA's cost analysis said 0.077 GFLOP per training image (cuDNN convolutions count 0) and MFU 0.1%;
  with the jaxpr count (6.85 GFLOP) JAX's 8,471 img/s is ~5.9% of the 989.4 TFLOP/s bf16 peak.
  """
  bench = _load_benchmark()
  forward = 2_283_800_576
  infos = {"jax": {"device": "gpu:NVIDIA H200 x1", "device_kind": "NVIDIA H200", "device_count": 1,
                   "flops": {"train": 6_850_611_200, "forward": forward, "sample": 20 * forward},
                   "xla_flops": {"train": 0.077e9, "sample": 0.287e9}, "matmul_precision": None,
                   "compile_train_s": 7.5, "compile_sample_s": 1.7},
           "torch_eager": {"device": "cuda:NVIDIA H200", "compile_train_s": 1.0, "compile_sample_s": 1.0}}
  result = {"jax_train_img_s": 8471.0, "jax_sample_img_s": 2203.0, "torch_eager_train_img_s": 1467.0,
            "torch_eager_sample_img_s": 335.0, "torch_compile_train_img_s": None, "torch_compile_sample_img_s": None}
  bench.add_flops_and_mfu(result, infos, "bf16")
  assert result["flops_per_image"] == 6_850_611_200
  assert result["xla_cost_analysis_flops_per_image"] == 0.077e9  # kept, labelled as a diagnostic
  assert result["peak_flops"] == 989.4e12 and "H200" in result["peak_flops_source"]
  assert abs(result["jax_train_mfu"] - 8471 * 6.8506112e9 / 989.4e12) < 1e-9
  assert 0.058 < result["jax_train_mfu"] < 0.059 and 0.10 < result["jax_sample_mfu"] < 0.11
  assert abs(result["torch_eager_train_mfu"] - 1467 * 6.8506112e9 / 989.4e12) < 1e-9
  assert result["torch_compile_train_mfu"] is None
  # Four JAX devices: the rate is the sum over them, so the peak is 4x.
  infos["jax"]["device_count"] = 4
  bench.add_flops_and_mfu(result, infos, "bf16")
  assert abs(result["jax_train_mfu"] - 8471 * 6.8506112e9 / (4 * 989.4e12)) < 1e-9
  # fp32 at jax_default_matmul_precision=highest: not the TF32 peak, so no MFU for JAX.
  infos["jax"]["matmul_precision"] = "highest"
  bench.add_flops_and_mfu(result, infos, "fp32")
  assert result["jax_train_mfu"] is None and result["peak_flops"] is None

  infos["jax"].update(device_count=1, matmul_precision=None)
  bench.add_flops_and_mfu(result, infos, "bf16")
  result.update(config={"variant": "keras", "widths": "32,64,96,128", "image_size": 64, "batch_size": 64,
                        "precision": "bf16", "steps_per_call": 1, "sample_steps": 20, "repeats": 3,
                        "train_steps_per_repeat": 50},
                device="gpu:NVIDIA H200 x1", devices={"jax": "gpu:NVIDIA H200 x1", "torch_eager": "cuda:NVIDIA H200"})
  for name in ("jax", "torch_eager"):
    result.update({f"{name}_compile_train_s": 1.0, f"{name}_compile_sample_s": 1.0, f"{name}_peak_memory_mb": 700.0})
  table = bench.format_table(result)
  assert "6.851 GFLOP per training image, 45.676 per sampled image (20 steps of 2.284)" in table
  assert "XLA cost analysis (diagnostic): 0.077" in table
  assert "peak: H200 dense bf16: 989.4 TFLOP/s" in table
  assert "5.9%" in table


@pytest.mark.slow
def test_host_time_per_step_measures_every_input_path():
  """``--host-time``'s measurement (not a timing assertion): the three paths run and report positive times."""
  sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
  try:
    import benchmark
  finally:
    sys.path.pop(0)
  result = benchmark.host_time_per_step(steps=4, image_size=16, batch=8, num_images=32, steps_per_call=2)
  for name in ("before", "device", "host", "device_k"):
    assert result[f"{name}_ms"] > 0, result
  assert "set on the devices" in benchmark.format_host_time(result)
  assert "at 2 steps per call" in benchmark.format_host_time(result)
