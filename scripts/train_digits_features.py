"""Trains the feature network of the digits metric (``ddim_jax.quality.digits_metric``) and writes its weights.

  python scripts/train_digits_features.py --out ddim_jax/assets/digits_features.safetensors

reproduces the shipped weights: the recipe's defaults (seed, epochs, batch, learning rate) are
those of ``digits_features.train_feature_params``, on the demo preset's training split of the
bundled digits. Prints the train and validation accuracy; deterministic on a given machine
(float32 on the CPU; another CPU may round differently in the last bits).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ddim_jax.quality import digits_features, digits_metric  # noqa: E402  (after the platform choice)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=digits_metric.DEFAULT_WEIGHTS, help="the .safetensors file to write")
  parser.add_argument("--seed", type=int, default=digits_features.TRAIN_SEED)
  parser.add_argument("--epochs", type=int, default=digits_features.TRAIN_EPOCHS)
  parser.add_argument("--batch-size", type=int, default=digits_features.TRAIN_BATCH_SIZE)
  parser.add_argument("--learning-rate", type=float, default=digits_features.TRAIN_LEARNING_RATE)
  args = parser.parse_args(argv)
  start = time.time()
  params, record = digits_features.train_feature_params(args.seed, args.epochs, args.batch_size, args.learning_rate)
  digits_features.save_feature_params(args.out, params, record)
  print(f"trained in {time.time() - start:.1f}s on {record['train_images']} training digits: "
        f"train accuracy {record['train_accuracy']:.4f}, validation accuracy {record['validation_accuracy']:.4f} "
        f"({record['validation_images']} images)")
  print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
