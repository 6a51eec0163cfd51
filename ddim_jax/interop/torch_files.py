"""``ddim-jax convert``: the weight file to and from a torch file (``.pt`` / ``.pth``) of the twin.

A torch file this module writes is a dict ``{"state_dict", "normalizer", "metadata"}``: the
``state_dict`` loads into ``ddim_torch_ref.models.UNet`` with ``strict=True``
(``model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])``), the normaliser and
the weight file's metadata ride along, so the way back is exact. A plain state dict (what
``torch.save(model.state_dict(), path)`` writes) says nothing of the architecture, the image size or
the data: a config (preset or file, with overrides) gives them, and the normaliser is computed from
that config's training split, as training does.

Torch files are read with ``torch.load(weights_only=True)``: tensors, dicts and strings only, no
pickled code. torch is imported only here, when a command converts.
"""

import os
from typing import Any, Mapping

import jax
import numpy as np

from ddim_jax import configs, data, errors
from ddim_jax.core import models, schedules
from ddim_jax.interop import weight_files

TORCH_SUFFIXES = (".pt", ".pth")
WEIGHT_SUFFIX = ".safetensors"
FILE_KEYS = ("state_dict", "normalizer", "metadata")


def read_torch_file(path: str) -> dict:
  """``torch.load(path, weights_only=True)`` as a dict; an unreadable file is one clear error."""
  import torch  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise errors.InputError(f"torch file {path!r} does not exist or is not a file")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises many types: truncated zip, pickled code refused, ...)
    raise errors.InputError(f"cannot read torch file {path!r} with weights_only=True ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); give a state dict saved with torch.save, "
                            f"or a file written by `ddim-jax convert`") from None
  if not isinstance(loaded, Mapping):
    raise errors.InputError(f"torch file {path!r} holds a {type(loaded).__name__}, not a state dict")
  return dict(loaded)


def weights_to_torch_file(weights_path: str, out: str) -> dict[str, str]:
  """Writes the weight file ``weights_path`` as a torch file ``out``; returns its metadata."""
  import torch  # pylint: disable=import-outside-toplevel
  tensors, metadata = weight_files.read_weight_file(weights_path)
  # The check a reader would make: the tensors fit the architecture the metadata names.
  weight_files.load_weights(weights_path)
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()
                if k not in weight_files.NORMALIZER_KEYS}
  normalizer = {key.split(".", 1)[1]: torch.from_numpy(np.ascontiguousarray(tensors[key]))
                for key in weight_files.NORMALIZER_KEYS}
  weight_files.write_atomically(out, lambda f: torch.save({"state_dict": state_dict, "normalizer": normalizer,
                                                          "metadata": dict(metadata)}, f))
  return metadata


def torch_file_to_weights(torch_path: str, out: str, config: str | None = None,
                          overrides=()) -> dict[str, Any]:
  """Writes the torch file ``torch_path`` as the weight file ``out``.

  A file written by ``weights_to_torch_file`` carries its metadata and normaliser (``config`` must
  then be None). A plain state dict needs ``config`` (a preset or a config file; ``overrides``
  ``--config.*`` on top): its model, image size, diffusion and data; the normaliser is that data's.

  Returns:
    {"metadata": the metadata written, "normalizer": where the normaliser came from}.
  """
  loaded = read_torch_file(torch_path)
  if set(FILE_KEYS) <= set(loaded):
    if config is not None or overrides:
      raise errors.ConfigError(f"{torch_path!r} records its model and data (written by `ddim-jax convert`): "
                               "drop --config and the --config.* overrides")
    return _write_described(torch_path, loaded, out)
  if config is None:
    raise errors.ConfigError(f"{torch_path!r} is a plain state dict: it does not say which model, image size or data "
                             f"it belongs to. Pass --config PRESET_OR_FILE (with --config.model.* / --config.data.* "
                             f"as trained)")
  return _write_plain(torch_path, loaded, out, configs.load_config(config, list(overrides)))


def _write_described(torch_path: str, loaded: Mapping[str, Any], out: str) -> dict[str, Any]:
  """A torch file of ``weights_to_torch_file``: its tensors, normaliser and metadata, as they were."""
  metadata = loaded["metadata"]
  if not isinstance(metadata, Mapping) or not all(isinstance(v, str) for v in metadata.values()):
    raise errors.InputError(f"torch file {torch_path!r}: 'metadata' must map names to strings")
  normalizer = loaded["normalizer"]
  tensors = {k: weight_files.to_numpy(v).astype(np.float32) for k, v in loaded["state_dict"].items()}
  for key in ("mean", "variance"):
    if key not in normalizer:
      raise errors.InputError(f"torch file {torch_path!r}: the normaliser lacks {key!r}")
    tensors[f"normalizer.{key}"] = weight_files.to_numpy(normalizer[key]).astype(np.float32).reshape(-1)
  weight_files.write_atomically(out, weight_files.safetensors_writer(tensors, metadata))
  weight_files.check_written(out)
  return {"metadata": dict(metadata), "normalizer": f"recorded in {torch_path}"}


def _write_plain(torch_path: str, state_dict: Mapping[str, Any], out: str, config) -> dict[str, Any]:
  """A plain state dict with ``config``'s model, image size, diffusion and data (and that data's normaliser)."""
  model = models.create_model(**config.model)
  image_size = int(config.model.image_size)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_size))
  try:
    variables = weight_files.torch_state_dict_to_flax(state_dict, reference)
  except weight_files.WeightFileError as e:
    raise weight_files.WeightFileError(f"torch file {torch_path!r} does not fit the config's model "
                                       f"({', '.join(f'{k}={config.model[k]}' for k in weight_files.MODEL_KEYS)}): "
                                       f"{e}") from None
  if all(key in state_dict for key in weight_files.NORMALIZER_KEYS):
    normalizer = {key.split(".", 1)[1]: weight_files.to_numpy(state_dict[key]).reshape(-1)
                  for key in weight_files.NORMALIZER_KEYS}
    source = f"recorded in {torch_path}"
  else:
    normalizer = data.load_normalizer(config.data, image_size)
    source = f"computed from the training split of data.dataset={config.data.dataset!r}"
  weight_files.save_weights(out, model, variables, normalizer, image_size,
                            spec=schedules.DiffusionSpec.from_config(config), data=config.data)
  weight_files.check_written(out)
  return {"metadata": weight_files.read_weight_file(out)[1], "normalizer": source}
