"""Where the time of a traced training window went: a summary of a ``train.profile_steps`` trace.

  python scripts/profile_summary.py outputs/demo/profile            # the newest trace under it
  python scripts/profile_summary.py path/to/perfetto_trace.json.gz --top 15

Reads the Perfetto trace that ``jax.profiler`` writes next to TensorBoard's files and prints, per
thread that ran XLA ops, the busy time by op kind (convolutions, fusions, all-reduces, waits at
collectives, ...) and the most expensive ops. The full picture is in TensorBoard's profile tab or
at ui.perfetto.dev; this is the one-screen version for a terminal or a report.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

# Op-name patterns -> kind, first match wins. XLA names ops after the HLO instruction
# ("convolution.18", "ynn_fusion.3", "broadcast_add_fusion.5", "all-reduce.1", "psum.301").
KINDS = (
    # XLA:CPU hands convolutions and matmuls to YNNPACK (XNNPACK before it) as "ynn_fusion" ops.
    ("convolution / matmul", re.compile(r"^(convolution|conv|cudnn|.*conv.*fusion|ynn_fusion|xnn_fusion)")),
    ("collective", re.compile(r"^(all-reduce|psum|pmean|all-gather|reduce-scatter|collective|ncclAllReduce)")),
    ("wait at a collective", re.compile(r"^(Rendezvous|Wait: |Wait for rendezvous)")),
    ("fusion", re.compile(r"fusion")),
    ("loop / control", re.compile(r"^(while|conditional|call)")),
    ("dot", re.compile(r"^(dot|gemm|cublas)")),
)
# Wrappers that contain the ops above (their time is the ops'), Python frames ("$file:line name")
# and the host's side of a launch: counted in no kind.
CONTAINERS = re.compile(r"^(ThunkExecutor|CommonPjRt|\[\d+\] CommonPjRt|Handle |PjitFunction|\$|Wait for (LaunchOnDevice|"
                        r"donation|usage)|shard_args|ParseArguments|DevicePut|PythonRefManager|ThreadpoolListener)")


def find_trace(path: str) -> str:
  """``path`` itself, or the newest perfetto_trace.json.gz under it."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not found:
    raise SystemExit(f"no perfetto_trace.json.gz under {path}; train with --config.train.profile_steps=A,B first")
  return found[-1]


def kind_of(name: str) -> str | None:
  """The kind of an op name, or None for wrappers and Python frames."""
  if CONTAINERS.match(name):
    return None
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other op"


def summarize(events: list[dict]) -> dict[str, dict]:
  """thread name -> {"kinds": Counter(kind -> ms), "ops": Counter(op -> ms)} for threads running XLA ops."""
  names = {e.get("tid"): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  out: dict[str, dict] = {}
  for e in events:
    if e.get("ph") != "X":
      continue
    kind = kind_of(e["name"])
    if kind is None:
      continue
    thread = names.get(e.get("tid"), str(e.get("tid")))
    entry = out.setdefault(thread, {"kinds": collections.Counter(), "ops": collections.Counter()})
    entry["kinds"][kind] += e["dur"] / 1e3
    entry["ops"][re.sub(r"\.\d+$", "", e["name"])] += e["dur"] / 1e3
  return {t: v for t, v in out.items() if sum(v["kinds"].values()) > 0}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="a trace file, or a workdir's profile/ folder")
  parser.add_argument("--top", type=int, default=8, help="ops listed per thread")
  args = parser.parse_args(argv)
  path = find_trace(args.path)
  with gzip.open(path, "rt") as f:
    events = json.load(f)["traceEvents"]
  summary = summarize(events)
  print(f"{path}: busy time of the threads that ran XLA ops")
  for thread, entry in sorted(summary.items(), key=lambda kv: -sum(kv[1]["kinds"].values())):
    total = sum(entry["kinds"].values())
    print(f"\n{thread}: {total:.1f} ms")
    for kind, ms in entry["kinds"].most_common():
      print(f"  {kind:<22} {ms:9.1f} ms {100 * ms / total:5.1f}%")
    print("  top ops: " + ", ".join(f"{op} {ms:.1f} ms" for op, ms in entry["ops"].most_common(args.top)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
