"""``ddim-jax convert``: which conversion two paths ask for, by their suffixes.

The weight file (``.safetensors``) is the hub: to and from a torch file of the twin (``.pt`` /
``.pth``, ``torch_files``) and to and from the Keras example's ``.weights.h5`` (``keras_files``).
"""

import os
from typing import Any

from ddim_jax import errors
from ddim_jax.interop import keras_files, torch_files

WEIGHT_SUFFIX = ".safetensors"
KINDS = {"weights": "a .safetensors weight file", "torch": "a .pt/.pth torch file",
         "keras": "a Keras .weights.h5 file"}


def file_kind(path: str, what: str) -> str:
  """'weights', 'torch' or 'keras' by the suffix of ``path``; anything else is an error naming ``what``."""
  lower = path.lower()
  if lower.endswith(keras_files.KERAS_SUFFIX):
    return "keras"
  suffix = os.path.splitext(lower)[1]
  if suffix == WEIGHT_SUFFIX:
    return "weights"
  if suffix in torch_files.TORCH_SUFFIXES:
    return "torch"
  raise errors.ConfigError(f"{what} {path!r}: expected {', '.join(KINDS.values())}")


def convert(src: str, out: str, config: str | None = None, overrides=(), network: str | None = None
            ) -> dict[str, Any]:
  """Converts ``src`` to ``out``; one of the two is a weight file.

  Args:
    src, out: the paths; their suffixes choose the conversion.
    config, overrides: a plain torch state dict, or a Keras file: the preset or config file (and
      ``--config.*`` overrides) the model was trained with.
    network: a Keras file only: "ema" (default) or "raw", which of the example's networks to take.

  Returns:
    {"metadata": the weight file's metadata, "normalizer": where the normaliser came from}.
  """
  src_kind, out_kind = file_kind(src, "the input"), file_kind(out, "--out")
  if "weights" not in (src_kind, out_kind) or src_kind == out_kind:
    raise errors.ConfigError(f"{src!r} -> {out!r}: convert goes from a weight file ({WEIGHT_SUFFIX}) to a torch "
                             f"file or a Keras .weights.h5, or back; convert to {WEIGHT_SUFFIX} first")
  if network is not None and src_kind != "keras":
    raise errors.ConfigError("--network chooses between the Keras example's two networks: only for a .weights.h5 "
                             "input")
  if src_kind == "weights":
    if config is not None or overrides:
      raise errors.ConfigError("a weight file records its model and data: drop --config and the --config.* overrides")
    if out_kind == "torch":
      return {"metadata": torch_files.weights_to_torch_file(src, out), "normalizer": f"recorded in {src}"}
    return {"metadata": keras_files.weights_to_keras_file(src, out), "normalizer": f"recorded in {src}"}
  if src_kind == "torch":
    return torch_files.torch_file_to_weights(src, out, config, overrides)
  return keras_files.keras_file_to_weights(src, out, config, overrides, network or "ema")
