"""ddim-jax: the Keras DDIM example (and its R torch port) in JAX/Flax.

The folders are the layers, bottom up (``tests/test_layout.py`` holds the imports to them):

  errors, configs  the error types; the ml_collections presets
  core/            schedules, models (the U-Net), sampling (DDIM), step (the pure training step), rng
  data/            the input: sources, the uint8 cache, splits, the batch iterator
  infra/           parallel (devices, sharding), checkpointing, workdir, run_record, flops
  quality/         metrics (KID, Frechet), inception, digits_metric
  interop/         weight_files (the format shared with the PyTorch twin), parity
  inference/       pipeline (restore, sharded sampling), evaluation, figures, grids (PNG files)
  training/        trainer (the loop), feed (its input on the devices), validation (config checks),
                   reporting (metrics files, progress, profiler, banner)
  arguments, cli   the ``ddim-jax`` command (``__main__``: ``python -m ddim_jax``)

The PyTorch twin lives in ``ddim_torch_ref`` with the same module names.
"""

__version__ = "0.1.0"
