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
``max_signal_rate``, ``target``, ``weights`` ('ema' or 'raw'), ``step``, ``sampler`` and ``time_grid``
(the sampler of the run's sample grids and KID, ``config.sample``; the samplers' default) and ``data`` (JSON: the
``config.data`` keys that say which images the model was trained on, ``DATA_KEYS``; the commands that
need real images read them). ``ddim_torch_ref.weight_files`` reads and writes the same file without JAX.

torch is only imported inside the ``*_torch`` helpers, never at module import.
"""

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors import numpy as safetensors_numpy
from safetensors.numpy import load_file

from ddim_jax import errors, files
from ddim_jax.core import models, schedules, solvers

FORMAT = "ddim-jax-weights"
FORMAT_VERSION = "1"
WEIGHT_KINDS = ("ema", "raw")
NORMALIZER_KEYS = ("normalizer.mean", "normalizer.variance")
MODEL_KEYS = ("variant", "widths", "block_depth", "embedding_dims", "channels")
# The keys of config.data that say WHICH images a model was trained on (not where they are on a
# machine: data_dir, cache_dir and download stay the reader's).
DATA_KEYS = ("dataset", "split", "split_seed", "validation_fraction", "tfds_splits", "image_key", "antialias",
             "folder")


class WeightFileError(errors.InputError):
  """A weight file that cannot be used: the message names the tensor or field and the fix."""


def torch_name(path) -> str:
  """The torch name of a Flax path: keys joined with '.', every ``name_<i>`` as ``name.<i>``."""
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
      state[torch_name(prefix) + "." + leaves[leaf]] = np.ascontiguousarray(value)
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
  state = {k: to_numpy(v) for k, v in state_dict.items() if k not in NORMALIZER_KEYS}
  used = set()
  out = {}
  for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
    ref = reference_variables.get(collection, {})

    def convert_leaf(path, ref_leaf, leaves=leaves):
      *prefix, leaf = [getattr(k, "key", str(k)) for k in path]
      name = torch_name(prefix) + "." + leaves[leaf]
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


def to_numpy(value) -> np.ndarray:
  """A NumPy array of a torch tensor (without importing torch) or of anything ``np.asarray`` takes."""
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


def _metadata_int(metadata: Mapping[str, str], key: str, low: int, high: int, default: int | None = None) -> int:
  """The integer ``metadata[key]`` in [low, high] (``default`` when absent, if given)."""
  raw = metadata.get(key)
  if raw is None and default is not None:
    return default
  try:
    value = int(str(raw).strip())
  except ValueError:
    value = None
  if value is None or not low <= value <= high:
    raise WeightFileError(f"metadata {key}={raw!r} is invalid: must be an integer in {low}..{high}")
  return value


def model_kwargs_from_metadata(metadata: Mapping[str, str]) -> dict:
  """Keyword arguments of ``models.create_model`` recorded in a weight file's metadata (validated).

  Raises:
    WeightFileError: a key is missing, not a number, or out of the range ``models.hyperparameter_problem`` allows.
  """
  missing = [k for k in MODEL_KEYS if k not in metadata]
  if missing:
    raise WeightFileError(f"metadata lacks {missing}; write it with `ddim-jax export` or "
                          f"ddim_jax.interop.weight_files.save_weights")
  variant = metadata["variant"]
  if variant not in models.VARIANTS:
    raise WeightFileError(f"metadata variant={variant!r} is invalid: must be one of {models.VARIANTS}")
  try:
    widths = tuple(int(w.strip()) for w in str(metadata["widths"]).split(","))
  except ValueError:
    raise WeightFileError(f"metadata widths={metadata['widths']!r} is invalid: must be comma-separated integers "
                          f"such as 32,64,96,128") from None
  kwargs = dict(variant=variant, widths=widths,
                block_depth=_metadata_int(metadata, "block_depth", 1, models.MAX_BLOCK_DEPTH),
                embedding_dims=_metadata_int(metadata, "embedding_dims", 2, models.MAX_EMBEDDING_DIMS),
                channels=_metadata_int(metadata, "channels", 1, models.MAX_CHANNELS))
  problem = models.hyperparameter_problem(widths, kwargs["block_depth"], kwargs["embedding_dims"], kwargs["channels"])
  if problem:
    raise WeightFileError(f"metadata {problem}")
  return kwargs


def data_metadata(data_config: Mapping[str, Any]) -> str:
  """The ``data`` metadata value: JSON of the ``DATA_KEYS`` of a ``config.data``."""
  def plain(value):
    return list(value) if isinstance(value, tuple) else value
  return json.dumps({k: plain(data_config.get(k)) for k in DATA_KEYS if k in data_config}, sort_keys=True)


def data_from_metadata(metadata: Mapping[str, str]) -> dict | None:
  """The training data a weight file records (``DATA_KEYS`` -> values), or None when it records none.

  Raises:
    WeightFileError: a ``data`` value that is not a JSON object naming a dataset.
  """
  raw = metadata.get("data")
  if raw is None:
    return None
  try:
    value = json.loads(raw)
  except ValueError:
    value = None
  if not isinstance(value, dict) or not isinstance(value.get("dataset"), str) or not value["dataset"]:
    raise WeightFileError(f"metadata data={raw[:200]!r} is invalid: must be a JSON object with a \"dataset\" name")
  unknown = sorted(set(value) - set(DATA_KEYS))
  if unknown:
    raise WeightFileError(f"metadata data has unknown keys {unknown}; known: {list(DATA_KEYS)}")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def image_size_from_metadata(metadata: Mapping[str, str]) -> int:
  """The training image size a weight file records (64 when absent), validated for its model."""
  size = _metadata_int(metadata, "image_size", 1, models.MAX_IMAGE_SIZE, default=64)
  kwargs = model_kwargs_from_metadata(metadata)
  problem = models.image_size_problem(kwargs["variant"], kwargs["widths"], size)
  if problem:
    raise WeightFileError(f"metadata {problem}")
  return size


def step_from_metadata(metadata: Mapping[str, str]) -> int | None:
  """The training step a weight file records, or None."""
  return _metadata_int(metadata, "step", 0, 2 ** 62) if "step" in metadata else None


def sampler_from_metadata(metadata: Mapping[str, str]) -> solvers.Sampler:
  """The sampler a weight file records (its run's ``config.sample``), DDIM on the uniform grid when it records none."""
  try:
    return solvers.Sampler(metadata.get("sampler", "ddim"), metadata.get("time_grid", "uniform"))
  except errors.Error as e:
    raise WeightFileError(f"metadata {e}") from None


def check_metadata(metadata: Mapping[str, str]) -> None:
  """Validates every metadata key the readers use (``WeightFileError`` naming the key and what is allowed)."""
  if metadata.get("format") != FORMAT:
    raise WeightFileError(f"not a ddim-jax weight file (metadata format={metadata.get('format')!r}, expected "
                          f"{FORMAT!r})")
  if "format_version" in metadata and metadata["format_version"] != FORMAT_VERSION:
    raise WeightFileError(f"metadata format_version={metadata['format_version']!r} is not supported (this ddim-jax "
                          f"reads version {FORMAT_VERSION!r}); export the file again with this version")
  model_kwargs_from_metadata(metadata)
  image_size_from_metadata(metadata)
  step_from_metadata(metadata)
  data_from_metadata(metadata)
  sampler_from_metadata(metadata)
  if metadata.get("weights", "ema") not in WEIGHT_KINDS:
    raise WeightFileError(f"metadata weights={metadata['weights']!r} is invalid: must be one of {WEIGHT_KINDS}")
  try:
    schedules.DiffusionSpec.from_metadata(metadata)
  except errors.Error as e:
    raise WeightFileError(str(e)) from None


def check_tensors(tensors: Mapping[str, np.ndarray], channels: int) -> None:
  """Every tensor float32 and finite; the normaliser (C,) with a variance > 0; BatchNorm variances >= 0."""
  for name, value in tensors.items():
    if value.dtype != np.float32:
      raise WeightFileError(f"tensor {name!r} has dtype {value.dtype}, expected float32; export the file again")
    if not np.all(np.isfinite(value)):
      raise WeightFileError(f"tensor {name!r} holds {int(np.sum(~np.isfinite(value)))} non-finite values (NaN or "
                            f"inf): the weights are broken; export them again from a checkpoint with a finite loss")
  for key in NORMALIZER_KEYS:
    if tensors[key].shape != (channels,):
      raise WeightFileError(f"tensor {key!r} has shape {tensors[key].shape}, expected ({channels},)")
  if not np.all(tensors["normalizer.variance"] > 0):
    raise WeightFileError(f"tensor 'normalizer.variance' is {tensors['normalizer.variance'].tolist()}: every channel's "
                          f"data variance must be > 0")
  negative = sorted(k for k, v in tensors.items() if k.endswith("running_var") and np.any(v < 0))
  if negative:
    raise WeightFileError(f"tensor {negative[0]!r} holds negative BatchNorm variances; the file is damaged")


def save_weights(path: str, model, variables, normalizer: Mapping[str, Any], image_size: int, spec=None,
                 data=None, **extra) -> None:
  """Writes a weight file (see the module docstring) atomically.

  Args:
    path: destination ``.safetensors`` file.
    model: the ddim_jax UNet the variables belong to.
    variables: Flax {'params', 'batch_stats'}.
    normalizer: {'mean': (C,), 'variance': (C,)} data statistics.
    image_size: training image size (recorded for samplers).
    spec: the model's ``schedules.DiffusionSpec`` (recorded for samplers; ``DiffusionSpec.from_metadata``
      reads it back).
    data: the ``config.data`` the model was trained on (recorded as ``data_metadata``), or None.
    **extra: further metadata (weights, step; or the spec's keys one by one).
  """
  if spec is not None:
    extra = {**spec.to_metadata(), **extra}
  if data is not None:
    extra["data"] = data_metadata(data)
  tensors = flax_to_torch_state_dict(variables)
  tensors["normalizer.mean"] = np.asarray(normalizer["mean"], np.float32).reshape(-1)
  tensors["normalizer.variance"] = np.asarray(normalizer["variance"], np.float32).reshape(-1)
  if os.path.isdir(path):
    raise errors.ConfigError(f"{path!r} is a folder; give the weight file's path, e.g. {os.path.join(path, 'model')}"
                             f".safetensors")
  write_atomically(path, safetensors_writer(tensors, model_metadata(model, image_size, **extra)), "weight file")


def safetensors_writer(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None):
  """A ``write(f)`` of a safetensors file of ``tensors`` (for ``write_atomically``)."""
  def write(f) -> None:
    try:
      f.write(safetensors_numpy.save(dict(tensors), metadata=None if metadata is None else dict(metadata)))
    except SafetensorError as e:
      raise errors.InputError(f"cannot serialise the weight file ({e})") from None
  return write


def write_atomically(path: str, write, what: str = "--out") -> None:
  """``write(f)`` (a binary file object) into a new temporary file, then renamed to ``path``
  (``files.replace_file``): a failed write never leaves a half file at ``path``; a link, a FIFO or a
  device at ``path`` is refused, never written through; an existing file keeps its mode, a new one
  gets ``0666 & ~umask``."""
  if os.path.isdir(path):
    raise errors.ConfigError(f"{path!r} is a folder; give the file's path")
  files.ensure_parent(path, what)
  files.replace_file(path, write, what)


def check_written(path: str) -> None:
  """Reads ``path`` back as every command would; a file that does not load is removed, not left behind."""
  written = os.lstat(path)
  try:
    load_weights(path)
  except errors.Error:
    files.remove_own(path, written)  # the file this command wrote, nothing that replaced it since
    raise


def read_weight_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a weight file's tensors (torch naming) and metadata, checking its format and metadata.

  Raises:
    WeightFileError: naming the file, then the key or tensor and what is allowed.
  """
  if not os.path.exists(path):
    raise WeightFileError(f"weight file {path!r} does not exist; write one with `ddim-jax export`")
  if not os.path.isfile(path):
    raise WeightFileError(f"weight file {path!r} is not a regular file; give a .safetensors file written by "
                          f"`ddim-jax export`")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise WeightFileError(f"cannot read weight file {path!r} ({e}); it is truncated or not a safetensors file — "
                          f"re-export it with `ddim-jax export`") from e
  try:
    check_metadata(metadata)
    for key in NORMALIZER_KEYS:
      if key not in tensors:
        raise WeightFileError(f"missing tensor {key!r} (expected shape ({metadata.get('channels', 'C')},))")
    check_tensors(tensors, int(metadata["channels"]))
  except WeightFileError as e:
    raise WeightFileError(f"weight file {path!r}: {e}") from None
  return tensors, metadata


def load_weights(path: str, variant: str | None = None, image_size: int | None = None):
  """Reads a weight file into a ddim_jax model.

  Args:
    path: a ``.safetensors`` file written by either package.
    variant: if given, the variant the caller expects; a file of another variant is an error.
    image_size: overrides the image size recorded in the file.

  Returns:
    (model, variables, normalizer, metadata): the UNet, Flax {'params','batch_stats'} (NumPy),
    {'mean','variance'} (NumPy, (C,)) and the file's metadata (validated: ``check_metadata``).

  Raises:
    WeightFileError: the file is missing, unreadable, or any metadata key or tensor is invalid (the
      message names the file, the key or tensor, and what is allowed).
  """
  tensors, metadata = read_weight_file(path)
  kwargs = model_kwargs_from_metadata(metadata)
  if variant is not None and kwargs["variant"] != variant:
    raise WeightFileError(f"{path!r} holds a {kwargs['variant']!r} U-Net, expected {variant!r}; pass the matching "
                          f"--variant or another file")
  model = models.create_model(**kwargs)
  size = image_size_from_metadata(metadata) if image_size is None else int(image_size)
  models.check_image_size(model, size)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), size))
  try:
    variables = torch_state_dict_to_flax(tensors, reference)
  except WeightFileError as e:
    raise WeightFileError(f"weight file {path!r}: {e}") from None
  normalizer = {"mean": tensors["normalizer.mean"], "variance": tensors["normalizer.variance"]}
  return model, variables, normalizer, metadata


def metadata_json(metadata: Mapping[str, str]) -> str:
  """Pretty JSON of a weight file's metadata (for CLI output)."""
  return json.dumps(dict(metadata), indent=2, sort_keys=True)
