"""The math: noise schedules, the U-Net, the DDIM sampler, the pure training step, PRNG purposes.

Imports ``ddim_jax.errors`` only."""
