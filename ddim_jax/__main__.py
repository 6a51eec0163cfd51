"""``python -m ddim_jax``: the ``ddim-jax`` command (the same ``cli.main``), for environments without the
console script on the PATH."""

import sys

from ddim_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
