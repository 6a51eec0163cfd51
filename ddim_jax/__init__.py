"""ddim-jax: the Keras DDIM example (and its R torch port) in JAX/Flax.

Core: ``schedules`` (noise schedules, ``DiffusionSpec``), ``models`` (U-Net), ``sampling`` (DDIM),
``train`` (the pure training step). Around it: ``trainer`` (the loop), ``inference`` and
``figures`` (what the commands compute), ``evaluation`` (KID, inversion errors), ``convert``
(weights <-> PyTorch / safetensors), ``data``, ``parallel`` and ``checkpointing`` (leaves), and
``cli`` (the ``ddim-jax`` command). The PyTorch twin lives in ``ddim_torch_ref`` with the same
module names.
"""

__version__ = "0.1.0"
