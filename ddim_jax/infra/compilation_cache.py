"""JAX's persistent compilation cache, on by default for the commands, so that a restart or a second
command loads its compiled programs instead of compiling them again.

``$DDIM_JAX_COMPILATION_CACHE``: the cache folder (default ``$XDG_CACHE_HOME/ddim_jax/xla``, i.e.
``~/.cache/ddim_jax/xla``), or ``off``. A cached program is the same executable, so the numbers
are the same; JAX keys entries by the program, the backend, its version and flags.
"""

import os

ENV = "DDIM_JAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
# Programs that compile faster than this are not worth a file (JAX's own default is 1 s).
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
  """``$XDG_CACHE_HOME/ddim_jax/xla`` (``~/.cache/ddim_jax/xla``)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "ddim_jax", "xla")


def cache_dir(setting: str | None = None) -> str | None:
  """The folder that ``setting`` (default ``$DDIM_JAX_COMPILATION_CACHE``) names, None when off."""
  value = (os.environ.get(ENV, "") if setting is None else setting).strip()
  if value.lower() in OFF:
    return None
  return value or default_dir()


def enable(setting: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache at ``cache_dir(setting)`` (before anything compiles);
  returns the folder, or None when the setting is off."""
  path = cache_dir(setting)
  if path is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel  (the command line imports jax only to run)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
