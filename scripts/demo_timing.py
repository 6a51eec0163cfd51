"""The demo's time and digits metric, as README states them: one results file per measurement.

Runs ``ddim-jax demo`` (what ``make demo`` runs, once installed) twice in fresh workdirs sharing
one compilation cache that starts empty: the first run compiles everything (a new user's first
demo), the second loads the compiled programs (any later command, a resume). Records each run's
wall seconds, the digits metric it printed for its EMA samples and its calibration points, and
the final training loss; then ``ddim-jax evaluate --steps 5,10,20,50 --json -`` of the first run's
model (the digits metric per step count, and its calibration points); plus the provenance
(scripts/provenance.py).

  python scripts/demo_timing.py --out docs/results/demo-2026-12-07.json [--avx2]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, provenance.REPO)
from ddim_jax import files  # noqa: E402  pylint: disable=wrong-import-position

AVX2_ENV = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
_ROW = re.compile(r"^\s*(?P<name>.+?)\s+(?P<frechet>-?\d+\.\d+)\s+(?P<coverage>\d+\.\d)\s+(?P<hist>[\d ]+)$")


def parse_scores(output: str) -> dict:
  """The demo's digits-metric table (``digits_metric.table_lines``): {row name: Frechet distance}."""
  scores, in_table = {}, False
  for line in output.splitlines():
    if "Frechet" in line and "coverage" in line:
      in_table = True
      continue
    match = _ROW.match(line) if in_table else None
    if match:
      scores[match["name"].strip()] = float(match["frechet"])
    elif in_table and scores:
      break
  return scores


def final_loss(workdir: str):
  """The last training loss logged in ``metrics.jsonl`` (None if none)."""
  loss = None
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      loss = record.get("loss", loss)
  return loss


def run_demo(cli: str, workdir: str, env: dict) -> dict:
  start = time.perf_counter()
  proc = subprocess.run([cli, "demo", "--workdir", workdir], env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"ddim-jax demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return {"wall_seconds": round(wall, 1), "digits_metric": parse_scores(proc.stdout),
          "final_loss": final_loss(workdir)}


def evaluate_steps(cli: str, workdir: str, env: dict, steps: str) -> dict:
  """``ddim-jax evaluate --workdir W --steps S --json -``: the digits metric per step count, with the
  calibration points (its stdout is one JSON object)."""
  proc = subprocess.run([cli, "evaluate", "--workdir", workdir, "--steps", steps, "--json", "-"], env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"ddim-jax evaluate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--out", required=True, help="the results file to write (JSON)")
  p.add_argument("--avx2", action="store_true", help="cap XLA and ATen at AVX2 (the other processor kind)")
  p.add_argument("--steps", default="5,10,20,50", help="the step counts `evaluate` scores the first demo model at")
  p.add_argument("--cli", default=os.path.join(os.path.dirname(sys.executable), "ddim-jax"),
                 help="the ddim-jax command to time (default: the one beside this Python)")
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="demo_timing_")
  env = dict(os.environ, DDIM_JAX_COMPILATION_CACHE=os.path.join(tmp, "xla"), **(AVX2_ENV if args.avx2 else {}))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the demo's own cache setting decides, starting empty
  saved = dict(os.environ)
  os.environ.update(env)
  record = {"provenance": provenance.collect(), "runs": {}}
  os.environ.clear()
  os.environ.update(saved)
  try:
    record["runs"]["empty_cache"] = run_demo(args.cli, os.path.join(tmp, "first"), env)
    record["runs"]["warm_cache"] = run_demo(args.cli, os.path.join(tmp, "second"), env)
    record["evaluate"] = evaluate_steps(args.cli, os.path.join(tmp, "first"), env, args.steps)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  files.ensure_parent(args.out, "--out")
  files.replace_text(args.out, json.dumps(record, indent=1) + "\n", "--out")
  for name, run in record["runs"].items():
    print(f"{name}: {run['wall_seconds']:.0f} s, digits metric {run['digits_metric']}, final loss {run['final_loss']}",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
