"""The weights that parity compares: every tensor perturbed, or the torch twin briefly trained.

Forward comparisons need non-trivial weights (a fresh model's zero head would make them vacuous):
``perturbed_variables``. Trajectories need a trained model (a random U-Net's DDIM trajectory grows
by up to 1/min_signal_rate per step): ``trained_reference``, trained by the torch twin on the
bundled digits and converted, and ``cached_trained_reference``, the same numbers kept as a
safetensors file keyed by everything they depend on. torch is imported inside the functions.
"""

import functools
import hashlib
import inspect
import json
import os

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as safetensors_numpy
from safetensors.numpy import load_file

from ddim_jax import data, errors, files
from ddim_jax.core import models
from ddim_jax.interop import weight_files
from ddim_jax.interop.parity import batch_statistics, nchw, no_timer


def _init_key(model, image_size: int, seed: int) -> dict:
  """What ``models.init_variables`` values depend on: the model, the size, the seed, JAX and models.py."""
  with open(inspect.getsourcefile(models), "rb") as f:
    code = hashlib.sha256(f.read()).hexdigest()[:16]
  return {**weight_files.model_metadata(model, image_size), "dtype": str(model.dtype), "seed": seed,
          "jax": jax.__version__, "backend": jax.default_backend(), "code": code}


def initial_variables(model, image_size: int, seed: int = 0, cache_dir: str = "", timer=no_timer) -> dict:
  """``models.init_variables`` (jitted, key ``seed``) as NumPy arrays; kept in ``cache_dir`` when given.

  Compiling the init is the slowest compile of a forward comparison (~40 s for the full U-Net on
  this 2-core CPU: XLA:CPU and the threefry draws of every parameter). With ``cache_dir`` the
  values are written once to a safetensors file keyed by ``_init_key`` (JAX version and backend
  included) and read back bit for bit; '' (the default) computes them every time.
  """
  key = _init_key(model, image_size, seed)
  path = None
  if cache_dir:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"init_{model.variant}_{image_size}_{digest}.safetensors")
    try:
      flat = {}
      if os.path.exists(path):
        with timer("JAX init: read cache"):
          flat = load_file(path)
      if flat.pop("__key__", np.zeros(0, np.uint8)).tobytes().decode() == json.dumps(key, sort_keys=True):
        variables = {}
        for name, value in flat.items():
          *parents, leaf = name.split("/")
          node = variables
          for parent in parents:
            node = node.setdefault(parent, {})
          node[leaf] = value
        return variables
    except (OSError, SafetensorError, UnicodeDecodeError):
      pass  # unreadable: computed and rewritten below
  # A fixed matmul precision (init has no matmul): one compile per process, whatever the caller's.
  with timer("JAX compile + run: init"), jax.default_matmul_precision(None):
    variables = jax.tree.map(np.asarray, jax.jit(models.init_variables, static_argnums=(0, 2))(
        model, jax.random.key(seed), image_size))
  if path:
    flat = {"/".join(str(k.key) for k in p): np.ascontiguousarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    flat["__key__"] = np.frombuffer(json.dumps(key, sort_keys=True).encode(), np.uint8)
    try:
      files.ensure_parent(path)
      files.replace_file(path, safetensors_numpy.save(flat))
    except (OSError, errors.Error):
      pass  # an unwritable cache (or something else at its path) costs the next run a compile, nothing else
  return variables


def perturbed_variables(model, image_size: int, seed: int = 0, scale: float = 0.3, timer=no_timer,
                        cache_dir: str = "") -> dict:
  """Initialised variables with EVERY tensor perturbed, for forward comparisons.

  Kernels get noise of ``scale`` times their init's standard deviation (the zero-initialised head
  gets a fan-in scaled kernel, so predictions are O(1) and non-zero), biases and BN affine
  parameters noise of 0.1, and BatchNorm statistics are the batch statistics of a calibration
  batch (so eval-mode activations stay O(1), as in a trained model) jittered by 10%. ``cache_dir``:
  see ``initial_variables`` (the same numbers with or without it).
  """
  rng = np.random.default_rng(seed)
  variables = initial_variables(model, image_size, seed, cache_dir, timer)

  def perturb(path, x):
    leaf = getattr(path[-1], "key", "")
    if leaf == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      std = max(float(np.std(x)), 1.0 / np.sqrt(fan_in))
      return (x + scale * std * rng.standard_normal(x.shape)).astype(np.float32)
    if leaf == "scale":
      return (x * rng.uniform(0.8, 1.2, x.shape)).astype(np.float32)
    return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
  images = rng.standard_normal((8, image_size, image_size, model.channels)).astype(np.float32)
  noise_variances = rng.uniform(0.05, 1.0, (8, 1, 1, 1)).astype(np.float32)
  stats = batch_statistics(model, {"params": params, "batch_stats": variables["batch_stats"]}, images,
                           noise_variances, timer)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.asarray(s) * (rng.uniform(0.9, 1.1, s.shape) if getattr(path[-1], "key", "") == "var"
                                        else 1.0) + (0.1 * rng.standard_normal(s.shape) if getattr(
                                            path[-1], "key", "") == "mean" else 0.0)).astype(np.float32), stats)
  return {"params": params, "batch_stats": stats}


def load_digits_images(image_size: int) -> np.ndarray:
  """scikit-learn's bundled digits (1,797 8x8 images) as uint8 RGB (N, S, S, 3), bilinear-upsampled."""
  return data.load_digits_images(image_size)


@functools.lru_cache(maxsize=4)
def trained_reference(variant: str = "keras", widths=(16, 32, 48), block_depth: int = 2, image_size: int = 16,
                      num_steps: int = 300, batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0):
  """Trains the torch twin briefly on the bundled digits: a model whose DDIM trajectories stay bounded.

  Deterministic on CPU for a given seed. Takes seconds at the default (16x16, widths 16/32/48).

  Returns:
    (jax_model, jax_variables, normalizer): the trained weights converted to Flax, and the data
    normaliser {'mean', 'variance'} of the digits.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import models as torch_models  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import schedules as torch_schedules  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import step as torch_step  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  data = load_digits_images(image_size).astype(np.float32) / 255.0
  normalizer = {"mean": data.mean(axis=(0, 1, 2)).astype(np.float32), "variance": data.var(axis=(0, 1, 2)).astype(
      np.float32)}
  normalized = (data - normalizer["mean"]) / np.sqrt(normalizer["variance"])
  images = torch.from_numpy(nchw(normalized))
  twin = torch_models.create_model(variant=variant, widths=widths, block_depth=block_depth)
  optimizer = torch_step.make_optimizer(twin, learning_rate)
  schedule_fn = torch_schedules.get_schedule("cosine")
  rng = np.random.default_rng(seed)
  for step in range(num_steps):
    idx = rng.choice(len(images), batch_size, replace=False)
    noises = torch.from_numpy(rng.standard_normal((batch_size,) + tuple(images.shape[1:])).astype(np.float32))
    times = torch.from_numpy(rng.uniform(0.0, 1.0, (batch_size, 1, 1, 1)).astype(np.float32))
    torch_step.train_step(twin, optimizer, None, step, images[idx], noises, times, schedule_fn)
  model = models.create_model(variant=variant, widths=widths, block_depth=block_depth)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_size))
  variables = weight_files.torch_state_dict_to_flax(twin.state_dict(), reference)
  return model, variables, normalizer


FIXTURE_CACHE_ENV = "DDIM_JAX_PARITY_CACHE"


def default_fixture_cache() -> str:
  """The folder of the cached trained references: $DDIM_JAX_PARITY_CACHE, else ~/.cache/ddim_jax/parity."""
  return os.environ.get(FIXTURE_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ddim_jax", "parity")


def fixture_key(variant: str = "keras", **kwargs) -> dict:
  """What a trained reference depends on: ``trained_reference``'s arguments, the versions of torch
  and NumPy, and a digest of the code that trains it (``trained_reference``, the torch twin's
  models / train / schedules modules, the digits loader's functions)."""
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import models as torch_models  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import schedules as torch_schedules  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import step as torch_step  # pylint: disable=import-outside-toplevel
  bound = inspect.signature(trained_reference.__wrapped__).bind(variant, **kwargs)
  bound.apply_defaults()
  digest = hashlib.sha256()
  loader = inspect.getmodule(data.load_digits_images)
  for function in (trained_reference.__wrapped__, loader.load_digits_images, loader.resize_weights, loader.quantize):
    digest.update(inspect.getsource(function).encode())
  for module in (torch_models, torch_schedules, torch_step):
    with open(inspect.getsourcefile(module), "rb") as f:
      digest.update(f.read())
  return {**{k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()},
          "torch": torch.__version__, "numpy": np.__version__, "code": digest.hexdigest()[:16]}


def cached_trained_reference(variant: str = "keras", cache_dir: str | None = None, timer=no_timer, **kwargs):
  """``trained_reference``, kept as a safetensors weight file keyed by ``fixture_key``.

  A file with the same key is read instead of training again (the same float32 numbers: the file
  holds them bit for bit); a missing, foreign or unreadable file is (re)written. ``cache_dir`` None
  is ``default_fixture_cache()``; an empty string turns the cache off.

  Returns:
    (model, variables, normalizer, info), info = {"source": "cache" or "trained", "path": the file
    or None, "key": the key}.
  """
  key = fixture_key(variant, **kwargs)
  name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  cache_dir = default_fixture_cache() if cache_dir is None else cache_dir
  path = os.path.join(cache_dir, f"trained_{variant}_{key['num_steps']}steps_{name}.safetensors") if cache_dir else None
  if path and os.path.exists(path):
    try:
      with timer("torch fixture: read cache"):
        model, variables, normalizer, metadata = weight_files.load_weights(path, variant=variant)
      if json.loads(metadata.get("parity_fixture", "null")) == key:
        return model, variables, normalizer, {"source": "cache", "path": path, "key": key}
    except (weight_files.WeightFileError, ValueError):
      pass  # retrained and rewritten below
  with timer(f"torch fixture: training ({key['num_steps']} steps)"):
    model, variables, normalizer = trained_reference(variant, **kwargs)
  info = {"source": "trained", "path": path, "key": key}
  if path:
    try:
      weight_files.save_weights(path, model, variables, normalizer, key["image_size"], weights="raw",
                           parity_fixture=json.dumps(key, sort_keys=True))
    except errors.Error as e:  # an unwritable cache costs the next run a training, nothing else
      info.update(path=None, cache_error=str(e))
  return model, variables, normalizer, info
