"""The tables of README.md and docs/ come from the results files in docs/results/; this writes them.

A generated block in a Markdown file is

  <!-- results: RENDERER docs/results/a.json [docs/results/b.json ...] -->
  ...                                   (written by this script: a table, then its sources)
  <!-- /results -->

and ``RENDERERS[RENDERER]`` turns the named files into the block's text, ending with one line per
file: its date, commit, device and command (every results file carries them: scripts/provenance.py).
A figure users read therefore always names the file it comes from, and a new measurement is a new
file plus ``python scripts/docs_tables.py``.

  python scripts/docs_tables.py            # rewrite every block from its files
  python scripts/docs_tables.py --check    # exit 1, naming each stale block (tests/test_docs_results.py)
"""

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("docs", "results")
BLOCK = re.compile(r"(<!-- results: (?P<renderer>[\w-]+) (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.DOTALL)
PROVENANCE_FIELDS = ("date", "commit", "device", "cpu", "versions", "command", "load")


class ResultsError(Exception):
  """A results file or a block that cannot be rendered (names the file and what is missing)."""


def documents(repo: str = REPO) -> list:
  """README.md and every Markdown file under docs/ (relative paths)."""
  docs = [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(repo, "docs"))) if n.endswith(".md")]
  return ["README.md", *docs]


def load(path: str, repo: str = REPO) -> dict:
  """A results file, checked for its provenance."""
  full = os.path.join(repo, path)
  try:
    with open(full, encoding="utf-8") as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise ResultsError(f"{path}: {e}") from e
  missing = [k for k in PROVENANCE_FIELDS if k not in result.get("provenance", {})]
  if missing:
    raise ResultsError(f"{path}: its 'provenance' lacks {', '.join(missing)} (see scripts/provenance.py)")
  return result


def source_line(path: str, result: dict) -> str:
  p = result["provenance"]
  load_text = f", load {p['load']}" if p.get("load") is not None else ""
  return f"Source: `{path}` ({p['date']}, commit {p['commit']}, {p['device']}{load_text}; `{p['command']}`)."


def _fmt(x, digits: int = 1) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def _sci(x) -> str:
  """1.4e-6 (not 1.4e-06); 0 as 0."""
  if x is None:
    return "-"
  if x == 0:
    return "0"
  mantissa, exponent = f"{x:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _bound(x: float) -> str:
  return _sci(x).replace(".0e", "e")


def render_parity(results: list) -> str:
  """README's parity table: one column per variant's parity_report.py file."""
  rows = [
      ("noise prediction, BN eval, 64x64, every tensor perturbed", "forward_max_abs", 1e-5),
      ("noise prediction, BN train, 64x64", "forward_bn_train_max_abs", 1e-5),
      ("BatchNorm running statistics after one train-mode pass", "bn_running_stats_max_abs", 1e-5),
      ("trajectory of a trained model, eta 0, every state", "trajectory_max_abs", 1e-4),
      ("trajectory of a trained model, eta 1, every state", "trajectory_eta1_max_abs", 1e-4),
      ("training steps (AdamW + EMA), params, tensor-relative", "train_params_rel", 1e-4),
      ("training steps, EMA weights, tensor-relative", "train_ema_rel", 1e-4),
  ]
  variants = [r["variant"] for r in results]
  lines = ["| comparison | " + " | ".join(f"{v} max abs" for v in variants) + " | bound |",
           "|---|" + "---|" * len(variants) + "---|"]
  for label, key, bound in rows:
    if all(key not in r for r in results):
      continue
    lines.append(f"| {label} | " + " | ".join(_sci(r.get(key)) for r in results) + f" | {_bound(bound)} |")
  r0 = results[0]
  notes = [f"Trajectories: {r0['trajectory_steps']} steps at 16x16 of a model trained {r0['fixture']['steps']} "
           f"steps in the torch twin; forward at {r0['image_size']}x{r0['image_size']}, batch 8."]
  if "train_steps" in r0:
    notes.append(f"Training: {r0['train_steps']} steps at {r0['train_image_size']}x{r0['train_image_size']}, widths "
                 f"{'/'.join(map(str, r0['train_widths']))}, from the same weights and NumPy draws; JAX on "
                 f"{r0['device']['backend']}, torch on the CPU, float32.")
  return "\n".join(lines) + "\n\n" + " ".join(notes)


def render_parity_detail(results: list) -> str:
  """docs/parity.md: each variant's max abs (and relative) differences, then the training steps."""
  rows = [("noise prediction, BN eval, 64x64", "forward_max_abs", "forward_max_rel", "1e-5"),
          ("noise prediction, BN train, 64x64", "forward_bn_train_max_abs", "forward_bn_train_max_rel", "1e-5"),
          ("BN running statistics after a train pass", "bn_running_stats_max_abs", None, "1e-5"),
          ("trajectory, eta = 0, every state", "trajectory_max_abs", "trajectory_max_rel", "1e-4"),
          ("trajectory, eta = 1, every state", "trajectory_eta1_max_abs", "trajectory_eta1_max_rel", "1e-4"),
          ("trajectory, eta = 0, final images", "trajectory_final_max_abs", None, "1e-4")]
  variants = [r["variant"] for r in results]
  lines = ["| comparison | " + " | ".join(f"{v} max abs (rel)" for v in variants) + " | bound |",
           "|---|" + "---|" * len(variants) + "---|"]
  for label, abs_key, rel_key, bound in rows:
    cells = [_sci(r[abs_key]) + (f" ({_sci(r[rel_key])})" if rel_key else "") for r in results]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {bound} |")
  text = "\n".join(lines)
  if all("train_steps" in r for r in results):
    r0 = results[0]
    lines = ["", f"| {r0['train_image_size']}x{r0['train_image_size']}, widths "
             f"{'/'.join(map(str, r0['train_widths']))}, {r0['train_steps']} steps | parameters | loss, step 1 | "
             f"loss, max over steps | params | BN stats | EMA |", "|---|---:|---|---|---|---|---|"]
    for r in results:
      left_out = f" ({r['train_ill_conditioned']} left out *)" if r["train_ill_conditioned"] else ""
      lines.append(f"| {r['variant']} | {r['train_num_parameters']:,}{left_out} | {_sci(r['train_loss_abs_1'])} | "
                   f"{_sci(r['train_loss_max_abs'])} | {_sci(r['train_params_rel'])} | "
                   f"{_sci(r['train_batch_stats_rel'])} | {_sci(r['train_ema_rel'])} |")
    text += "\n\n" + "\n".join(lines[1:])
  return text


def render_benchmark(results: list) -> str:
  """README's JAX-vs-torch ratios (one benchmark.py file)."""
  (r,) = results
  c = r["config"]
  lines = [f"| JAX / ... ({c['image_size']}x{c['image_size']}, batch {c['batch_size']}, {c['precision']}, "
           f"{c['variant']} widths) | train | sample |", "|---|---:|---:|"]
  for other, label in (("torch_eager", "torch eager"), ("torch_compile", "torch.compile")):
    if r.get(f"{other}_train_img_s") is None:
      continue
    cells = []
    for kind in ("train", "sample"):
      cells.append(f"{r[f'jax_vs_{other}_{kind}']:.2f}x ({r[f'jax_{kind}_img_s']:.1f} vs "
                   f"{r[f'{other}_{kind}_img_s']:.1f} img/s; per-repeat median {r[f'jax_vs_{other}_{kind}_paired']:.2f}x)")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + (f"\n\nMedians of {c['repeats']} interleaved repeats; JAX on {r['devices'].get('jax')}.")


def render_benchmark_rates(results: list) -> str:
  """docs/benchmarks.md: the rates, compile times and memory of each benchmark.py file."""
  lines = ["| configuration | JAX devices | JAX train img/s | torch eager | torch.compile | JAX sample img/s | "
           "torch eager | torch.compile | compile JAX / torch.compile (s, train) | peak RSS JAX / eager (MB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    c = r["config"]
    lines.append(
        f"| {c['variant']}, {c['image_size']}x{c['image_size']}, batch {c['batch_size']}, {c['precision']} "
        f"| {r.get('jax_device_count', '-')} | {_fmt(r.get('jax_train_img_s'))} | {_fmt(r.get('torch_eager_train_img_s'))} "
        f"| {_fmt(r.get('torch_compile_train_img_s'))} | {_fmt(r.get('jax_sample_img_s'))} "
        f"| {_fmt(r.get('torch_eager_sample_img_s'))} | {_fmt(r.get('torch_compile_sample_img_s'))} "
        f"| {_fmt(r.get('jax_compile_train_s'))} / {_fmt(r.get('torch_compile_compile_train_s'))} "
        f"| {_fmt(r.get('jax_peak_memory_mb'), 0)} / {_fmt(r.get('torch_eager_peak_memory_mb'), 0)} |")
  per_repeat = "; ".join(
      f"{c['image_size']}x{c['image_size']} with {r.get('jax_device_count', '-')} JAX device(s), JAX train per repeat "
      + ", ".join(f"{x:.1f}" for x in r.get("jax_train_img_s_all") or []) + ", torch eager "
      + ", ".join(f"{x:.1f}" for x in r.get("torch_eager_train_img_s_all") or [])
      for r in results for c in [r["config"]])
  flops = "; ".join(dict.fromkeys(  # once per configuration (the counts do not depend on the devices)
      f"{r['config']['variant']}, {r['config']['image_size']}x{r['config']['image_size']}: "
      f"{r['forward_flops_per_image'] / 1e9:.3f} GFLOP per forward, {r['flops_per_image'] / 1e9:.3f} per training "
      f"image, {r['sample_flops_per_image'] / 1e9:.2f} per {r['config']['sample_steps']}-step sample"
      for r in results if r.get("flops_per_image")))
  return "\n".join(lines) + f"\n\nPer repeat (img/s): {per_repeat}.\n\nFLOPs (jaxpr count): {flops}."


def render_loop(results: list) -> str:
  """docs/benchmarks.md: the training loop against the bare step, and the host time per step."""
  lines = ["| run | loop img/s | bare step img/s | loop / bare |", "|---|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['preset']} preset, {r['processes']} process(es), {r['devices']} device(s), batch "
                 f"{r['batch_size']} | {r['loop_img_s']:.1f} | {r['bare_step_img_s']:.1f} | "
                 f"{100 * r['loop_fraction_of_bare']:.1f}% |")
  text = "\n".join(lines)
  hosts = [r["host_time"] for r in results if "host_time" in r]
  if hosts:
    lines = ["", "| host time per step (stub step, default preset's state) | ms |", "|---|---:|"]
    h = hosts[0]
    for key, label in (("before_ms", "float32 lookup + upload on the host, 1 step per call"),
                       ("device_ms", "the set on the devices, 1 step per call"),
                       ("host_ms", "uint8 batches uploaded ahead by a thread, 1 step per call"),
                       ("device_k_ms", f"the set on the devices, {h['steps_per_call']} steps per call (`default`)")):
      lines.append(f"| {label} | {h[key]:.3f} |")
    text += "\n\n" + "\n".join(lines[1:])
  return text


def render_data(results: list) -> str:
  """docs/benchmarks.md and docs/data.md: benchmark_data.py's images/s."""
  (r,) = results
  lines = ["| what | images/s |", "|---|---:|"]
  for row in r["rows"]:
    lines.append(f"| {row['what']} | {row['images_per_second']:,.0f} |")
  return "\n".join(lines)


def render_cli_help(results: list) -> str:
  (r,) = results
  lines = ["| command | seconds (median) |", "|---|---:|"]
  for command, seconds in r["seconds"].items():
    lines.append(f"| `{command}` | {seconds:.2f} |")
  return "\n".join(lines)


def _minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def render_suite(results: list) -> str:
  """README and docs/testing.md: the suite's runs, per processor kind and load."""
  lines = ["| machine | beside the suite | runs | passed each | wall time each | CPU time each | failed |",
           "|---|---|---:|---|---|---|---|"]
  for r in results:
    runs = r["runs"]
    kind = r["provenance"]["device"].removeprefix("CPU: ")
    load = f"{r['hogs']} CPU hog(s)" if r["hogs"] else "nothing"
    passed = ", ".join(f"{x.get('passed', 0)}/{x.get('passed', 0) + x.get('failed', 0) + x.get('errors', 0)}"
                       for x in runs)
    lines.append(f"| {kind} | {load} | {len(runs)} | {passed} | {', '.join(_minutes(x['wall_seconds']) for x in runs)} "
                 f"| {', '.join(_minutes(x['cpu_seconds']) for x in runs)} "
                 f"| {'; '.join(f.split(' - ')[0].removeprefix('FAILED ') for x in runs for f in x['failures']) or '-'} |")
  notes = [f"{r['provenance']['device'].removeprefix('CPU: ')}, {len(r['runs'])} run(s): {r['note']}"
           for r in results if r.get("note")]
  return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes)


def render_demo(results: list) -> str:
  """README: ``ddim-jax demo``'s wall time (compilation cache empty, then warm) and its digits metric."""
  lines = ["| `ddim-jax demo` on | compilation cache | wall time | digits metric, model (lower is better) | final loss |",
           "|---|---|---:|---:|---:|"]
  for r in results:
    kind = r["provenance"]["device"].removeprefix("CPU: ")
    for name, label in (("empty_cache", "empty (first run)"), ("warm_cache", "warm (any later run)")):
      run = r["runs"][name]
      model = next(v for k, v in run["digits_metric"].items() if k.startswith("model"))
      lines.append(f"| {kind} | {label} | {_minutes(run['wall_seconds'])} | {model:.2f} | {run['final_loss']:.4f} |")
  return "\n".join(lines)


def render_digits(results: list) -> str:
  """docs/evaluation.md: the demo model's digits metric per step count, then the calibration points
  (``demo_timing.py``'s ``evaluate`` record)."""
  (r,) = results
  e = r["evaluate"]
  steps = [str(s) for s in e["steps"]]
  lines = ["| steps | " + " | ".join(steps) + " |", "|---|" + "---:|" * len(steps),
           "| Frechet distance | " + " | ".join(f"{e['frechet_distance'][s]:.2f}" for s in steps) + " |",
           "| coverage | " + " | ".join(f"{e['coverage'][s]:.1f}" for s in steps) + " |",
           "", f"| calibration, {e['num_images']} images | Frechet distance | coverage | predicted classes 0..9 |",
           "|---|---:|---:|---|"]
  for c in e["calibration"]:
    lines.append(f"| {c['name']} | {c['frechet_distance']:.2f} | {c['coverage']:.1f} | "
                 f"{' '.join(str(n) for n in c['histogram'])} |")
  sampler = e.get("sampler", "ddim") + ("" if e.get("time_grid", "uniform") == "uniform" else
                                         f" on the {e['time_grid']} time grid")
  return "\n".join(lines) + (f"\n\n{e['num_images']} samples ({sampler}) per step count against the "
                             f"{e['reference_images']} validation digits, noise seed {e['seed']}, checkpoint step "
                             f"{e['checkpoint_step']}.")


def render_flops(results: list) -> str:
  """docs/flops.md: FLOPs per image of each variant (``benchmark.py --flops-only``)."""
  (r,) = results
  n, steps = r["image_size"], r["sample_steps"]
  lines = [f"| {n}x{n} | parameters | GFLOP per forward | per training image | per {steps}-step sample |",
           "|---|---:|---:|---:|---:|"]
  for variant, c in r["variants"].items():
    lines.append(f"| `{variant}` | {c['parameters']:,} | {c['forward_flops_per_image'] / 1e9:.3f} | "
                 f"{c['flops_per_image'] / 1e9:.3f} | {c['sample_flops_per_image'] / 1e9:.2f} |")
  return "\n".join(lines)


def render_samplers(results: list) -> str:
  """docs/sampling.md and README: the digits metric (mean +- sd over seeds) and ms per image of each
  sampler per step count (``sampler_table.py``)."""
  (r,) = results
  steps = sorted({row["steps"] for row in r["rows"]})
  lines = ["| sampler | time grid | " + " | ".join(f"{s} steps" for s in steps) + " |",
           "|---|---|" + "---:|" * len(steps)]
  for name, grid in dict.fromkeys((row["sampler"], row["time_grid"]) for row in r["rows"]):
    cells = []
    for s in steps:
      row = next(x for x in r["rows"] if (x["sampler"], x["time_grid"], x["steps"]) == (name, grid, s))
      cells.append(f"{row['frechet_mean']:.2f} ± {row['frechet_sd']:.2f} ({row['ms_per_image']:.2f} ms)")
    lines.append(f"| `{name}` | {grid} | " + " | ".join(cells) + " |")
  base_row = next(x for x in r["rows"] if (x["sampler"], x["time_grid"], x["steps"]) == ("ddim", "uniform", steps[-1]))
  lines += ["", f"| minus DDIM at {steps[-1]} steps, same noises | " + " | ".join(f"{s} steps" for s in steps) + " |",
            "|---|" + "---:|" * len(steps)]
  for name, grid in dict.fromkeys((row["sampler"], row["time_grid"]) for row in r["rows"]):
    cells = []
    for s in steps:
      row = next(x for x in r["rows"] if (x["sampler"], x["time_grid"], x["steps"]) == (name, grid, s))
      diffs = [a - b for a, b in zip(row["frechet_distance"], base_row["frechet_distance"])]
      cells.append(f"{sum(diffs) / len(diffs):+.2f} ({min(diffs):+.2f} .. {max(diffs):+.2f})")
    lines.append(f"| `{name}`, {grid} | " + " | ".join(cells) + " |")
  real = r["calibration"].get("real digits")
  return "\n".join(lines) + (
      f"\n\nDigits metric (Frechet distance, lower is better) of {r['num_images']} samples, mean ± sd over noise "
      f"seeds {', '.join(map(str, r['seeds']))}; in brackets the sampling time per image (median over the seeds, "
      f"batches of {r['batch_size']} on {r['devices']} JAX CPU device{'s' * (r['devices'] > 1)}, compilation "
      f"excluded). Real digits score {real:.2f} on this scale. Model: checkpoint step {r['checkpoint_step']} of "
      f"the demo. The second table pairs each seed with DDIM's at {steps[-1]} steps from the same noises: the "
      f"mean difference (and the range over the seeds); negative is better than DDIM at {steps[-1]} steps.")


RENDERERS = {"parity": render_parity, "parity-detail": render_parity_detail, "benchmark": render_benchmark, "benchmark-rates": render_benchmark_rates,
             "loop": render_loop, "data": render_data, "cli-help": render_cli_help, "suite": render_suite, "demo": render_demo,
             "flops": render_flops, "digits": render_digits, "samplers": render_samplers}


def render_block(renderer: str, paths: list, repo: str = REPO) -> str:
  if renderer not in RENDERERS:
    raise ResultsError(f"unknown renderer {renderer!r} (one of {', '.join(RENDERERS)})")
  results = [load(p, repo) for p in paths]
  try:
    body = RENDERERS[renderer](results)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ResultsError(f"{', '.join(paths)}: renderer {renderer!r} needs {e!r}") from e
  return body + "\n\n" + "\n".join(source_line(p, r) for p, r in zip(paths, results)) + "\n"


def update(text: str, repo: str = REPO) -> str:
  """``text`` with every generated block rendered again."""
  def replace(match):
    body = render_block(match["renderer"], match["files"].split(), repo)
    return match.group(1) + body + match.group(5)
  return BLOCK.sub(replace, text)


def blocks(text: str) -> list:
  """(renderer, [files], start offset, end offset) of each generated block."""
  return [(m["renderer"], m["files"].split(), m.start(), m.end()) for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each stale document")
  args = p.parse_args(argv)
  stale = []
  for doc in documents():
    path = os.path.join(REPO, doc)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      new = update(text)
    except ResultsError as e:
      print(f"{doc}: {e}", file=sys.stderr)
      return 2
    if new != text:
      stale.append(doc)
      if not args.check:
        sys.path.insert(0, REPO)
        from ddim_jax import files  # pylint: disable=import-outside-toplevel
        files.replace_text(path, new, doc)
  if stale:
    print(("stale (run python scripts/docs_tables.py): " if args.check else "updated: ") + ", ".join(stale),
          file=sys.stderr)
  return 1 if stale and args.check else 0


if __name__ == "__main__":
  sys.exit(main())
