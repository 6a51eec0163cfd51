"""Samplers against steps on one model: the digits metric and the wall time per image (docs/sampling.md).

For each sampler (DDIM and DPM-Solver++(2M) on the uniform-t grid, DPM-Solver++(2M) on the
log-SNR grid), each step count and each seed: ``--num-images`` EMA samples of the model scored by
the digits metric (``ddim_jax.quality.digits_metric``: the Frechet distance of the samples'
features to the validation digits', lower is better, and the coverage of the ten classes), and the
sampling wall time of those images (each (sampler, steps) first runs once untimed with another seed,
so no time includes compilation; batches of ``--batch-size`` split over this process's JAX devices).
Writes one JSON file with the provenance (scripts/provenance.py); scripts/docs_tables.py renders it.

  ddim-jax demo --workdir outputs/demo
  python scripts/sampler_table.py --weights outputs/demo/weights.safetensors \\
      --out docs/results/samplers-digits-2026-12-08.json
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, provenance.REPO)
from ddim_jax import files  # noqa: E402  pylint: disable=wrong-import-position

SAMPLERS = (("ddim", "uniform"), ("dpmpp_2m", "uniform"), ("dpmpp_2m", "logsnr"))
WARM_UP_SEED = 1000  # the untimed first call of each (sampler, steps): its compilation


def measure(source, metric, sampler, steps: int, seeds, num_images: int, batch_size: int) -> dict:
  """The digits metric per seed and the median sampling seconds per image of ``sampler`` at ``steps``."""
  source.sample(num_images, steps, 0.0, WARM_UP_SEED, batch_size, sampler=sampler)
  frechet, coverage, seconds = [], [], []
  for seed in seeds:
    start = time.perf_counter()
    images = source.sample(num_images, steps, 0.0, seed, batch_size, sampler=sampler)
    seconds.append(time.perf_counter() - start)
    score = metric.score(images)
    frechet.append(float(score.frechet_distance))
    coverage.append(float(score.coverage))
  return {"sampler": sampler.name, "time_grid": sampler.time_grid, "steps": steps,
          "frechet_distance": frechet, "frechet_mean": statistics.fmean(frechet),
          "frechet_sd": statistics.stdev(frechet) if len(frechet) > 1 else 0.0,
          "coverage": coverage, "ms_per_image": 1000.0 * statistics.median(seconds) / num_images}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--weights", required=True, help="a weight file of a model of the bundled digits")
  parser.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated noise seeds")
  parser.add_argument("--num-images", type=int, default=500, help="samples per seed (the demo's metric: 500)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--out", required=True, help="the JSON results file")
  args = parser.parse_args(argv)
  from ddim_jax.core import solvers  # pylint: disable=import-outside-toplevel
  from ddim_jax.inference import pipeline, sharded  # pylint: disable=import-outside-toplevel
  from ddim_jax.quality import digits_metric  # pylint: disable=import-outside-toplevel
  steps_list = [int(s) for s in args.steps.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  files.ensure_parent(args.out, "--out")
  source = pipeline.load_model(weights=args.weights)
  if not digits_metric.is_digits(source.data_config):
    print(f"{args.weights}: not a model of the bundled digits (the digits metric needs one)", file=sys.stderr)
    return 2
  metric = digits_metric.DigitsMetric.for_data(source.data_config, source.image_size)
  rows = []
  for name, grid in SAMPLERS:
    sampler = solvers.Sampler(name, grid)
    for steps in steps_list:
      row = measure(source, metric, sampler, steps, seeds, args.num_images, args.batch_size)
      rows.append(row)
      print(f"{sampler.describe():>24} {steps:>3} steps: Frechet {row['frechet_mean']:7.2f} +- {row['frechet_sd']:5.2f}"
            f"  {row['ms_per_image']:7.3f} ms/image", flush=True)
  calibration = {name: score.frechet_distance for name, score in metric.calibration(args.num_images).items()}
  result = {"provenance": provenance.collect(), "weights": args.weights, "checkpoint_step": source.step,
            "num_images": args.num_images, "seeds": seeds, "batch_size": args.batch_size,
            "devices": sharded.devices_for(min(args.batch_size, args.num_images)), "rows": rows,
            "calibration": calibration}
  files.replace_text(args.out, json.dumps(result, indent=1) + "\n", "--out")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
