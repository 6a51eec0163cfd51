"""The test suite's time, as README and docs/testing.md state it: one results file per measurement.

Runs ``make test``'s command (``python -m pytest -q -n 2 --maxschedchunk 1 tests``) ``--runs``
times in a row, optionally beside ``--hogs`` CPU hogs (``python -c "while True: pass"``: a busy
machine) and with the AVX2 cap (``--avx2``: ``XLA_FLAGS=--xla_cpu_max_isa=AVX2
ATEN_CPU_CAPABILITY=avx2``, the other processor kind's code paths), and writes one JSON object:
each run's wall and CPU seconds, its pytest summary (passed/failed/errors/skipped) and exit status,
plus the provenance (scripts/provenance.py). scripts/docs_tables.py renders the suite's line in
README.md and docs/testing.md from these files.

  python scripts/suite_timing.py --out docs/results/suite-avx512-2026-12-07.json
  python scripts/suite_timing.py --avx2 --out docs/results/suite-avx2-2026-12-07.json
  python scripts/suite_timing.py --hogs 1 --runs 3 --out docs/results/suite-under-load-2026-12-07.json

Exit status: 0 when every run passed, 1 otherwise (the file is written either way).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, provenance.REPO)
from ddim_jax import files  # noqa: E402  pylint: disable=wrong-import-position

REPO = provenance.REPO
PYTEST = ["-m", "pytest", "-q", "-n", "2", "--maxschedchunk", "1", "tests"]
AVX2_ENV = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
HOG = "while True: pass"
_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def parse_summary(output: str) -> dict:
  """pytest's last summary line ('12 passed, 1 failed in 3.2s') as counts by outcome."""
  for line in reversed(output.strip().splitlines()):
    if " in " in line and _SUMMARY.search(line):
      counts = {}
      for number, outcome in _SUMMARY.findall(line):
        counts["errors" if outcome.startswith("error") else outcome] = int(number)
      return counts
  return {}


def run_once(python: str, env: dict, log_path: str) -> dict:
  """One run of the suite: wall and children's CPU seconds, the pytest counts, the exit status."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    rc = subprocess.run([python, *PYTEST], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                        check=False).returncode
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(log_path, encoding="utf-8") as log:
    output = log.read()
  failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
  return {"rc": rc, "wall_seconds": round(wall, 1), "cpu_seconds": round(
      (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
          **parse_summary(output), "failures": failures[:20]}


def write(path: str, record: dict) -> None:
  files.ensure_parent(path, "--out")
  files.replace_text(path, json.dumps(record, indent=1) + "\n", "--out")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--out", required=True, help="the results file to write (JSON)")
  p.add_argument("--runs", type=int, default=1, help="runs in a row")
  p.add_argument("--hogs", type=int, default=0, help="CPU hogs running beside the suite (each takes one core)")
  p.add_argument("--avx2", action="store_true", help="cap XLA and ATen at AVX2 (the other processor kind)")
  p.add_argument("--python", default=sys.executable, help="the interpreter of the venv to test")
  args = p.parse_args(argv)
  env = dict(os.environ, **(AVX2_ENV if args.avx2 else {}))
  hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
  # The provenance is read with the suite's environment, so the AVX2 cap is named in it.
  saved = dict(os.environ)
  os.environ.update(env)
  record = {"provenance": provenance.collect(argv=[os.path.abspath(__file__), *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
            "suite_command": "python " + " ".join(PYTEST), "hogs": args.hogs, "avx2_cap": args.avx2, "runs": []}
  os.environ.clear()
  os.environ.update(saved)
  try:
    for i in range(args.runs):
      log = f"{args.out}.run{i + 1}.log"
      result = run_once(args.python, env, log)
      record["runs"].append(result)
      write(args.out, record)  # after every run: a long series stopped midway keeps what it measured
      if result["rc"] == 0:
        os.remove(log)  # kept only where a run failed: its output says why
      print(f"run {i + 1}/{args.runs}: rc {result['rc']}, {result.get('passed', 0)} passed, "
            f"{result.get('failed', 0)} failed in {result['wall_seconds']:.0f} s"
            + (f" (log: {log})" if result["rc"] else ""), file=sys.stderr, flush=True)
  finally:
    for hog in hogs:
      hog.kill()
      hog.wait()
  write(args.out, record)
  return 0 if all(r["rc"] == 0 for r in record["runs"]) else 1


if __name__ == "__main__":
  sys.exit(main())
