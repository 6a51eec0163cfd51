"""ml_collections config presets (``default``, ``r_variant``, ``demo``) and command-line overrides."""

import ast
import importlib
import importlib.util
import math
import os

import ml_collections

from ddim_jax import errors

PRESETS = ("default", "r_variant", "demo")


def get_preset(name: str):
  """Returns the ConfigDict of preset ``name``."""
  if name not in PRESETS:
    raise errors.ConfigError(f"unknown config preset {name!r}; choose one of {PRESETS} or pass a path to a config file")
  return importlib.import_module(f"ddim_jax.configs.{name}").get_config()


def config_path(spec: str) -> str:
  """A preset name or a path to a ``get_config()`` file -> the file's path."""
  if spec in PRESETS:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{spec}.py")
  if os.path.isfile(spec):
    return spec
  if os.path.isdir(spec):
    raise errors.ConfigError(f"config {spec!r} is a folder; pass a preset {PRESETS} or a python file with get_config()")
  if os.path.exists(spec):  # a FIFO, a device: never read (a FIFO would block the command)
    raise errors.InputError(f"config file {spec!r} is not a regular file; pass a preset {PRESETS} or a python file "
                            f"with get_config()")
  if os.sep in spec or spec.endswith(".py"):
    raise errors.MissingInputError(f"config file {spec!r} does not exist; pass a preset {PRESETS} or the path of a "
                                   f"python file with get_config()")
  raise errors.ConfigError(f"unknown config preset {spec!r}; choose one of {PRESETS} or pass a path to a config file")


# Override values: integers within int64 (what the arrays and checkpoints hold), finite floats.
_INT_LIMIT = 2 ** 63
_SCALARS = (bool, int, float, str)


def _check_number(value, kind):
  if kind is int and not -_INT_LIMIT < value < _INT_LIMIT:
    raise ValueError(f"{value} is out of range")
  if kind is float and not math.isfinite(value):
    raise ValueError(f"{value} is not finite")
  return value


def _parse_value(key: str, raw: str, kind, current=None):
  """Parses the override ``raw`` as the type ``kind`` of field ``key`` (``current``: its present value)."""
  try:
    if kind is bool:
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError(raw)
    if kind in (tuple, list):
      value = ast.literal_eval(raw)
      value = kind(value if isinstance(value, (tuple, list)) else (value,))
      # The elements: scalars, of the type of the present ones (a tuple of widths stays integers).
      types = {type(v) for v in current or ()}
      want = types.pop() if len(types) == 1 and not types & {bool} else None
      for v in value:
        if (not isinstance(v, _SCALARS) or (want is not None and not isinstance(v, want)
                                            and not (want is float and type(v) is int))
            or (want in (int, float) and isinstance(v, bool))):
          raise ValueError(f"element {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          _check_number(v, int if isinstance(v, int) else float)
      return value
    if kind is float:
      value = ast.literal_eval(raw)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(raw)
      return _check_number(float(value), float)
    if kind is int:
      return _check_number(int(raw), int)
    return raw if kind is str or kind is type(None) else kind(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    what = {tuple: "tuple", list: "list"}.get(kind)
    if what and current:
      what += f" like {tuple(current)!r}"
    what = f"finite {kind.__name__}" if kind is float else what or kind.__name__
    article = "an" if what[0] in "aeiou" else "a"
    raise errors.ConfigError(f"bad config override --config.{key}={raw}: expected {article} {what}") from e


def apply_overrides(config, overrides=()):
  """Applies ``--config.a.b=value`` strings to ``config`` in place, typed by the existing field."""
  for override in overrides:
    if not override.startswith("--config.") or "=" not in override:
      raise errors.ConfigError(f"unexpected argument {override!r}; overrides look like --config.train.num_steps=100")
    key, raw = override[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
      if name not in node:
        raise errors.ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} in --config.{key}")
      node = node[name]
    if not hasattr(node, "get_type"):
      raise errors.ConfigError(f"bad config override --config.{key}: {'.'.join(parents)!r} is a value, not a group "
                               f"of keys")
    if leaf not in node:
      raise errors.ConfigError(f"unknown config key {key!r}; known keys under {'.'.join(parents) or 'config'}: "
                               f"{sorted(node.keys())}")
    if hasattr(node[leaf], "get_type"):
      raise errors.ConfigError(f"bad config override --config.{key}={raw}: {key!r} is a group of keys; set one of "
                               f"them, e.g. --config.{key}.{sorted(node[leaf].keys())[0]}=...")
    node[leaf] = _parse_value(key, raw, node.get_type(leaf), node[leaf])
  return config


def load_config(spec: str, overrides=()):
  """Loads a preset or a config file (``get_config()``) and applies ``--config.a.b=value`` overrides.

  Args:
    spec: a preset name or a path to a python file with ``get_config()``.
    overrides: strings like ``--config.train.num_steps=100``; an unknown key is an error naming it.

  Returns:
    The ConfigDict.
  """
  path = config_path(spec)
  if spec in PRESETS:  # the package's own files: an error there is a bug (traceback)
    return apply_overrides(get_preset(spec), overrides)
  try:
    module_spec = importlib.util.spec_from_file_location("ddim_jax_user_config", path)
    if module_spec is None:
      raise ImportError("not a python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise AttributeError("it defines no get_config()")
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # the user's file: its error is bad input
    raise errors.ConfigError(f"config file {path!r} failed: {type(e).__name__}: {_first_line(e)}; fix the file "
                             f"(it must define get_config() returning an ml_collections.ConfigDict)") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f"config file {path!r}: get_config() returned a {type(config).__name__}, not an "
                             f"ml_collections.ConfigDict")
  check_top_level_keys(config, path)
  return apply_overrides(config, overrides)


# Top-level keys of the presets that the code reads with a default: a config file may leave them out.
OPTIONAL_KEYS = ("cpu_devices",)


def check_top_level_keys(config, path: str) -> None:
  """Raises ``errors.ConfigError`` unless a config file's ``config`` has the presets' top-level keys.

  The commands read ``config.train``, ``config.model``, ... directly: a file whose config lacks one
  failed later with an AttributeError deep in a command. The ``default`` preset is the reference
  (every preset starts from it); ``OPTIONAL_KEYS`` may be missing.
  """
  reference = get_preset("default")
  missing = [key for key in reference.keys() if key not in config and key not in OPTIONAL_KEYS]
  if missing:
    raise errors.ConfigError(
        f"config file {path!r}: get_config() returned a config without {', '.join(map(repr, missing))} (the presets "
        f"have {', '.join(reference.keys())}); start from a preset in get_config(), e.g. `from ddim_jax.configs import "
        f"default; config = default.get_config()`, then change what differs")
  for key, value in reference.items():
    if isinstance(value, ml_collections.ConfigDict) and not isinstance(config[key], ml_collections.ConfigDict):
      raise errors.ConfigError(
          f"config file {path!r}: config.{key} is a {type(config[key]).__name__}, not a group of keys (an "
          f"ml_collections.ConfigDict like the presets' config.{key}); fix the file")


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else ""
