"""DDIM inversion of real images, and its reconstruction error (``ddim-jax invert``).

Reconstruction error (DDIM paper section 5.4, Table 2): images -> ``sampling.invert`` -> noise ->
``sampling.generate`` with the same step count -> images; the per-dimension mean squared error
of pixels in [0, 1]. The command calls one function (``invert_model``), which returns a record
that the command prints (and writes as JSON).
"""

import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ddim_jax import data
from ddim_jax.core import sampling, schedules
from ddim_jax.inference import figures, pipeline, sharded


def reconstruction_errors(model, variables, normalizer: Mapping[str, Any], images, steps_list: Sequence[int], *,
                          batch_size: int = 64,
                          spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC) -> dict[int, float]:
  """Mean squared error in [0, 1] pixels of image -> DDIM inversion -> DDIM sampling, per step count.

  Args:
    model, variables, normalizer: the UNet, its variables and the data normaliser.
    images: (N, H, W, C) uint8 or [0, 1] float.
    steps_list: step counts S (inversion and sampling both use S network evaluations).
    batch_size: images per jitted call.
    spec: the model's diffusion (schedule, signal-rate bounds, target).

  Returns:
    {steps: MSE}.
  """
  images = data.unit_float(images)
  results = {}
  for steps in steps_list:
    squared_error = 0.0
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      # Over the most of this process's devices that divide the batch.
      noises = sharded.invert(model, variables, batch, normalizer, steps=int(steps), spec=spec)
      recon = sharded.generate(model, variables, noises, normalizer, steps=int(steps), spec=spec)
      squared_error += float(np.sum(np.square(recon.astype(np.float64) - batch)))
    results[int(steps)] = squared_error / images.size
  return results


@dataclasses.dataclass
class InversionEvaluation:
  """DDIM inversion reconstruction errors of a model (``invert_model``).

  Attributes:
    description: the model, for messages.
    mse: {steps: mean squared error of pixels in [0, 1]} (``reconstruction_errors``).
    steps: the step counts, as asked.
    num_images: the real images inverted.
    split: their split.
    devices: the devices each batch is split over.
    image_size: the model's image side.
    seconds: of the measurement (after loading the model and the images; without the figure).
    rows: the rows of ``figures.inversion_rows`` for the first images (None when not asked for).
  """
  description: str
  mse: dict[int, float]
  steps: list[int]
  num_images: int
  split: str
  devices: int
  image_size: int
  seconds: float
  rows: list | None = None

  def record(self) -> dict:
    """The JSON record of ``invert --json``."""
    return {"reconstruction_mse": {str(k): v for k, v in self.mse.items()}, "steps": self.steps,
            "num_images": self.num_images, "split": self.split, "seconds": self.seconds}


def invert_model(workdir: str | None = None, weights: str | None = None, config: str | None = None,
                 cpu_devices: str | int | None = None, step: str | int | None = None,
                 overrides: Sequence[str] = (), *, steps_list: Sequence[int], num_images: int = 64, split: str = "validation", batch_size: int = 64,
                 figure_images: int = 0) -> InversionEvaluation:
  """``ddim-jax invert``: the model of a workdir or weight file (``pipeline.load_model``), inverted.

  Args:
    workdir, weights, config, cpu_devices, step, overrides: the model and its data (``pipeline.load_model``).
    steps_list: step counts (inversion and sampling both use S network evaluations).
    num_images: the first real images of ``split`` to invert.
    split: "train" or "validation".
    batch_size: images per call.
    figure_images: the first images shown by the figure's rows (0: no figure).
  """
  source = pipeline.load_model(workdir, weights, config, cpu_devices, step, overrides)
  images = source.real_images(split, num_images)
  start = time.time()
  mse = reconstruction_errors(source.model, source.variables, source.normalizer, images, steps_list,
                              batch_size=batch_size, spec=source.spec)
  result = InversionEvaluation(source.description, mse, list(steps_list), int(len(images)), split,
                               sharded.devices_for(min(batch_size, len(images))), source.image_size,
                               time.time() - start)
  if figure_images:
    result.rows = figures.inversion_rows(source.model, source.variables, source.normalizer,
                                         data.unit_float(images[:figure_images]), steps_list, source.spec)
  return result
