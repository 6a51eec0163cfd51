"""Where a measurement came from: the ``provenance`` object of every results file in docs/results/.

Every script that measures something users read (benchmark.py, parity_report.py,
benchmark_data.py, accelerator_check.py, suite_timing.py) puts ``collect(...)`` into its JSON as
``"provenance"``; scripts/docs_tables.py renders the tables of README.md and docs/ from those files
and names each file under its table, and refuses a file without these fields:

  date       UTC date and time of the measurement
  commit     ``git rev-parse HEAD`` of the checkout, with ``+dirty`` when tracked files were changed
  device     what ran it: the accelerator (when the caller passes one) or the CPU model and cores
  cpu        processor model, cores available, the vector extensions that make float32 results and
             speed differ between machines of one kind (AVX2 / AVX-512 / AVX512-BF16 / AMX), and the
             settings that cap them (XLA_FLAGS' --xla_cpu_max_isa, ATEN_CPU_CAPABILITY)
  versions   python, jax, jaxlib, flax, optax, orbax-checkpoint, torch, numpy (None: not installed)
  command    the command line that produced the file
  load       the 1-minute load average when the measurement started (a busy machine is named)

Standard library only: the scripts run on accelerator machines without this package installed.
"""

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys

FIELDS = ("date", "commit", "device", "cpu", "versions", "command", "load")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy")
# /proc/cpuinfo flag -> the name users know.
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(repo: str = REPO) -> str | None:
  """The checkout's commit (``+dirty`` when tracked files differ from it), or None outside git."""
  try:
    head = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if dirty else "")


def cpu() -> dict:
  """The processor: model, cores this process may use, vector extensions, and the caps in force."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  caps = {}
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_cpu_max_isa="):
      caps["xla_cpu_max_isa"] = flag.split("=", 1)[1]
  if os.environ.get("ATEN_CPU_CAPABILITY"):
    caps["aten_cpu_capability"] = os.environ["ATEN_CPU_CAPABILITY"]
  return {"model": model, "machine": platform.machine(), "cores": cores,
          "extensions": [name for flag, name in CPU_FLAGS.items() if flag in flags], "caps": caps}


def versions(packages=PACKAGES) -> dict:
  """Installed versions of the packages that decide the numbers (None: not installed)."""
  out = {"python": platform.python_version()}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def describe_cpu(info: dict) -> str:
  """One line: 'AMD EPYC 9B14, 2 cores, AVX-512' (the widest extension, or the cap in force)."""
  widest = next((n for n in ("AVX-512", "AVX2") if n in info["extensions"]), "no AVX2")
  cap = info["caps"].get("xla_cpu_max_isa")
  if cap:
    widest = f"capped at {cap} (XLA_FLAGS)"
  return f"{info['model']}, {info['cores']} cores, {widest}"


def collect(argv=None, device: str | None = None) -> dict:
  """The provenance object: see the module docstring.

  Args:
    argv: the command line (default ``sys.argv``, shown relative to the repository).
    device: the accelerator that ran it (e.g. 'NVIDIA H200'), or None for a CPU run.
  """
  argv = list(sys.argv if argv is None else argv)
  if argv and os.path.isabs(argv[0]) and argv[0].startswith(REPO + os.sep):
    argv[0] = os.path.relpath(argv[0], REPO)
  info = cpu()
  try:
    load = round(os.getloadavg()[0], 2)
  except OSError:
    load = None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "commit": git_commit(),
      "device": device or f"CPU: {describe_cpu(info)}",
      "cpu": info,
      "versions": versions(),
      "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
      "load": load,
  }
