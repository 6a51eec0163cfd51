"""Weights between Flax and PyTorch, and the safetensors weight file both packages read and write.

Name mapping (mechanical, no table): the Flax path is joined with '.', every ``name_<i>`` becomes
``name.<i>``, and the leaf names change as below.

  Flax (NHWC)                                    torch (NCHW)
  params  .../kernel  (kh, kw, in, out)    <->   .../weight  (out, in, kh, kw)
  params  .../bias                         <->   .../bias
  params  .../norm/scale                   <->   .../norm.weight
  batch_stats .../norm/mean, .../norm/var  <->   .../norm.running_mean, .../norm.running_var

The weight file (``FILE.safetensors``) holds the torch ``state_dict`` of the twin (torch names,
OIHW kernels, float32) plus the data normaliser as ``normalizer.mean`` and ``normalizer.variance``
(per-channel, shape (C,)). Its string metadata records ``format`` (= 'ddim-jax-weights'),
``format_version``, ``variant``, ``widths`` (comma-separated), ``block_depth``, ``embedding_dims``,
``channels``, ``image_size`` and, when known, ``schedule``, ``min_signal_rate``,
``max_signal_rate``, ``target``, ``weights`` ('ema' or 'raw') and ``step``. ``ddim_torch_ref.convert``
reads and writes the same file without JAX.

torch is only imported inside the ``*_torch`` helpers, never at module import.
"""

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from ddim_jax import errors, models

FORMAT = "ddim-jax-weights"
FORMAT_VERSION = "1"
NORMALIZER_KEYS = ("normalizer.mean", "normalizer.variance")
MODEL_KEYS = ("variant", "widths", "block_depth", "embedding_dims", "channels")


class WeightFileError(errors.InputError):
  """A weight file that cannot be used: the message names the tensor or field and the fix."""


def _torch_name(path) -> str:
  keys = [getattr(k, "key", str(k)) for k in path]
  name = ".".join(keys)
  return re.sub(r"_(\d+)(?=\.|$)", r".\1", name)


_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}


def flax_to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax ``{'params', 'batch_stats'}`` -> torch-named NumPy state dict (OIHW kernels).

  Args:
    variables: dict with 'params' and (optionally) 'batch_stats'.

  Returns:
    dict from torch parameter/buffer name to a float32 NumPy array in torch layout.
  """
  state = {}
  for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
    for path, value in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      *prefix, leaf = [getattr(k, "key", str(k)) for k in path]
      value = np.asarray(value, dtype=np.float32)
      if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      state[_torch_name(prefix) + "." + leaves[leaf]] = np.ascontiguousarray(value)
  return state


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], reference_variables: Mapping[str, Any]) -> dict:
  """torch-named state dict -> Flax variables shaped like ``reference_variables``.

  Args:
    state_dict: torch name -> array (NumPy or torch tensors).
    reference_variables: Flax variables of the target model (e.g. ``jax.eval_shape`` of the init),
      which fix the tree structure and the expected shapes.

  Returns:
    Flax variables {'params', 'batch_stats'} as NumPy float32 arrays.

  Raises:
    WeightFileError: a tensor is missing, has the wrong shape, or is not used by the model.
  """
  state = {k: _to_numpy(v) for k, v in state_dict.items() if k not in NORMALIZER_KEYS}
  used = set()
  out = {}
  for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
    ref = reference_variables.get(collection, {})

    def convert_leaf(path, ref_leaf, leaves=leaves):
      *prefix, leaf = [getattr(k, "key", str(k)) for k in path]
      name = _torch_name(prefix) + "." + leaves[leaf]
      expected = tuple(ref_leaf.shape)
      torch_shape = (expected[3], expected[2], expected[0], expected[1]) if leaf == "kernel" else expected
      if name not in state:
        raise WeightFileError(f"missing tensor {name!r} (expected shape {torch_shape}); the file was written for "
                              f"another model configuration or is incomplete")
      value = state[name]
      if tuple(value.shape) != torch_shape:
        raise WeightFileError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {torch_shape}; check the "
                              f"model widths / variant the file was written for")
      used.add(name)
      value = value.astype(np.float32)
      return value.transpose(2, 3, 1, 0) if leaf == "kernel" else value  # OIHW -> HWIO

    out[collection] = jax.tree_util.tree_map_with_path(convert_leaf, ref)
  unused = sorted(set(state) - used)
  if unused:
    raise WeightFileError(f"{len(unused)} tensor(s) not used by the model, e.g. {unused[:3]}; the file was written "
                          f"for another variant or widths")
  return out


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; no torch import needed
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def flax_to_torch(variables, torch_model):
  """Loads Flax ``variables`` into ``torch_model`` (a ``ddim_torch_ref.models.UNet``) in place."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {k: torch.from_numpy(v.copy()) for k, v in flax_to_torch_state_dict(variables).items()}
  torch_model.load_state_dict(state, strict=True)
  return torch_model


def model_metadata(model, image_size: int, **extra) -> dict[str, str]:
  """The safetensors metadata (all strings) describing ``model`` (a ddim_jax UNet)."""
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "variant": model.variant,
      "widths": ",".join(str(w) for w in model.widths), "block_depth": str(model.block_depth),
      "embedding_dims": str(model.embedding_dims), "channels": str(model.channels), "image_size": str(image_size),
  }
  meta.update({k: str(v) for k, v in extra.items() if v is not None})
  return meta


def model_kwargs_from_metadata(metadata: Mapping[str, str]) -> dict:
  """Keyword arguments of ``models.create_model`` recorded in a weight file's metadata."""
  missing = [k for k in MODEL_KEYS if k not in metadata]
  if missing:
    raise WeightFileError(f"weight file metadata lacks {missing}; write it with `ddim-jax export` or "
                          f"ddim_jax.convert.save_weights")
  return dict(variant=metadata["variant"], widths=tuple(int(w) for w in metadata["widths"].split(",")),
              block_depth=int(metadata["block_depth"]), embedding_dims=int(metadata["embedding_dims"]),
              channels=int(metadata["channels"]))


def save_weights(path: str, model, variables, normalizer: Mapping[str, Any], image_size: int, spec=None,
                 **extra) -> None:
  """Writes a weight file (see the module docstring) atomically.

  Args:
    path: destination ``.safetensors`` file.
    model: the ddim_jax UNet the variables belong to.
    variables: Flax {'params', 'batch_stats'}.
    normalizer: {'mean': (C,), 'variance': (C,)} data statistics.
    image_size: training image size (recorded for samplers).
    spec: the model's ``schedules.DiffusionSpec`` (recorded for samplers; ``DiffusionSpec.from_metadata``
      reads it back).
    **extra: further metadata (weights, step; or the spec's keys one by one).
  """
  if spec is not None:
    extra = {**spec.to_metadata(), **extra}
  tensors = flax_to_torch_state_dict(variables)
  tensors["normalizer.mean"] = np.asarray(normalizer["mean"], np.float32).reshape(-1)
  tensors["normalizer.variance"] = np.asarray(normalizer["variance"], np.float32).reshape(-1)
  tmp = f"{path}.tmp{os.getpid()}"
  save_file(tensors, tmp, metadata=model_metadata(model, image_size, **extra))
  os.replace(tmp, path)


def read_weight_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a weight file's tensors (torch naming) and metadata, checking its format."""
  if not os.path.exists(path):
    raise WeightFileError(f"weight file {path!r} does not exist; write one with `ddim-jax export`")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise WeightFileError(f"cannot read weight file {path!r} ({e}); it is truncated or not a safetensors file — "
                          f"re-export it with `ddim-jax export`") from e
  if metadata.get("format") != FORMAT:
    raise WeightFileError(f"{path!r} is not a ddim-jax weight file (metadata format={metadata.get('format')!r}, "
                          f"expected {FORMAT!r})")
  for key in NORMALIZER_KEYS:
    if key not in tensors:
      raise WeightFileError(f"missing tensor {key!r} (expected shape ({metadata.get('channels', 'C')},)) in {path!r}")
  return tensors, metadata


def load_weights(path: str, variant: str | None = None, image_size: int | None = None):
  """Reads a weight file into a ddim_jax model.

  Args:
    path: a ``.safetensors`` file written by either package.
    variant: if given, the variant the caller expects; a file of another variant is an error.
    image_size: overrides the image size recorded in the file.

  Returns:
    (model, variables, normalizer, metadata): the UNet, Flax {'params','batch_stats'} (NumPy),
    {'mean','variance'} (NumPy, (C,)) and the file's metadata.
  """
  tensors, metadata = read_weight_file(path)
  kwargs = model_kwargs_from_metadata(metadata)
  if variant is not None and kwargs["variant"] != variant:
    raise WeightFileError(f"{path!r} holds a {kwargs['variant']!r} U-Net, expected {variant!r}; pass the matching "
                          f"--variant or another file")
  model = models.create_model(**kwargs)
  size = int(image_size or metadata.get("image_size", 64))
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), size))
  variables = torch_state_dict_to_flax(tensors, reference)
  normalizer = {"mean": tensors["normalizer.mean"], "variance": tensors["normalizer.variance"]}
  for key, value in normalizer.items():
    if value.shape != (model.channels,):
      raise WeightFileError(f"tensor 'normalizer.{key}' has shape {value.shape}, expected ({model.channels},)")
  return model, variables, normalizer, metadata


def metadata_json(metadata: Mapping[str, str]) -> str:
  """Pretty JSON of a weight file's metadata (for CLI output)."""
  return json.dumps(dict(metadata), indent=2, sort_keys=True)
