"""The errors ddim-jax raises on purpose (a leaf module: it imports nothing of the package).

An ``Error`` is an expected failure: bad input (a config value, a command-line argument, a file,
a dataset), a missing optional dependency, or a workdir that cannot be resumed. Its message names
the thing and the fix; the ``ddim-jax`` command prints it as one line and exits with status 2.
Anything else that escapes is a bug and keeps its traceback. ``DDIM_JAX_DEBUG=1`` (or
``--debug``) shows the traceback of an ``Error`` too.

Each class also derives from the built-in exception a caller would expect (``ValueError``,
``ImportError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

DEBUG_ENV = "DDIM_JAX_DEBUG"


class Error(Exception):
  """An expected failure whose message says what went wrong and what to do."""


class ConfigError(Error, ValueError):
  """A bad config value or command-line argument (the message names the key or option)."""


class InputError(Error, ValueError):
  """A file or dataset that is not what it should be (an image, a weight file, a noise file)."""


class MissingInputError(Error, FileNotFoundError):
  """A file, folder, dataset or checkpoint that does not exist where it was looked for."""


class MissingDependencyError(Error, ImportError):
  """An optional dependency is not installed (the message names the extra to install)."""
