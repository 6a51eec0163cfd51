"""The ddim-jax safetensors weight file, read and written from PyTorch (no JAX needed).

The file is the torch ``state_dict`` of ``ddim_torch_ref.models.UNet`` (torch names, OIHW kernels)
plus ``normalizer.mean`` and ``normalizer.variance``; its metadata describes the model. See
``ddim_jax/convert.py`` for the full format description; both packages read and write it.
"""

import os

import numpy as np
import torch

from ddim_torch_ref import models

FORMAT = "ddim-jax-weights"
FORMAT_VERSION = "1"
NORMALIZER_KEYS = ("normalizer.mean", "normalizer.variance")


def save_weights(path, model: models.UNet, normalizer, image_size: int, **extra) -> None:
  """Writes ``model``'s weights and the normaliser to ``path`` (atomically)."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
  tensors["normalizer.mean"] = torch.as_tensor(np.asarray(normalizer["mean"], np.float32)).reshape(-1)
  tensors["normalizer.variance"] = torch.as_tensor(np.asarray(normalizer["variance"], np.float32)).reshape(-1)
  metadata = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "variant": model.variant,
      "widths": ",".join(str(w) for w in model.widths), "block_depth": str(model.block_depth),
      "embedding_dims": str(model.embedding_dims), "channels": str(model.channels), "image_size": str(image_size),
  }
  metadata.update({k: str(v) for k, v in extra.items() if v is not None})
  tmp = f"{path}.tmp{os.getpid()}"
  save_file(tensors, tmp, metadata=metadata)
  os.replace(tmp, path)


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
  model = models.create_model(
      variant=metadata["variant"], widths=tuple(int(w) for w in metadata["widths"].split(",")),
      block_depth=int(metadata["block_depth"]), embedding_dims=int(metadata["embedding_dims"]),
      channels=int(metadata["channels"]))
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
