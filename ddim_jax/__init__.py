"""ddim-jax: the Keras DDIM example (and its R torch port) in JAX/Flax.

Modules: ``schedules`` (noise schedules), ``models`` (U-Net), ``sampling`` (DDIM),
``convert`` (weights <-> PyTorch / safetensors). The PyTorch twin lives in ``ddim_torch_ref``
with the same module names.
"""

__version__ = "0.1.0"
