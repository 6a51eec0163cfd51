"""ml_collections config presets (``default``, ``r_variant``, ``demo``) and command-line overrides."""

import ast
import importlib
import importlib.util
import os

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
  raise errors.ConfigError(f"unknown config preset {spec!r}; choose one of {PRESETS} or pass a path to a config file")


def _parse_value(key: str, raw: str, kind):
  """Parses the override ``raw`` as the type ``kind`` of field ``key``."""
  try:
    if kind is bool:
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError(raw)
    if kind in (tuple, list):
      value = ast.literal_eval(raw)
      return kind(value if isinstance(value, (tuple, list)) else (value,))
    if kind in (int, float):
      return kind(ast.literal_eval(raw)) if kind is float else int(raw)
    return raw if kind is str or kind is type(None) else kind(raw)
  except (ValueError, SyntaxError) as e:
    raise errors.ConfigError(f"bad config override --config.{key}={raw}: expected a {kind.__name__}") from e


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
    if leaf not in node:
      raise errors.ConfigError(f"unknown config key {key!r}; known keys under {'.'.join(parents) or 'config'}: "
                               f"{sorted(node.keys())}")
    node[leaf] = _parse_value(key, raw, node.get_type(leaf))
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
  module_spec = importlib.util.spec_from_file_location("ddim_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(), overrides)
