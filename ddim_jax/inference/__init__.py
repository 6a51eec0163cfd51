"""What a trained model does: sharded sampling, inversion and restore, figures, evaluation, PNG grids.

Never imports ``ddim_jax.training``. ``grids`` is NumPy + Pillow only (the PyTorch twin uses it)."""
