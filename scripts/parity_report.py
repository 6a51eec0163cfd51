#!/usr/bin/env python
"""JAX vs PyTorch parity report: forward passes and DDIM trajectories of the two twins.

  python scripts/parity_report.py [--variant keras|r] [--precision default|highest] [--json]

Forward: the real configuration (widths 32/64/96/128) with every tensor perturbed, BN in eval and
in train mode, 8 images at noise levels spread over t in [0, 1]. Trajectories: a model briefly
trained in the torch twin on the bundled digits (16x16; it and the forward model's initial values
are kept in a cache, see --fixture-cache), 50 deterministic steps (eta = 0) and 50 steps with eta = 1 on the same injected
NumPy noise; max over every noisy and predicted image. JAX runs on its default device at the chosen
precision; the torch twin runs on the CPU in float32 (TF32 off) and is the reference. Training
steps (--train-steps, 10): AdamW + EMA steps of both twins from the same perturbed weights and NumPy
draws at 16x16, widths 8/16; the tensor-relative difference of the weights and of the EMA after
the last step. Prints the device, the precision and the seconds of every phase (imports, compiles,
runs, fixture training); with --json, one JSON object with its provenance, the results file that
README's parity table is generated from (scripts/docs_tables.py):

  python scripts/parity_report.py --json > docs/results/parity-keras-DATE.json
"""

import argparse
import json
import os
import sys
import time

_START = time.perf_counter()
_PHASES = {}


def _mark(name: str, since: float) -> float:
  now = time.perf_counter()
  _PHASES[name] = now - since
  return now


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position

from ddim_jax.core import models
from ddim_jax.interop import parity, parity_fixtures  # noqa: E402  pylint: disable=wrong-import-position

_T = _mark("import jax + ddim_jax", _START)
import torch  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

import ddim_torch_ref.sampling  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

_mark("import torch + ddim_torch_ref", _T)

ROWS = [  # (label, key of the absolute difference, key of the relative one, float32 bound)
    ("forward, BN eval", "forward_max_abs", "forward_max_rel", 1e-5),
    ("forward, BN train", "forward_bn_train_max_abs", "forward_bn_train_max_rel", 1e-5),
    ("BN running statistics", "bn_running_stats_max_abs", None, 1e-5),
    ("trajectory eta=0, every state", "trajectory_max_abs", "trajectory_max_rel", 1e-4),
    ("trajectory eta=1, every state", "trajectory_eta1_max_abs", "trajectory_eta1_max_rel", 1e-4),
    ("training steps, params (tensor-rel)", "train_params_rel", None, 1e-4),
    ("training steps, EMA (tensor-rel)", "train_ema_rel", None, 1e-4),
]
TRAIN_SIZE, TRAIN_WIDTHS = 16, (8, 16)  # where no parameter's first gradient is within eps of 0 (docs/parity.md)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--variant", choices=models.VARIANTS, default="keras")
  parser.add_argument("--image-size", type=int, default=64, help="image size of the forward comparison")
  parser.add_argument("--widths", type=lambda text: tuple(int(w) for w in text.split(",")), default=None,
                      help="U-Net widths of the forward comparison, e.g. 8,16 (default: the variant's real ones)")
  parser.add_argument("--trajectory-steps", type=int, default=50)
  parser.add_argument("--fixture-steps", type=int, default=300, help="training steps of the trajectory model")
  parser.add_argument("--precision", choices=parity.PRECISIONS, default="highest",
                      help="JAX's float32 matmul/convolution precision: 'highest' (full float32 on every device, "
                           "the default) or 'default' (XLA's: TF32 on Ampere+ GPUs, bf16 passes on TPUs; on CPU "
                           "the same numbers as highest)")
  parser.add_argument("--fixture-cache", default=None, metavar="DIR",
                      help=f"folder of the cached fixtures: the trained trajectory model and the forward model's "
                           f"initial values, safetensors files keyed by what they depend on (default "
                           f"${parity_fixtures.FIXTURE_CACHE_ENV} or ~/.cache/ddim_jax/parity; '' computes both every time)")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch's CPU threads (default: half the CPUs available, 1 to 4)")
  parser.add_argument("--train-steps", type=int, default=10,
                      help=f"AdamW + EMA steps of the training-step comparison at {TRAIN_SIZE}x{TRAIN_SIZE}, widths "
                           f"{'/'.join(map(str, TRAIN_WIDTHS))} (0: skip it)")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object, with its provenance (date, commit, device, versions, command): "
                           "a results file for docs/results/")
  args = parser.parse_args(argv)

  phases = parity.Phases()
  phases.seconds.update(_PHASES)
  threads = parity.pin_torch_threads(args.torch_threads)
  with phases("JAX backend start"):
    device = parity.device_description()
  if not args.json:
    print(f"parity report: variant={args.variant}; JAX on {device['backend']} ({device['device_kind']}, "
          f"jax {device['jax']}), precision={args.precision}; torch {device['torch']} on the CPU, float32, "
          f"{threads} threads", flush=True)
  cache = parity_fixtures.default_fixture_cache() if args.fixture_cache is None else args.fixture_cache
  with parity.precision(args.precision):
    model = models.create_model(args.variant, **({"widths": args.widths} if args.widths else {}))
    variables = parity_fixtures.perturbed_variables(model, args.image_size, timer=phases, cache_dir=cache)
    forward = parity.forward_parity(model, variables, args.image_size, timer=phases)
    trained_model, trained_variables, _, fixture = parity_fixtures.cached_trained_reference(
        args.variant, cache_dir=cache, timer=phases, num_steps=args.fixture_steps)
    trajectories = parity.trajectory_parities(trained_model, trained_variables, 16, args.trajectory_steps,
                                              etas=(0.0, 1.0), timer=phases)
    train = None
    if args.train_steps:
      with phases("training steps, both twins"):
        small = models.create_model(args.variant, widths=TRAIN_WIDTHS)
        # The r variant's few parameters with a first gradient within a few eps of 0 are left out
        # of params_rel and counted (Adam in float32, not the port: docs/parity.md).
        train = parity.train_step_parity(small, parity_fixtures.perturbed_variables(small, TRAIN_SIZE, seed=5),
                                         TRAIN_SIZE, num_steps=args.train_steps, batch=8, min_first_grad=1e-7)
  eta0, eta1 = trajectories[0.0], trajectories[1.0]
  report = {
      "variant": args.variant,
      "precision": args.precision,
      "device": device,
      "image_size": args.image_size,
      "forward_max_abs": forward["forward_max_abs"],
      "forward_max_rel": forward["forward_max_rel"],
      "forward_bn_train_max_abs": forward["forward_bn_train_max_abs"],
      "forward_bn_train_max_rel": forward["forward_bn_train_max_rel"],
      "bn_running_stats_max_abs": forward["bn_stats_max_abs"],
      "forward_output_max_abs": forward["output_max_abs"],
      "trajectory_steps": args.trajectory_steps,
      "trajectory_max_abs": eta0["max_abs"],
      "trajectory_max_rel": eta0["max_rel"],
      "trajectory_final_max_abs": eta0["final_max_abs"],
      "trajectory_eta1_max_abs": eta1["max_abs"],
      "trajectory_eta1_max_rel": eta1["max_rel"],
      "trajectory_state_max_abs": eta0["state_max_abs"],
      "fixture": {"source": fixture["source"], "path": fixture["path"], "steps": args.fixture_steps},
      **({} if train is None else {
          "train_steps": args.train_steps, "train_image_size": TRAIN_SIZE, "train_widths": list(TRAIN_WIDTHS),
          "train_loss_abs_1": train["loss_abs_1"], "train_loss_max_abs": train["loss_max_abs"],
          "train_params_rel": train[f"params_rel_{args.train_steps}"],
          "train_batch_stats_rel": train[f"batch_stats_rel_{args.train_steps}"],
          "train_ema_rel": train[f"ema_rel_{args.train_steps}"], "train_ill_conditioned": train["ill_conditioned"],
          "train_num_parameters": train["num_parameters"]}),
      "phases": {name: round(seconds, 2) for name, seconds in phases.seconds.items()},
      "seconds": round(time.perf_counter() - _START, 1),
  }
  if args.json:
    report["provenance"] = provenance.collect(
        device=None if device["backend"] == "cpu" else f"{device['backend']}: {device['device_kind']}")
    print(json.dumps(report, indent=1))
    return 0
  print(f"forward at {args.image_size}x{args.image_size} (widths {'/'.join(map(str, model.widths))}, every tensor "
        f"perturbed, batch 8); trajectories at 16x16 ({args.trajectory_steps} steps, batch 4) of the trained "
        f"fixture ({args.fixture_steps} torch steps on the digits; {fixture['source']}"
        f"{': ' + fixture['path'] if fixture['path'] else ''})")
  print(f"{'comparison':32s} {'max |diff|':>11s} {'relative':>10s} {'bound':>8s}")
  for name, abs_key, rel_key, bound in ROWS:
    if abs_key not in report:
      continue
    rel = f"{report[rel_key]:.2e}" if rel_key else "-"
    ok = "ok" if report[abs_key] <= bound else "FAIL"
    print(f"{name:32s} {report[abs_key]:11.2e} {rel:>10s} {bound:8.0e} {ok}")
  print(f"(scale: forward outputs up to {report['forward_output_max_abs']:.2f}, trajectory states up to "
        f"{report['trajectory_state_max_abs']:.2f}; the bounds are float32's: at precision=default on a GPU or "
        f"TPU they are not expected to hold)")
  print("seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.seconds.items())
        + f"; total {report['seconds']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
