"""``ddim-jax convert``: the Keras example's ``.weights.h5`` (Keras 3) to and from the weight file.

The Keras DDIM example saves its ``DiffusionModel`` with ``save_weights("....weights.h5")``: the
``network``, the ``ema_network`` (a ``clone_model`` of it) and the ``normalizer`` (a
``layers.Normalization`` adapted to the training images). Keras 3 writes one HDF5 group per layer
that holds variables, named by the layer's class in the order of the functional model's ``layers``
(``ema_network/layers/conv2d_7/vars/0`` is the kernel of the EMA network's eighth ``Conv2D`` in that
order), never by the layer's own name; where each part lands is ``NETWORK_PATHS`` and
``NORMALIZER_PATHS``. That order is Keras's: by the longest path to the output, ties broken by a
depth-first walk from the output (``keras.src.ops.function.map_graph``). ``keras_layer_names``
rebuilds the example's graph (``get_network``: stem, down blocks, middle blocks, up blocks, head) and
applies the same rule, so reading and writing need h5py only, not Keras; the tests check the rule
against real Keras.

  Keras (NHWC)                                          weight file (torch names, OIHW)
  Conv2D vars/0 kernel (kh, kw, in, out), vars/1 bias   <-> .../weight (out, in, kh, kw), .../bias
  BatchNormalization (center=False, scale=False)
    vars/0 moving_mean, vars/1 moving_variance          <-> .../norm.running_mean, .../norm.running_var
  normaliser vars/0 mean, /1 variance, /2 count         <-> normalizer.mean, normalizer.variance

A weight file holds one network: reading takes the ``ema_network`` (what the example samples with)
or, with ``network="raw"``, the ``network``; writing puts the file's weights into both (and a
``count`` of 0 into the normaliser: it only matters to a further ``adapt``). The Keras file says
nothing of the image size, the diffusion schedule or the data: the Keras example's own settings (the
``default`` preset) apply unless a config is given; a file this module wrote carries the weight file's
metadata as an HDF5 attribute, so the way back is exact. Only the Keras U-Net has a Keras original;
the R variant (R's torch) has none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from ddim_jax import configs, errors, files
from ddim_jax.core import models, schedules
from ddim_jax.interop import weight_files

KERAS_SUFFIX = ".weights.h5"
NETWORK_GROUPS = {"ema": "ema_network", "raw": "network"}
# Where Keras 3 puts the example's parts. Its saver walks the model's attributes in sorted order and
# writes each object once, at the first path it meets it by: ``ema_network`` sorts before the model's
# ``layers`` list, which holds the normaliser and the network (named by class, "normalization" and
# "functional"); ``network`` and ``normalizer`` sort after it. The later paths are what other
# layouts (a model with its attributes walked in another order, Keras 2.13-2.15) use.
NETWORK_PATHS = {
    "ema_network": ("ema_network/layers", "ema_network/_layer_checkpoint_dependencies"),
    "network": ("layers/functional/layers", "network/layers", "network/_layer_checkpoint_dependencies"),
}
NORMALIZER_PATHS = ("layers/normalization/vars", "normalizer/vars")
METADATA_ATTR = "ddim_jax_metadata"  # the weight file's metadata, as JSON, in a file this module wrote
# Keras's group names: the layer's class in snake case, then _1, _2, ... in the functional order.
_CLASS_NAMES = {"conv": "conv2d", "bn": "batch_normalization"}


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One layer of the example's functional graph: what it is, what it reads, the twin's name."""
  kind: str  # "conv", "bn", or "other" (inputs, Lambda, UpSampling2D, Concatenate, Add, pooling)
  inputs: tuple[int, ...]
  name: str | None = None  # the twin module's torch name ("down_blocks.0.residual_blocks.1.conv2")


def _example_graph(widths, block_depth: int, embedding_dims: int) -> list[_Layer]:
  """The Keras example's ``get_network`` as a list of layers (the last is the output)."""
  layers: list[_Layer] = []
  channels_of: dict[int, int] = {}

  def add(kind, inputs, name=None, channels=None):
    layers.append(_Layer(kind, tuple(inputs), name))
    index = len(layers) - 1
    channels_of[index] = channels if channels is not None else channels_of[inputs[0]]
    return index

  def residual_block(x, width, name):
    # ResidualBlock: residual = x or Conv2D 1x1 (when the width changes); BN -> conv -> conv; Add.
    residual = x if channels_of[x] == width else add("conv", [x], f"{name}.proj", width)
    h = add("bn", [x], f"{name}.norm")
    h = add("conv", [h], f"{name}.conv1", width)  # Conv2D 3x3 with the swish as its activation
    h = add("conv", [h], f"{name}.conv2", width)
    return add("other", [h, residual])

  images = add("other", [], channels=3)
  variances = add("other", [], channels=1)
  e = add("other", [variances], channels=embedding_dims)  # Lambda(sinusoidal_embedding)
  e = add("other", [e])  # UpSampling2D(size=image_size, "nearest")
  x = add("conv", [images], "stem", widths[0])
  x = add("other", [x, e], channels=widths[0] + embedding_dims)  # Concatenate
  skips = []
  for i, width in enumerate(widths[:-1]):
    for j in range(block_depth):
      x = residual_block(x, width, f"down_blocks.{i}.residual_blocks.{j}")
      skips.append(x)
    x = add("other", [x])  # AveragePooling2D
  for j in range(block_depth):
    x = residual_block(x, widths[-1], f"mid_blocks.{j}")
  for i, width in enumerate(reversed(widths[:-1])):
    x = add("other", [x])  # UpSampling2D(2, "bilinear")
    for j in range(block_depth):
      skip = skips.pop()
      x = add("other", [x, skip], channels=channels_of[x] + channels_of[skip])  # Concatenate
      x = residual_block(x, width, f"up_blocks.{i}.residual_blocks.{j}")
  add("conv", [x], "head", 3)
  return layers


def _functional_order(layers: list[_Layer]) -> list[int]:
  """Keras's order of a functional model's layers: longest path to the output first, ties by the
  pre-order of a depth-first walk from the output through each layer's inputs in order."""
  visit_index: dict[int, int] = {}
  stack = [len(layers) - 1]
  while stack:  # iterative pre-order DFS (inputs in order), first visit wins
    i = stack.pop()
    if i in visit_index:
      continue
    visit_index[i] = len(visit_index)
    stack.extend(reversed(layers[i].inputs))
  consumers: dict[int, list[int]] = {i: [] for i in range(len(layers))}
  for i, layer in enumerate(layers):
    for j in layer.inputs:
      consumers[j].append(i)
  depth: dict[int, int] = {}
  for i in reversed(range(len(layers))):  # layers are listed inputs-first, so consumers come later
    depth[i] = max((depth[c] + 1 for c in consumers[i]), default=0)
  return sorted(visit_index, key=lambda i: (-depth[i], visit_index[i]))


def keras_layer_names(widths, block_depth: int, embedding_dims: int = 32) -> dict[str, str]:
  """{twin module name: the Keras group name} of the example's network, e.g. {"stem": "conv2d", ...}."""
  layers = _example_graph(tuple(widths), int(block_depth), int(embedding_dims))
  counts: dict[str, int] = {}
  names = {}
  for i in _functional_order(layers):
    layer = layers[i]
    if layer.kind in _CLASS_NAMES:
      base = _CLASS_NAMES[layer.kind]
      n = counts.get(base, 0)
      counts[base] = n + 1
      names[layer.name] = base if n == 0 else f"{base}_{n}"
  return names


def _h5py():
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise errors.ConfigError("reading and writing Keras .weights.h5 files needs h5py: pip install h5py (it comes "
                             "with TensorFlow and Keras)") from None
  return h5py


def _suffix_number(name: str) -> int:
  match = re.fullmatch(r"[a-z0-9_]+?(?:_(\d+))?", name)
  return int(match.group(1) or 0) if match else -1


@dataclasses.dataclass
class KerasFile:
  """What a Keras ``.weights.h5`` of the example holds: per network {group: [vars]}, and the normaliser."""
  path: str
  networks: dict[str, dict[str, list[np.ndarray]]]
  normalizer: list[np.ndarray]
  metadata: dict[str, str] | None  # the weight file's metadata, in a file ``weights_to_keras_file`` wrote


def _first_group(f, paths):
  # Only a group: iterating an h5py Dataset (or testing ``in`` on it) reads it row by row.
  h5py = _h5py()
  return next((f[p] for p in paths if p in f and isinstance(f[p], h5py.Group)), None)


# What a .weights.h5 may declare, checked on the datasets' shapes and dtypes before a value is read
# (a 170 KB file can declare a 2 GB dataset of compressed or never-written chunks, which h5py fills
# with zeros on reading: 8.6 GB at the peak of a conversion). Keras writes its variables
# uncompressed, so a real file holds the values it declares: at most DECLARED_PER_FILE_BYTE times its
# size plus DECLARED_SLACK_BYTES (room for a recompressed file's zero vectors), and MAX_DECLARED_BYTES
# in all (two networks of 256 M float32 parameters; the Keras example's file holds 15.6 MB).
MAX_DECLARED_BYTES = 2 * 2 ** 30
DECLARED_PER_FILE_BYTE = 4
DECLARED_SLACK_BYTES = 16 * 2 ** 20
# The widest channel count any U-Net the package accepts feeds a layer: an up block's input (its
# width plus a skip) or the first block's (widths[0] + embedding_dims).
_MAX_IN_CHANNELS = max(2 * models.MAX_WIDTH, models.MAX_WIDTH + models.MAX_EMBEDDING_DIMS)
_MAX_VECTOR = _MAX_IN_CHANNELS  # a bias, a BatchNormalization statistic, a normaliser statistic


def _byte_text(n: int) -> str:
  return f"{n / 1e3:,.0f} KB" if n < 1e6 else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.1f} GB"


def _declared(dataset) -> str:
  size = _byte_text(int(dataset.size) * dataset.dtype.itemsize)
  return f"dataset {dataset.name.lstrip('/')!r} declares shape {tuple(dataset.shape)} {dataset.dtype} ({size})"


def _variables(path: str, vars_group) -> list:
  """The datasets of a layer's ``vars`` group in Keras's order (0, 1, ...), unread."""
  h5py = _h5py()
  items = []
  for key in vars_group:
    item = vars_group.get(key)
    if not key.isdigit() or not isinstance(item, h5py.Dataset):
      raise errors.InputError(f"Keras weights file {path!r}: {vars_group.name.lstrip('/')}/{key} is not a variable "
                              f"(Keras writes datasets named 0, 1, ...); give the .weights.h5 that "
                              f"`model.save_weights` of the Keras example wrote")
    items.append((int(key), item))
  return [item for _, item in sorted(items, key=lambda kv: kv[0])]


def _check_declared(path: str, networks: Mapping[str, Mapping[str, list]], normalizer: list) -> None:
  """Refuses, before a value is read, a dataset whose declared dtype or shape no layer of the package's
  U-Nets has, one stored outside the file, and a file that declares more values than it can hold.

  A Conv2D layer is a kernel (k, k, in, out) with k 1 or 3, in <= _MAX_IN_CHANNELS, out <=
  models.MAX_WIDTH, and a bias (out,); a BatchNormalization layer two vectors of one length; other
  datasets at most _MAX_VECTOR values. The exact shapes of the file's architecture are checked after
  reading (`keras_network_to_state_dict`), as an override may give that architecture.
  """
  fix = "nothing was read: give the .weights.h5 that `model.save_weights` of the Keras example wrote"
  total, largest = 0, None
  for group_name, datasets in [(f"{net}/{name}", values) for net, groups in networks.items()
                               for name, values in groups.items()] + [("normalizer", normalizer)]:
    layer = group_name.rsplit("/", 1)[-1]
    for i, dataset in enumerate(datasets):
      if dataset.dtype.kind not in "fiu" or dataset.dtype.itemsize > 8:
        raise errors.InputError(f"Keras weights file {path!r}: {_declared(dataset)}, not a number type Keras writes "
                                f"(float32); {fix}")
      if dataset.external or dataset.is_virtual:
        raise errors.InputError(f"Keras weights file {path!r}: {_declared(dataset)} stored in other files (external "
                                f"or virtual storage), which Keras never writes; {fix}")
      shape, first = tuple(int(n) for n in dataset.shape), tuple(int(n) for n in datasets[0].shape)
      if layer.startswith("conv2d") and i == 0:
        ok = (len(shape) == 4 and shape[0] == shape[1] and shape[0] in (1, 3) and 1 <= shape[2] <= _MAX_IN_CHANNELS
              and 1 <= shape[3] <= models.MAX_WIDTH)
        expected = f"a Conv2D kernel (k, k, in, out) with k 1 or 3, in <= {_MAX_IN_CHANNELS}, out <= {models.MAX_WIDTH}"
      elif layer.startswith("conv2d"):
        ok, expected = i == 1 and shape == first[3:], f"only the bias {first[3:]} of the Conv2D kernel {first}"
      elif layer.startswith("batch_normalization"):
        ok = len(shape) == 1 and 1 <= shape[0] <= _MAX_IN_CHANNELS and shape == first
        expected = f"BatchNormalization statistics of one shape (channels,), channels <= {_MAX_IN_CHANNELS}"
      else:
        ok, expected = dataset.size <= _MAX_VECTOR and len(shape) <= 4, f"at most {_MAX_VECTOR} values"
      if not ok:
        raise errors.InputError(f"Keras weights file {path!r}: {_declared(dataset)}, but the package's U-Nets need "
                                f"{expected} there; {fix}")
      size = int(dataset.size) * dataset.dtype.itemsize
      total += size
      if largest is None or size > largest[0]:
        largest = (size, dataset)
  file_size = os.path.getsize(path)
  limit = min(MAX_DECLARED_BYTES, DECLARED_PER_FILE_BYTE * file_size + DECLARED_SLACK_BYTES)
  if total > limit:
    raise errors.InputError(
        f"Keras weights file {path!r} declares {_byte_text(total)} of values in {_byte_text(file_size)} (the largest, "
        f"{_declared(largest[1])}), over the {_byte_text(limit)} such a file can hold: compressed or unwritten data, "
        f"not what Keras's save_weights writes; {fix}")


def read_keras_file(path: str) -> KerasFile:
  """Reads the example's ``.weights.h5``: both networks' layer variables and the normaliser's.

  Every dataset's declared shape and dtype is checked before any value is read (`_check_declared`):
  reading costs at most the memory of the values a real file holds.

  Raises:
    InputError: the file is missing, not HDF5, lacks a network or the normaliser (naming it), or
      declares a dataset no U-Net of the package has or more values than the file can hold.
  """
  h5py = _h5py()
  if not os.path.isfile(path):
    raise errors.InputError(f"Keras weights file {path!r} does not exist or is not a file")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise errors.InputError(f"cannot read Keras weights file {path!r} ({e}); give the .weights.h5 that "
                            f"`model.save_weights` of the Keras example wrote") from None
  with f:
    networks = {}
    for network, paths in NETWORK_PATHS.items():
      group = _first_group(f, paths)
      if group is None:
        raise errors.InputError(f"Keras weights file {path!r} has no {network!r} (looked for {' or '.join(paths)}): "
                                f"it is not the Keras DDIM example's DiffusionModel (normalizer, network, "
                                f"ema_network) saved with save_weights")
      layers = {name: group.get(name) for name in group}
      networks[network] = {name: _variables(path, layer["vars"]) for name, layer in layers.items()
                           if isinstance(layer, h5py.Group) and isinstance(layer.get("vars"), h5py.Group)
                           and len(layer["vars"])}
    norm = _first_group(f, NORMALIZER_PATHS)
    if norm is None:
      raise errors.InputError(f"Keras weights file {path!r} has no normalizer: save the example's DiffusionModel "
                              f"after model.normalizer.adapt(...)")
    normalizer = _variables(path, norm)
    _check_declared(path, networks, normalizer)  # before a single value is read
    networks = {network: {name: [np.asarray(v) for v in values] for name, values in groups.items()}
                for network, groups in networks.items()}
    normalizer = [np.asarray(v) for v in normalizer]
    raw = f.attrs.get(METADATA_ATTR)
    metadata = json.loads(raw) if raw is not None else None
  return KerasFile(path, networks, normalizer, metadata)


def infer_architecture(network: Mapping[str, list[np.ndarray]]) -> dict[str, Any]:
  """The example's ``widths``, ``block_depth``, ``embedding_dims`` and ``channels`` from a network's
  variables: the stem (the first Conv2D) maps channels -> widths[0]; the first BatchNormalization sees
  widths[0] + embedding_dims channels; the 3x3 convolutions' widths in order are the widths; there
  are block_depth * (2 * len(widths) - 1) BatchNormalizations."""
  convs = sorted((n for n in network if n.startswith("conv2d")), key=_suffix_number)
  norms = sorted((n for n in network if n.startswith("batch_normalization")), key=_suffix_number)
  if not convs or not norms:
    raise weight_files.WeightFileError("no Conv2D or BatchNormalization variables: not the example's U-Net")
  stem = network[convs[0]][0]
  channels, first_width = int(stem.shape[2]), int(stem.shape[3])
  widths = []
  for name in convs:
    kernel = network[name][0]
    if kernel.ndim == 4 and kernel.shape[:2] == (3, 3) and int(kernel.shape[3]) not in widths:
      widths.append(int(kernel.shape[3]))
  block_depth, remainder = divmod(len(norms), 2 * len(widths) - 1)
  if remainder or block_depth < 1 or not widths or widths[0] != first_width:
    raise weight_files.WeightFileError(f"{len(convs)} Conv2D and {len(norms)} BatchNormalization layers do not form "
                                       f"the example's U-Net; pass --config with its widths and block_depth")
  embedding_dims = int(network[norms[0]][0].shape[-1]) - first_width
  return dict(variant="keras", widths=tuple(widths), block_depth=block_depth, embedding_dims=embedding_dims,
              channels=channels)


def keras_network_to_state_dict(network: Mapping[str, list[np.ndarray]], model_kwargs: Mapping[str, Any]
                                ) -> dict[str, np.ndarray]:
  """A network's Keras variables as the twin's torch-named state dict (OIHW kernels, float32)."""
  names = keras_layer_names(model_kwargs["widths"], model_kwargs["block_depth"], model_kwargs["embedding_dims"])
  state = {}
  for twin_name, group in names.items():
    if group not in network:
      raise weight_files.WeightFileError(f"no Keras layer {group!r} (the twin's {twin_name}); the file was saved "
                                         f"from another architecture than {_describe(model_kwargs)}")
    values = network[group]
    if twin_name.endswith(".norm"):
      if len(values) != 2:
        raise weight_files.WeightFileError(f"Keras layer {group!r} holds {len(values)} variables, expected 2 "
                                           f"(moving mean and variance of BatchNormalization(center=False, "
                                           f"scale=False))")
      state[f"{twin_name}.running_mean"], state[f"{twin_name}.running_var"] = values
    else:
      if len(values) != 2 or values[0].ndim != 4:
        raise weight_files.WeightFileError(f"Keras layer {group!r} is not a Conv2D with a bias")
      state[f"{twin_name}.weight"] = values[0].transpose(3, 2, 0, 1)  # HWIO -> OIHW
      state[f"{twin_name}.bias"] = values[1]
  extra = sorted(set(network) - set(names.values()))
  if extra:
    raise weight_files.WeightFileError(f"Keras layers {extra[:3]} are not in the example's U-Net of "
                                       f"{_describe(model_kwargs)}")
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def _describe(model_kwargs: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={model_kwargs[k]}" for k in ("widths", "block_depth", "embedding_dims"))


def keras_file_to_weights(path: str, out: str, config: str | None = None, overrides=(), network: str = "ema"
                          ) -> dict[str, Any]:
  """Writes the example's ``.weights.h5`` at ``path`` as the weight file ``out``.

  Args:
    path: the Keras file.
    out: the ``.safetensors`` weight file to write.
    config: the preset or config file whose image size, diffusion and data the model was trained
      with (default: ``default``, the Keras example's own). The architecture is the file's (its
      shapes say it) unless ``--config.model.widths`` / ``block_depth`` / ``embedding_dims`` /
      ``channels`` overrides give it. A file ``weights_to_keras_file`` wrote records all of it: with
      no config and no overrides, its weight file comes back as it was.
    overrides: ``--config.*`` overrides on top of ``config``.
    network: "ema" (the example's ``ema_network``, what it samples with) or "raw" (its ``network``).

  Returns:
    {"metadata": the metadata written, "normalizer": where the normaliser came from, "model": how the
    architecture was found}.
  """
  if network not in NETWORK_GROUPS:
    raise errors.ConfigError(f"network={network!r}: choose one of {sorted(NETWORK_GROUPS)}")
  keras_file = read_keras_file(path)
  weights = keras_file.networks[NETWORK_GROUPS[network]]
  if keras_file.metadata is not None and config is None and not overrides:
    return _write_recorded(keras_file, weights, out)
  cfg = configs.load_config(config or "default", list(overrides))
  if cfg.model.variant != "keras":
    raise errors.ConfigError("only the Keras U-Net has a Keras original (the R variant was written in R's torch); "
                             "drop --config.model.variant")
  # The architecture is the file's (its shapes say it); an override of it is for files whose
  # shapes do not (two equal widths in a row).
  if any(re.match(r"--config\.model\.(widths|block_depth|embedding_dims|channels)=", str(o)) for o in overrides):
    model_kwargs, source = {k: cfg.model[k] for k in weight_files.MODEL_KEYS}, "the --config.model overrides"
    model_kwargs["widths"] = tuple(model_kwargs["widths"])
  else:
    try:
      model_kwargs, source = infer_architecture(weights), "the file's shapes"
    except weight_files.WeightFileError as e:
      raise weight_files.WeightFileError(f"Keras weights file {path!r}: {e}") from None
  image_size = int(cfg.model.image_size)
  model = models.create_model(**model_kwargs)
  models.check_image_size(model, image_size)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_size))
  try:
    variables = weight_files.torch_state_dict_to_flax(keras_network_to_state_dict(weights, model_kwargs), reference)
  except weight_files.WeightFileError as e:
    raise weight_files.WeightFileError(f"Keras weights file {path!r} does not fit the model "
                                       f"{_describe(model_kwargs)} (found from {source}): {e}") from None
  normalizer = _normalizer(keras_file, int(model_kwargs["channels"]))
  weight_files.save_weights(out, model, variables, normalizer, image_size,
                            spec=schedules.DiffusionSpec.from_config(cfg), data=cfg.data, weights=network)
  weight_files.check_written(out)
  return {"metadata": weight_files.read_weight_file(out)[1], "normalizer": f"the Keras normalizer of {path}",
          "model": source}


def _write_recorded(keras_file: KerasFile, weights, out: str) -> dict[str, Any]:
  """A file ``weights_to_keras_file`` wrote: the weight file's tensors and metadata, as they were."""
  metadata = keras_file.metadata
  try:
    model_kwargs = weight_files.model_kwargs_from_metadata(metadata)
  except weight_files.WeightFileError as e:
    raise weight_files.WeightFileError(f"Keras weights file {keras_file.path!r}: {e}") from None
  tensors = keras_network_to_state_dict(weights, model_kwargs)
  normalizer = _normalizer(keras_file, int(model_kwargs["channels"]))
  tensors.update({f"normalizer.{k}": v for k, v in normalizer.items()})
  weight_files.write_atomically(out, weight_files.safetensors_writer(tensors, metadata))
  weight_files.check_written(out)
  return {"metadata": dict(metadata), "normalizer": f"recorded in {keras_file.path}", "model": "recorded in the file"}


def _normalizer(keras_file: KerasFile, channels: int) -> dict[str, np.ndarray]:
  values = keras_file.normalizer
  if len(values) < 2 or any(v.reshape(-1).shape != (channels,) for v in values[:2]):
    raise weight_files.WeightFileError(
        f"Keras weights file {keras_file.path!r}: the normalizer holds {[v.shape for v in values]}, expected a "
        f"mean and a variance of {channels} channels (layers.Normalization() adapted to the images)")
  mean, variance = (np.asarray(v, np.float32).reshape(-1) for v in values[:2])
  return {"mean": mean, "variance": variance}


def weights_to_keras_file(weights_path: str, out: str) -> dict[str, str]:
  """Writes the weight file ``weights_path`` as a ``.weights.h5`` that the Keras example's
  ``DiffusionModel.load_weights`` reads (both networks get the file's weights); returns its metadata."""
  h5py = _h5py()
  model, variables, normalizer, metadata = weight_files.load_weights(weights_path)
  if model.variant != "keras":
    raise errors.ConfigError(f"{weights_path!r} holds the R variant's U-Net, which has no Keras original (R's "
                             f"torch); only a keras-variant model converts to a Keras .weights.h5")
  state = weight_files.flax_to_torch_state_dict(variables)
  names = keras_layer_names(model.widths, model.block_depth, model.embedding_dims)
  groups = {}
  for twin_name, group in names.items():
    if twin_name.endswith(".norm"):
      groups[group] = [state[f"{twin_name}.running_mean"], state[f"{twin_name}.running_var"]]
    else:
      groups[group] = [state[f"{twin_name}.weight"].transpose(2, 3, 1, 0), state[f"{twin_name}.bias"]]

  def write_h5(buffer):
    with h5py.File(buffer, "w") as f:
      f.attrs[METADATA_ATTR] = json.dumps(dict(metadata), sort_keys=True)
      for paths in NETWORK_PATHS.values():
        for group, values in groups.items():
          vars_group = f.create_group(f"{paths[0]}/{group}/vars")
          for i, value in enumerate(values):
            vars_group.create_dataset(str(i), data=np.ascontiguousarray(value, np.float32))
      norm = f.create_group(NORMALIZER_PATHS[0])
      norm.create_dataset("0", data=np.asarray(normalizer["mean"], np.float32))
      norm.create_dataset("1", data=np.asarray(normalizer["variance"], np.float32))
      norm.create_dataset("2", data=np.int64(0))
  # HDF5 seeks and reads back while it writes: it builds the file in memory (a few MB), then the
  # bytes go to ``out`` as every other output does.
  content = files.buffer_writer(write_h5)
  weight_files.write_atomically(out, lambda f: f.write(content))
  return dict(metadata)
