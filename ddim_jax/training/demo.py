"""The offline demo (``ddim-jax demo``): train the demo preset, then write its weights and samples.

``run_demo`` trains a config (the ``demo`` preset on the bundled digits, with the user's overrides)
in a workdir, restores the newest checkpoint's EMA weights, writes them as ``demo.safetensors``
and a grid of samples as ``samples.png``, and, for the bundled digits, scores EMA samples with the
digits metric (``quality.digits_metric``) beside its calibration points. The command prints what
it returns.
"""

from __future__ import annotations

import dataclasses
import time

from ddim_jax.core import schedules, solvers
from ddim_jax.inference import grids, pipeline
from ddim_jax.infra.run_dir import RunDir
from ddim_jax.interop import weight_files
from ddim_jax.quality import digits_metric
from ddim_jax.training import trainer


@dataclasses.dataclass
class DemoResult:
  """What ``run_demo`` wrote and measured.

  Attributes:
    grid: the sample grid (``<workdir>/samples.png``).
    weights: the EMA weight file (``<workdir>/demo.safetensors``).
    metrics: the run's ``metrics.jsonl``.
    step: the training step of the restored checkpoint.
    seconds: from the start of training to the end of the scoring.
    seed, steps: the restored config's seed and sampler steps (those of the samples and the scores).
    num_images: samples scored by the digits metric (``config.eval.num_quality_images``).
    num_reference: the metric's reference (validation) digits.
    scores: "model (SAMPLER, S steps)" then the calibration points -> ``DigitsScore``; None when the data
      are not the bundled digits (no metric).
  """
  grid: str
  weights: str
  metrics: str
  step: int
  seconds: float
  seed: int
  steps: int
  num_images: int = 0
  num_reference: int = 0
  scores: dict[str, digits_metric.DigitsScore] | None = None


def run_demo(config, workdir: str, config_source: str | None = None, fresh: bool = False) -> DemoResult:
  """Trains ``config`` in ``workdir``, then writes the EMA weights and a sample grid, and scores them.

  Args:
    config: the training config (the demo preset with overrides).
    workdir: the training workdir (resumed from its checkpoints, as ``train``).
    config_source: how the config was given, for the run record (``trainer.train_and_evaluate``).
    fresh: start over (the workdir's run moves to ``previous/``), as ``train --fresh``.

  Returns:
    A ``DemoResult``; its digits metric scores (for the bundled digits) are of
    ``config.eval.num_quality_images`` EMA samples with ``config.sample.steps`` steps, then the
    metric's calibration points with as many images.
  """
  start = time.time()
  trainer.train_and_evaluate(config, workdir, config_source=config_source, fresh=fresh)
  model, variables, normalizer, config, step = pipeline.restore_checkpoint(workdir)
  run_dir = RunDir(workdir)
  weights = run_dir.path(RunDir.DEMO_WEIGHTS)
  spec = schedules.DiffusionSpec.from_config(config)
  sampler = solvers.Sampler.from_config(config.sample)
  weight_files.save_weights(weights, model, variables, normalizer, int(config.model.image_size), spec,
                            data=config.data, weights="ema", step=step, **sampler.record())
  images = pipeline.sample_images(model, variables, normalizer, int(config.sample.num_images),
                                  int(config.model.image_size), int(config.sample.steps), 0.0, config.seed, 64, spec,
                                  sampler=sampler)
  out = grids.save_grid(images, run_dir.path(RunDir.DEMO_GRID),
                        upscale=grids.default_upscale(int(config.model.image_size)))
  result = DemoResult(out, weights, run_dir.metrics, step, 0.0, config.seed,
                      int(config.sample.steps))
  if digits_metric.is_digits(config.data):
    num, steps = int(config.eval.num_quality_images), int(config.sample.steps)
    metric = digits_metric.DigitsMetric.for_data(config.data, int(config.model.image_size))
    scores = {f"model ({sampler.describe()}, {steps} steps)": metric.score(pipeline.sample_images(
        model, variables, normalizer, num, int(config.model.image_size), steps, 0.0, config.seed, 64, spec,
        sampler=sampler))}
    scores.update(metric.calibration(num))
    result.num_images, result.num_reference, result.scores = num, metric.num_reference, scores
  result.seconds = time.time() - start
  return result
