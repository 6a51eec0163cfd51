"""``python -m ddim_jax``: the ``ddim-jax`` command (the same ``cli.entry``), for environments without the
console script on the PATH."""

from ddim_jax import cli

if __name__ == "__main__":
  cli.entry()
