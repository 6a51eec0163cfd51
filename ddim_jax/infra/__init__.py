"""Infrastructure: devices and sharding, checkpoints, workdirs, run records, FLOP counting.

Leaves: each imports ``ddim_jax.errors`` only."""
