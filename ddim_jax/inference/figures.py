"""The blog's figures as arrays: rows of images in [0, 1] that ``grids.save_rows`` writes.

- ``forward_figure_rows``: the forward process under the cosine and the linear schedule;
- ``reverse_figure_rows``: an image noised to t = 1, then denoised by 10 DDIM steps;
- ``trajectory_rows``: the noise-to-image strip of ``ddim-jax sample --trajectory``;
- ``inversion_rows``: originals, their DDIM latents and reconstructions (``ddim-jax invert``).
"""

import jax.numpy as jnp
import numpy as np

from ddim_jax.core import sampling, schedules, solvers
from ddim_jax.inference import grids, pipeline, sharded


def normalized(images, normalizer) -> np.ndarray:
  """Images in [0, 1] -> NumPy images in the model's normalised space (``sampling.normalize``)."""
  return np.asarray(sampling.normalize(np.asarray(images, np.float32), normalizer))


def denormalized(images, normalizer) -> np.ndarray:
  """Normalised images -> NumPy images in [0, 1] (``sampling.denormalize``, clipped)."""
  return np.asarray(sampling.denormalize(np.asarray(images, np.float32), normalizer))


def forward_figure_rows(image, seed: int, num_columns: int = 11) -> list[np.ndarray]:
  """The blog's forward-process figure: rows cosine and linear, t = 0, 0.1, ..., 1, one noise per column.

  As the blog's figure, both schedules are the unclipped ones (``diffusion_schedule(type, 0, 1)``:
  cosine angle from 0 to pi/2, linear alpha_bar unclipped), so t = 0 is the clean image and the
  columns of both rows share their noise.

  Args:
    image: (H, W, C) NORMALISED image.
    seed: seed of the NumPy noise.

  Returns:
    Two rows of (num_columns, H, W, C) noisy images in normalised space.
  """
  times = np.linspace(0.0, 1.0, num_columns)
  noises = pipeline.numpy_noise(seed, (num_columns,) + tuple(np.shape(image)))
  rows = []
  for fn in (schedules.offset_cosine_schedule, schedules.linear_schedule):
    noise_rates, signal_rates = fn(times, 0.0, 1.0, xp=np)
    rows.append(grids.forward_process(image, noises, noise_rates, signal_rates))
  return rows


def reverse_figure_rows(model, variables, normalizer, image, seed: int,
                        spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC) -> list[np.ndarray]:
  """The blog's reverse-process figure (figure 2), as two rows of denormalised images.

  The top row noises ``image`` (normalised, (H, W, C)) at t = 0, 0.1, ..., 1 with the model's
  schedule (independent NumPy noise of ``seed`` + 1 per column); the bottom row starts from the
  top row's t = 1 image and runs 10 deterministic steps, shown noise -> image: the states at
  t = 1, 0.9, ..., 0 (the last is the re-mix at t = 0, as the blog).
  """
  times = np.linspace(0.0, 1.0, 11)
  noise_rates, signal_rates = spec.rate_table(times)
  top = grids.forward_process(image, pipeline.numpy_noise(seed + 1, (11,) + np.shape(image)), noise_rates,
                                  signal_rates)
  out = sampling.generate(model, variables, top[-1:], normalizer, steps=10, spec=spec, return_trajectory=True)
  bottom = np.asarray(out["noisy_trajectory"])[:, 0]
  return [denormalized(top, normalizer), denormalized(bottom, normalizer)]


def trajectory_rows(model, variables, normalizer, initial_noise, steps: int, max_columns: int = 20, eta: float = 0.0,
                    key=None, spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC,
                    sampler: solvers.Sampler = solvers.DDIM) -> list[np.ndarray]:
  """Rows of the noise-to-image figure: per sample, the noisy images the network sees, then its predictions
  (of ``sampler``: DDIM by default, or DPM-Solver++(2M)).

  Returns:
    2 * B rows of (K, H, W, C) images in [0, 1], K = min(steps, max_columns) evenly spaced steps
    (always the first and the last): noisy images are shown through ``denormalize`` (clipped).
  """
  out = sampling.generate(model, variables, jnp.asarray(initial_noise), normalizer, key=key, steps=steps, spec=spec,
                          eta=eta, return_trajectory=True, sampler=sampler)
  columns = grids.pick_columns(steps, max_columns)

  def shown(trajectory):  # (S, B, H, W, C) -> the chosen columns, denormalised (a 4-D call: no rank promotion)
    chosen = np.asarray(trajectory)[columns]
    return denormalized(chosen.reshape((-1,) + chosen.shape[2:]), normalizer).reshape(chosen.shape)

  noisy = shown(out["noisy_trajectory"][:-1])  # the inputs of each network evaluation
  preds = shown(out["pred_trajectory"])
  rows = []
  for b in range(noisy.shape[1]):
    rows += [noisy[:, b], preds[:, b]]
  return rows


def inversion_rows(model, variables, normalizer, images, steps_list,
                   spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC) -> list[np.ndarray]:
  """Rows: ``images`` (float, [0, 1]), then per step count the reconstruction after DDIM inversion,
  with the latent noise of the last step count (shown through ``denormalize``) before its own."""
  rows = [images]
  for steps in steps_list:
    noises = sharded.invert(model, variables, images, normalizer, steps=steps, spec=spec)  # over this process's devices
    if steps == steps_list[-1]:
      rows.append(denormalized(noises, normalizer))
    rows.append(sharded.generate(model, variables, noises, normalizer, steps=steps, spec=spec))
  return rows
