"""ml_collections config presets: ``default`` (Keras flowers 64x64), ``r_variant``, ``demo``."""

import importlib

PRESETS = ("default", "r_variant", "demo")


def get_preset(name: str):
  """Returns the ConfigDict of preset ``name``."""
  if name not in PRESETS:
    raise ValueError(f"unknown config preset {name!r}; choose one of {PRESETS} or pass a path to a config file")
  return importlib.import_module(f"ddim_jax.configs.{name}").get_config()
