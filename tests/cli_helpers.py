"""Shared pieces of the command tests (test_cli_*.py): reading PNG grids, and the KID run they share."""

import numpy as np
from PIL import Image

TILE = 16 * 4 + 2  # a 16 px image upscaled x4 (the default for 16 px grids) plus 2 px padding


def png(path) -> np.ndarray:
  """A PNG as an (H, W, 3) uint8 array."""
  return np.asarray(Image.open(path).convert("RGB"))


def tile(grid: np.ndarray, row: int, col: int, size: int = 64, pad: int = 2) -> np.ndarray:
  """The image at (row, col) of a grid of ``size`` px tiles with ``pad`` px padding."""
  top, left = pad + row * (size + pad), pad + col * (size + pad)
  return grid[top:top + size, left:left + size]


def run_model(workdir):
  """(model, EMA variables, normalizer, config) of a run's newest checkpoint, as the commands load it."""
  from ddim_jax.inference import pipeline
  model, variables, normalizer, config, _ = pipeline.restore_checkpoint(workdir)
  return model, variables, normalizer, config


def write_random_inception(path) -> None:
  """Random torchvision-flavour InceptionV3 weights as a .pth file: KID mechanics only.

  Calibrated as in test_metrics (torch's default init gives constant features, so KID 0).
  """
  import torch
  from inception_helpers import random_torch_inception
  torch.save(random_torch_inception("torchvision", seed=3).state_dict(), path)


def train_kid_run(root, inception_file) -> str:
  """A tiny 8-step run with KID on 8 validation images every 2 steps, keeping 1 checkpoint + the best."""
  from ddim_jax.training import trainer
  from train_helpers import tiny_config
  config = tiny_config(root / "cache", **{
      "train.kid_every": 2, "train.checkpoint_every": 8, "train.keep_checkpoints": 1,
      "eval.inception_weights": str(inception_file), "eval.num_kid_images": 8, "eval.kid_batch_size": 4,
      # FID with KID's own network and size (shared features: no second network at 299 px), so it is
      # logged under the name of its settings, not as the standard `val_fid`.
      "eval.fid_weights": str(inception_file), "eval.fid_image_size": 75,
      "eval.kid_steps": 2})
  trainer.train_and_evaluate(config, str(root / "run"), progress=False)
  return str(root / "run")
