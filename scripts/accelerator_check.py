#!/usr/bin/env python
"""One prepared accelerator check: the device, the benchmark, the training loop, parity, the demo
and the tests that matter on an accelerator, into one JSON and one log.

  JAX_PLATFORMS=cuda python scripts/accelerator_check.py --out $OUT     # a GPU: about 8 minutes
  JAX_PLATFORMS=cpu python scripts/accelerator_check.py --small --out /tmp/check   # CPU, small sizes
  scripts/accelerator_check.sh                                          # the same, wheels put on the path first

Steps (``--steps`` picks some; each is its own subprocess with its own time limit, so a step that
fails or runs over is recorded with its return code and the tail of its output, and the check goes
on; ``accelerator_check.json`` is rewritten after every step, so what finished is kept):

  env            device, backend, versions of python/jax/jaxlib/flax/optax/orbax/torch
  host_time      the loop's host time per step, device work stubbed out (scripts/benchmark.py --host-time)
  bench_bf16     benchmark at batch 64, bf16: jax, torch eager, torch.compile (train and 20-step sampling)
  bench_fp32     the same in fp32: jax, torch eager
  steps_per_call jax bf16 at batch 64 with 1, 4 and 8 optimiser steps per call
  xla_flags      jax bf16 at batch 64, 8 steps per call, under each candidate of XLA_FLAG_CANDIDATES
  throughput     jax bf16 at the throughput batch (512), 8 steps per call: training MFU, sampling img/s
  loop           `train_and_evaluate` on the default preset (a folder of generated 96x96 PNGs, bf16, KID
                 and sample grids off) against the bare step (scripts/benchmark.py --loop)
  parity         scripts/parity_report.py --json at --precision default and highest
  demo           `ddim-jax demo`: its time and digits metric
  tests          pytest of the files whose numbers depend on the backend (GPU_TESTS)

``--small``: the same steps at sizes a 2-core CPU runs in a few minutes (16x16, narrow widths, few
steps; no torch.compile, no tests, the demo shortened). The numbers of a small run measure nothing;
it proves the check runs end to end.

The packages: only what a GPU image has (jax, flax, optax, orbax-checkpoint, torch, numpy, pillow,
etils, safetensors, tqdm) plus ``ml_collections`` and ``tensorboardX`` (see accelerator_check.sh);
this package is used from the checkout (``PYTHONPATH``), not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "host_time", "bench_bf16", "bench_fp32", "steps_per_call", "xla_flags", "throughput", "loop",
         "parity", "demo", "tests")
# XLA:GPU flags that may pay for this model (chosen by this check, not set by default until measured):
# convolutions are not in XLA's default command-buffer set, and a step makes ~120 cuDNN launches.
XLA_FLAG_CANDIDATES = {
    "none": "",
    "command buffers + convolutions": "--xla_gpu_enable_command_buffer=+CONVOLUTION",
    "command buffers + convolutions, while loops": "--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE",
}
GPU_TESTS = ("tests/test_parity.py", "tests/test_models.py", "tests/test_inversion.py", "tests/test_sampling.py",
             "tests/test_feed.py")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "accelerator_check_out"),
                 help="folder of accelerator_check.json, accelerator_check.log and the steps' files ($OUT)")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
  p.add_argument("--small", action="store_true", help="small sizes: prove the check runs (a CPU)")
  p.add_argument("--time-scale", type=float, default=1.0, help="multiply every step's time limit")
  args = p.parse_args(argv)
  args.steps = [s for s in args.steps.split(",") if s]
  unknown = sorted(set(args.steps) - set(STEPS))
  if unknown:
    p.error(f"unknown step(s) {unknown}; choose from {','.join(STEPS)}")
  return args


class Check:
  """Runs the steps, each in a subprocess with a time limit; keeps the JSON and the log up to date."""

  def __init__(self, out: str, time_scale: float = 1.0):
    os.makedirs(out, exist_ok=True)
    self.out = out
    self.time_scale = time_scale
    self.json_path = os.path.join(out, "accelerator_check.json")
    self.log_path = os.path.join(out, "accelerator_check.log")
    self.result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    self.start = time.perf_counter()
    open(self.log_path, "w", encoding="utf-8").close()

  def log(self, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f}s] {text}"
    print(line, flush=True)
    with open(self.log_path, "a", encoding="utf-8") as f:
      f.write(line + "\n")

  def save(self) -> None:
    self.result["seconds"] = round(time.perf_counter() - self.start, 1)
    tmp = self.json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.result, f, indent=1, default=str)
    os.replace(tmp, self.json_path)

  def run(self, name: str, argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs ``argv`` (from the repository root); returns {returncode, seconds, output tail}."""
    timeout *= self.time_scale
    self.log(f"{name}: {' '.join(argv)} (limit {timeout:.0f} s)")
    t0 = time.perf_counter()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH", "")) if p)
    try:
      proc = subprocess.run(argv, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                            check=False)
      code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      code = "timeout"
      output = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
               ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    seconds = round(time.perf_counter() - t0, 1)
    with open(self.log_path, "a", encoding="utf-8") as f:
      f.write(output[-20000:] + "\n")
    self.log(f"{name}: exit {code} in {seconds} s")
    return {"returncode": code, "seconds": seconds, "output_tail": output[-1500:]}

  def record(self, step: str, value) -> None:
    self.result["steps"][step] = value
    self.save()


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _last_json_object(text: str):
  """The last line of ``text`` that parses as a JSON object (a script's ``--json`` output)."""
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  start = text.rfind("\n{")
  try:
    return json.loads(text[start + 1:]) if start >= 0 else None
  except ValueError:
    return None


def env_info() -> dict:
  """Device and versions (run in the check's own process: it imports jax once, on purpose last)."""
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy", "ml_collections"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      versions[name] = None
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  stats = {}
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    pass
  return {"python": sys.version.split()[0], "versions": versions, "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind, "device_count": len(devices),
          "device_memory_bytes": stats.get("bytes_limit"), "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def make_image_folder(path: str, count: int, size: int) -> str:
  """``count`` random-but-smooth RGB PNGs of ``size`` x ``size`` (the loop's training folder)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(count):
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(os.path.join(path, f"img_{i:04d}.png"))
  return path


def failed_steps(steps: dict, prefix: str = "") -> list[str]:
  """The names of the runs (nested: ``parity/default``) whose return code is not 0."""
  out = []
  for name, value in steps.items():
    if isinstance(value, dict):
      if "returncode" in value:
        out += [] if value["returncode"] == 0 else [prefix + name]
      else:
        out += failed_steps(value, f"{prefix}{name}/")
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  check = Check(args.out, args.time_scale)
  small = args.small
  py = sys.executable
  bench = [py, "scripts/benchmark.py"]
  # The model the benchmark times: the real 64x64 configuration, or a small one.
  size = ["--image-size", "16", "--widths", "8,16", "--block-depth", "1", "--repeats", "2"] if small else \
         ["--image-size", "64", "--repeats", "3"]
  batch = "8" if small else "64"
  big_batch = "16" if small else "512"
  all_frameworks = "jax,torch_eager" if small else "jax,torch_eager,torch_compile"
  check.result.update({"small": small, "argv": sys.argv[1:]})

  def benchmark(step, extra, timeout, env=None):
    path = os.path.join(args.out, f"{step}.json")
    outcome = check.run(step, bench + size + extra + ["--json", path], timeout, env)
    outcome["result"] = _read_json(path)
    return outcome

  for step in args.steps:
    if step == "env":
      check.record(step, env_info())
      env = check.result["steps"]["env"]
      # The results file's provenance (scripts/docs_tables.py renders docs/results/ files with it).
      check.result["provenance"] = provenance.collect(
          device=None if env["backend"] == "cpu" else f"{env['device_kind']} x{env['device_count']}")
      check.log(f"env: {env}")
    elif step == "host_time":
      path = os.path.join(args.out, "host_time.json")
      outcome = check.run(step, bench + ["--host-time", "--json", path], 120)
      outcome["result"] = _read_json(path)
      check.record(step, outcome)
    elif step == "bench_bf16":
      check.record(step, benchmark(step, ["--batch-size", batch, "--precision", "bf16", "--frameworks",
                                          all_frameworks], 150))
    elif step == "bench_fp32":
      check.record(step, benchmark(step, ["--batch-size", batch, "--precision", "fp32", "--frameworks",
                                          "jax,torch_eager"], 90))
    elif step == "steps_per_call":
      check.record(step, {k: benchmark(f"{step}_{k}", ["--batch-size", batch, "--precision", "bf16",
                                                       "--frameworks", "jax", "--steps-per-call", k], 60)
                          for k in ("1", "4", "8")})
    elif step == "xla_flags":
      runs = {}
      for label, flags in XLA_FLAG_CANDIDATES.items():
        flags_env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        runs[label] = {"flags": flags, **benchmark(f"{step}_{len(runs)}", [
            "--batch-size", batch, "--precision", "bf16", "--frameworks", "jax", "--steps-per-call", "8"], 60,
            flags_env)}
      check.record(step, runs)
    elif step == "throughput":
      check.record(step, benchmark(step, ["--batch-size", big_batch, "--precision", "bf16", "--frameworks", "jax",
                                          "--steps-per-call", "8"], 90))
    elif step == "loop":
      folder = make_image_folder(os.path.join(args.out, "loop_images"), 64 if small else 640, 32 if small else 96)
      overrides = ["--config.data.dataset=folder", f"--config.data.folder={folder}",
                   f"--config.data.cache_dir={os.path.join(args.out, 'loop_cache')}", "--config.train.kid_every=0",
                   "--config.train.sample_every=0", "--config.train.checkpoint_every=100000",
                   "--config.data.validation_fraction=0.1"]
      if small:
        overrides += ["--config.model.image_size=16", "--config.model.widths=(8,16)", "--config.model.block_depth=1",
                      "--config.train.batch_size=8", "--config.train.log_every=10"]
      else:
        overrides += ["--config.model.dtype=bfloat16", "--config.train.log_every=100"]
      path = os.path.join(args.out, "loop.json")
      outcome = check.run(step, bench + ["--loop", "--loop-config", "default", "--loop-steps", "40" if small else "600",
                                         "--repeats", "2" if small else "3", "--json", path]
                          + [f"--loop-override={o}" for o in overrides], 300 if small else 150)
      outcome["result"] = _read_json(path)
      check.record(step, outcome)
    elif step == "parity":
      runs = {}
      for precision in ("default", "highest"):
        extra = ["--image-size", "16", "--widths", "8,16", "--trajectory-steps", "5", "--fixture-steps", "20",
                 "--fixture-cache", os.path.join(args.out, "parity_cache")] if small else []
        outcome = check.run(f"{step}_{precision}", [py, "scripts/parity_report.py", "--precision", precision,
                                                    "--json", *extra], 120)
        outcome["result"] = _last_json_object(outcome.pop("output_tail", "")) or None
        runs[precision] = outcome
      check.record(step, runs)
    elif step == "demo":
      workdir = os.path.join(args.out, "demo")
      extra = ["--config.train.num_steps=20", "--config.train.checkpoint_every=10", "--config.train.log_every=10",
               "--config.train.sample_every=0", "--config.eval.num_quality_images=50"] if small else []
      outcome = check.run(step, [py, "-m", "ddim_jax.cli", "demo", "--workdir", workdir, *extra], 200)
      tail = outcome["output_tail"]
      outcome["digits_metric_lines"] = [line for line in tail.splitlines() if "model (" in line]
      check.record(step, outcome)
    elif step == "tests":
      if small:
        check.record(step, {"skipped": "--small: the tests run on the CPU in the suite itself"})
        continue
      outcome = check.run(step, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS], 180)
      outcome["summary"] = next((line for line in reversed(outcome["output_tail"].splitlines())
                                 if " passed" in line or " failed" in line or "error" in line), None)
      check.record(step, outcome)
  failed = failed_steps(check.result["steps"])
  check.result["failed_steps"] = failed
  check.save()
  check.log(f"done in {check.result['seconds']} s; wrote {check.json_path} and {check.log_path}"
            + (f"; failed: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
