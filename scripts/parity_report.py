#!/usr/bin/env python
"""JAX vs PyTorch parity report: forward passes and DDIM trajectories of the two twins.

  python scripts/parity_report.py [--variant keras|r] [--image-size 64] [--json]

Forward: the real configuration (widths 32/64/96/128) with every tensor perturbed, BN in eval and
in train mode, 8 images at noise levels spread over t in [0, 1]. Trajectories: a model briefly
trained in the torch twin on the bundled digits (16x16), 50 deterministic steps (eta = 0) and 50
steps with eta = 1 on the same injected NumPy noise; max over every noisy and predicted image.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddim_jax import models, parity  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", choices=models.VARIANTS, default="keras")
  parser.add_argument("--image-size", type=int, default=64, help="image size of the forward comparison")
  parser.add_argument("--trajectory-steps", type=int, default=50)
  parser.add_argument("--fixture-steps", type=int, default=300, help="training steps of the trajectory model")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)

  start = time.time()
  model = models.create_model(args.variant)
  forward = parity.forward_parity(model, parity.perturbed_variables(model, args.image_size), args.image_size)
  trained_model, trained_variables, _ = parity.trained_reference(args.variant, num_steps=args.fixture_steps)
  eta0 = parity.trajectory_parity(trained_model, trained_variables, 16, args.trajectory_steps, eta=0.0)
  eta1 = parity.trajectory_parity(trained_model, trained_variables, 16, args.trajectory_steps, eta=1.0)
  report = {
      "variant": args.variant,
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
      "seconds": round(time.time() - start, 1),
  }
  if args.json:
    print(json.dumps(report))
    return 0
  print(f"parity report: variant={args.variant}, forward at {args.image_size}x{args.image_size}, "
        f"trajectories at 16x16 ({args.trajectory_steps} steps)")
  rows = [
      ("forward, BN eval", "forward_max_abs", "forward_max_rel", 1e-5),
      ("forward, BN train", "forward_bn_train_max_abs", "forward_bn_train_max_rel", 1e-5),
      ("BN running statistics", "bn_running_stats_max_abs", None, 1e-5),
      ("trajectory eta=0, every state", "trajectory_max_abs", "trajectory_max_rel", 1e-4),
      ("trajectory eta=1, every state", "trajectory_eta1_max_abs", "trajectory_eta1_max_rel", 1e-4),
  ]
  print(f"{'comparison':32s} {'max |diff|':>11s} {'relative':>10s} {'bound':>8s}")
  for name, abs_key, rel_key, bound in rows:
    rel = f"{report[rel_key]:.2e}" if rel_key else "-"
    ok = "ok" if report[abs_key] <= bound else "FAIL"
    print(f"{name:32s} {report[abs_key]:11.2e} {rel:>10s} {bound:8.0e} {ok}")
  print(f"(scale: forward outputs up to {report['forward_output_max_abs']:.2f}, trajectory states up to "
        f"{report['trajectory_state_max_abs']:.2f}; {report['seconds']} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
