"""JAX's persistent compilation cache, on by default for the commands, so that a restart or a second
command loads its compiled programs instead of compiling them again.

JAX's own settings come first: with ``$JAX_COMPILATION_CACHE_DIR`` set (or
``jax_compilation_cache_dir`` set in ``jax.config`` before a command runs), the commands change no
cache setting at all. Otherwise ``$DDIM_JAX_COMPILATION_CACHE`` names the cache folder (default
``$XDG_CACHE_HOME/ddim_jax/xla``, i.e. ``~/.cache/ddim_jax/xla``), or ``off``; programs that compile
in under ``MIN_COMPILE_SECONDS`` are not stored unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
says otherwise. JAX's other settings (``JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES``,
``JAX_ENABLE_COMPILATION_CACHE``, ...) are never touched. A cached program is the same executable,
so the numbers are the same; JAX keys entries by the program, the backend, its version and flags.

This module imports no JAX: before JAX is imported, ``enable`` sets JAX's environment variables
(read when JAX is imported; child processes inherit them), so that a command can refuse bad input
before JAX starts.
"""

import os
import sys

ENV = "DDIM_JAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
# Programs that compile faster than this are not worth a file (JAX's own default is 1 s).
MIN_COMPILE_SECONDS = 0.5
# JAX's options and the environment variables JAX reads them from (at import).
JAX_DIR_OPTION = "jax_compilation_cache_dir"
JAX_MIN_TIME_OPTION = "jax_persistent_cache_min_compile_time_secs"


def jax_env(option: str) -> str:
  """The environment variable of a ``jax.config`` option (JAX's convention: the name in upper case)."""
  return option.upper()


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


def jax_cache_dir() -> str | None:
  """JAX's own cache folder setting: ``$JAX_COMPILATION_CACHE_DIR``, or (JAX imported already) the
  ``jax.config`` value; None when neither is set."""
  value = os.environ.get(jax_env(JAX_DIR_OPTION), "").strip()
  jax = sys.modules.get("jax")
  if not value and jax is not None and hasattr(jax, "config"):
    value = (getattr(jax.config, JAX_DIR_OPTION, None) or "").strip()
  return value or None


def enable(setting: str | None = None) -> str | None:
  """Turns the persistent compilation cache on for this process (before anything compiles).

  JAX's own folder setting wins and is left as it is; else the folder of ``cache_dir(setting)``,
  with ``MIN_COMPILE_SECONDS`` unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set.

  Returns:
    The cache folder in use, or None when the cache is off.
  """
  own = jax_cache_dir()
  if own is not None:
    return own
  path = cache_dir(setting)
  if path is None:
    return None
  values = {JAX_DIR_OPTION: path}
  if jax_env(JAX_MIN_TIME_OPTION) not in os.environ:
    values[JAX_MIN_TIME_OPTION] = MIN_COMPILE_SECONDS
  jax = sys.modules.get("jax")
  for option, value in values.items():
    if jax is not None and hasattr(jax, "config"):  # imported already: its environment was read
      jax.config.update(option, value)
    else:
      os.environ[jax_env(option)] = str(value)
  return path
