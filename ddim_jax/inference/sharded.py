"""Sharded inference: host NumPy rows in, split over devices, sampled or inverted, host NumPy rows out.

The one owner of the pattern ``parallel.rows_mesh -> parallel.shard_rows -> sampling.* -> parallel.gather_rows``
that ``sample``, ``invert``, ``interpolate``, ``evaluate``, the figures and the training run's sample grid
share. A batch of n rows is split over the most of this process's devices that divide n (no padding, so
draws made inside the jitted sampler have the shapes they have on one device), or over a caller's mesh
(the training mesh) when its size divides n. Splitting changes no row: the images are those of one device
up to float32 round-off (tests/test_parallel.py).
"""

from typing import Any, Callable, Mapping

import numpy as np
from jax.sharding import Mesh

from ddim_jax.core import sampling, schedules, solvers
from ddim_jax.infra import parallel


def mesh_for(num_rows: int, mesh: Mesh | None = None) -> Mesh:
  """The mesh a batch of ``num_rows`` rows is split over: ``mesh`` when its size divides them, else the
  most of this process's devices that do (``parallel.rows_mesh``)."""
  return mesh if mesh is not None and num_rows % mesh.size == 0 else parallel.rows_mesh(num_rows)


def devices_for(num_rows: int, mesh: Mesh | None = None) -> int:
  """How many devices a batch of ``num_rows`` rows is split over (for progress bars and messages)."""
  return mesh_for(num_rows, mesh).size


def replicate(tree, mesh: Mesh):
  """Puts host ``tree`` (variables, normaliser) on every device of ``mesh`` once, for many calls on it.

  Needed where ``mesh`` spans several processes (the training mesh); elsewhere it saves a transfer per call.
  """
  return parallel.replicate(tree, mesh)


def map_rows(fn: Callable[[Any], Any], x, mesh: Mesh | None = None) -> np.ndarray:
  """``fn(x)`` with the rows of host ``x`` split over ``mesh_for(len(x), mesh)``, as a host array.

  For per-row functions such as the Inception features of KID.
  """
  return parallel.gather_rows(fn(parallel.shard_rows(x, mesh_for(len(x), mesh))))


def generate(model, variables, noise, normalizer: Mapping[str, Any], *, steps: int,
             spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC, eta: float = 0.0, step_noises=None, key=None,
             mesh: Mesh | None = None, sampler: solvers.Sampler = solvers.DDIM) -> np.ndarray:
  """``sampling.generate``'s images in [0, 1] of the initial ``noise`` (B, H, W, C), its rows split over devices.

  ``step_noises`` (S, B, H, W, C) or ``key`` give the eta > 0 draws (see ``sampling.reverse_diffusion``);
  ``mesh``: a caller's mesh, used when its size divides B (``mesh_for``); ``sampler``: DDIM (default)
  or DPM-Solver++(2M), on its time grid.
  """
  mesh = mesh_for(len(noise), mesh)
  if step_noises is not None:
    step_noises = parallel.shard_rows(step_noises, mesh, axis=1)
  out = sampling.generate(model, variables, parallel.shard_rows(noise, mesh), normalizer, step_noises=step_noises,
                          key=key, steps=steps, spec=spec, eta=eta, sampler=sampler)
  return parallel.gather_rows(out["images"])


def invert(model, variables, images, normalizer: Mapping[str, Any], *, steps: int,
           spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC, mesh: Mesh | None = None) -> np.ndarray:
  """``sampling.invert``'s initial noises (B, H, W, C) of ``images`` in [0, 1], their rows split over devices.

  Feeding them to ``generate`` with the same ``steps`` reconstructs the images (DDIM inversion).
  """
  mesh = mesh_for(len(images), mesh)
  out = sampling.invert(model, variables, parallel.shard_rows(images, mesh), normalizer, steps=steps, spec=spec)
  return parallel.gather_rows(out["noises"])
