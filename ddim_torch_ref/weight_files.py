"""The ddim-jax safetensors weight file, read and written from PyTorch (no JAX needed).

The file is the torch ``state_dict`` of ``ddim_torch_ref.models.UNet`` (torch names, OIHW kernels)
plus ``normalizer.mean`` and ``normalizer.variance``; its metadata describes the model. See
``ddim_jax/interop/weight_files.py`` for the full format description; both packages read and write it.
"""

import os

import numpy as np
import torch

from ddim_torch_ref import models

FORMAT = "ddim-jax-weights"
FORMAT_VERSION = "1"
NORMALIZER_KEYS = ("normalizer.mean", "normalizer.variance")
# The bounds of ddim_jax.core.models (MAX_WIDTH, MAX_LEVELS, ...) and ddim_jax.interop.weight_files, for the metadata checks.
MAX_WIDTH, MAX_LEVELS, MAX_BLOCK_DEPTH, MAX_EMBEDDING_DIMS, MAX_CHANNELS, MAX_IMAGE_SIZE = 4096, 10, 16, 4096, 4, 1024
VARIANTS = ("keras", "r")
WEIGHT_KINDS = ("ema", "raw")


def save_weights(path, model: models.UNet, normalizer, image_size: int, **extra) -> None:
  """Writes ``model``'s weights and the normaliser to ``path`` (atomically)."""
  from safetensors.torch import save  # pylint: disable=import-outside-toplevel
  from ddim_jax import files  # pylint: disable=import-outside-toplevel  (standard library only)
  tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
  tensors["normalizer.mean"] = torch.as_tensor(np.asarray(normalizer["mean"], np.float32)).reshape(-1)
  tensors["normalizer.variance"] = torch.as_tensor(np.asarray(normalizer["variance"], np.float32)).reshape(-1)
  metadata = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "variant": model.variant,
      "widths": ",".join(str(w) for w in model.widths), "block_depth": str(model.block_depth),
      "embedding_dims": str(model.embedding_dims), "channels": str(model.channels), "image_size": str(image_size),
  }
  metadata.update({k: str(v) for k, v in extra.items() if v is not None})
  files.ensure_parent(path)
  files.replace_file(path, save(tensors, metadata=metadata))


def _metadata_int(metadata, key: str, low: int, high: int, default=None) -> int:
  raw = metadata.get(key)
  if raw is None and default is not None:
    return default
  try:
    value = int(str(raw).strip())
  except ValueError:
    value = None
  if value is None or not low <= value <= high:
    raise ValueError(f"metadata {key}={raw!r} is invalid: must be an integer in {low}..{high}")
  return value


def model_kwargs_from_metadata(metadata) -> dict:
  """``models.create_model`` keyword arguments of a weight file's metadata, every key validated (as ddim_jax)."""
  missing = [k for k in ("variant", "widths", "block_depth", "embedding_dims", "channels") if k not in metadata]
  if missing:
    raise ValueError(f"metadata lacks {missing}; write the file with `ddim-jax export`")
  if metadata["variant"] not in VARIANTS:
    raise ValueError(f"metadata variant={metadata['variant']!r} is invalid: must be one of {VARIANTS}")
  try:
    widths = tuple(int(w.strip()) for w in metadata["widths"].split(","))
  except ValueError:
    widths = ()
  if not 2 <= len(widths) <= MAX_LEVELS or not all(1 <= w <= MAX_WIDTH for w in widths):
    raise ValueError(f"metadata widths={metadata['widths']!r} is invalid: must be 2 to {MAX_LEVELS} comma-separated "
                     f"integers in 1..{MAX_WIDTH}")
  kwargs = dict(variant=metadata["variant"], widths=widths,
                block_depth=_metadata_int(metadata, "block_depth", 1, MAX_BLOCK_DEPTH),
                embedding_dims=_metadata_int(metadata, "embedding_dims", 2, MAX_EMBEDDING_DIMS),
                channels=_metadata_int(metadata, "channels", 1, MAX_CHANNELS))
  if kwargs["embedding_dims"] % 2:
    raise ValueError(f"metadata embedding_dims={metadata['embedding_dims']!r} is invalid: must be even")
  image_size_from_metadata(metadata, kwargs)
  if "step" in metadata:
    _metadata_int(metadata, "step", 0, 2 ** 62)
  if metadata.get("weights", "ema") not in WEIGHT_KINDS:
    raise ValueError(f"metadata weights={metadata['weights']!r} is invalid: must be one of {WEIGHT_KINDS}")
  from ddim_torch_ref import schedules  # pylint: disable=import-outside-toplevel
  schedules.DiffusionSpec.from_metadata(metadata)  # ValueError naming the key
  return kwargs


def image_size_from_metadata(metadata, kwargs=None) -> int:
  """The training image size a weight file records (64 when absent), validated for its U-Net."""
  kwargs = kwargs or model_kwargs_from_metadata(metadata)
  size = _metadata_int(metadata, "image_size", 1, MAX_IMAGE_SIZE, default=64)
  levels = len(kwargs["widths"]) - (kwargs["variant"] == "keras")
  if size % 2 ** levels:
    raise ValueError(f"metadata image_size={size} is invalid: must be a multiple of {2 ** levels} for this U-Net")
  return size


def check_tensors(tensors, channels: int) -> None:
  """Every tensor float32 and finite, the normaliser (C,) with variances > 0 (as ddim_jax.interop.weight_files)."""
  for name, value in tensors.items():
    if value.dtype != torch.float32:
      raise ValueError(f"tensor {name!r} has dtype {value.dtype}, expected float32; export the file again")
    if not bool(torch.isfinite(value).all()):
      raise ValueError(f"tensor {name!r} holds NaN or inf values: the weights are broken; export them again")
  for key in NORMALIZER_KEYS:
    if key not in tensors or tuple(tensors[key].shape) != (channels,):
      raise ValueError(f"tensor {key!r} is missing or not of shape ({channels},)")
  if not bool((tensors["normalizer.variance"] > 0).all()):
    raise ValueError("tensor 'normalizer.variance' must be > 0 in every channel")


def load_weights(path, variant=None):
  """Reads a weight file into a new ``UNet``.

  Returns:
    (model, normalizer, metadata) with the model in eval mode.

  Raises:
    ValueError: the file is missing, unreadable, of another format or variant, or its tensors do not
      fit the model it describes (the message names the tensor and the expected shape).
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise ValueError(f"weight file {path!r} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"weight file {path!r} is not a regular file")
  try:
    with safe_open(path, framework="pt") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises several types for corrupt files
    raise ValueError(f"cannot read weight file {path!r} ({e}); it is truncated or not a safetensors file") from e
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a ddim-jax weight file (metadata format={metadata.get('format')!r})")
  if variant is not None and metadata.get("variant") != variant:
    raise ValueError(f"{path!r} holds a {metadata.get('variant')!r} U-Net, expected {variant!r}")
  try:
    kwargs = model_kwargs_from_metadata(metadata)
    check_tensors(tensors, kwargs["channels"])
  except ValueError as e:
    raise ValueError(f"weight file {path!r}: {e}") from None
  model = models.create_model(**kwargs)
  expected = model.state_dict()
  for name, ref in expected.items():
    if name not in tensors:
      raise ValueError(f"missing tensor {name!r} (expected shape {tuple(ref.shape)}) in {path!r}")
    if tuple(tensors[name].shape) != tuple(ref.shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")
  extra = sorted(set(tensors) - set(expected) - set(NORMALIZER_KEYS))
  if extra:
    raise ValueError(f"{len(extra)} tensor(s) not used by the model, e.g. {extra[:3]}")
  model.load_state_dict({k: tensors[k] for k in expected}, strict=True)
  normalizer = {"mean": tensors["normalizer.mean"].numpy(), "variance": tensors["normalizer.variance"].numpy()}
  return model.eval(), normalizer, metadata
