"""ddim_torch_ref: the PyTorch twin of ddim_jax (same module names, torch and NumPy only)."""
