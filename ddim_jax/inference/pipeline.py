"""Inference: a trained model from a workdir or a weight file, its noise conventions, batched sampling.

The commands ``sample``, ``figures``, ``invert``, ``interpolate``, ``evaluate`` and ``export`` get
their model here (``InferenceModel.from_workdir`` / ``from_weights``), and every random draw of
those commands follows one of the conventions below, so that a run can be reproduced:

- JAX keys (the default): batch ``b`` starting at image ``start`` draws its initial noise from
  ``split(fold_in(key(seed), start))[0]`` and, for eta > 0, its per-step draws from ``[1]``
  (``batch_keys``);
- NumPy (``--numpy-noise`` / ``--noise-file``): the initial noise is
  ``default_rng(seed).standard_normal((N, H, W, C), float32)`` (``numpy_noise``) and the eta > 0
  draws come, batch after batch, from ``default_rng(seed + 1)`` (``numpy_step_noise_generator``).
  ``ddim_torch_ref.sample`` draws the same numbers (its own copy: the twin imports no JAX; a test
  checks that the two agree).
"""

import dataclasses
import functools
import warnings
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from ddim_jax import configs, data, errors, files
from ddim_jax.core import models, sampling, schedules, solvers, step as step_lib
from ddim_jax.inference import sharded
from ddim_jax.infra import checkpointing, object_store, parallel
from ddim_jax.interop import weight_files
from ddim_jax.infra import workdir as workdir_lib


def numpy_noise(seed: int, shape) -> np.ndarray:
  """Initial noise drawn in NumPy (``--numpy-noise``): the same numbers in both twins' CLIs."""
  return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def numpy_step_noise_generator(seed: int) -> np.random.Generator:
  """The generator of eta > 0 per-step draws under ``--numpy-noise``/``--noise-file``: seed + 1.

  Each batch then draws (steps, batch, H, W, C) from it, in batch order (as ``ddim_torch_ref.sample``).
  """
  return np.random.default_rng(seed + 1)


def batch_keys(seed: int, start: int) -> tuple[jax.Array, jax.Array]:
  """(noise_key, step_key) of the batch whose first image is number ``start`` (JAX-key convention)."""
  noise_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), start))
  return noise_key, step_key


def batch_noise(seed: int, start: int, shape) -> jax.Array:
  """The initial noise (B, H, W, C) of the batch starting at image ``start`` (JAX-key convention)."""
  return jax.random.normal(batch_keys(seed, start)[0], tuple(shape))


def load_noise_file(path: str, num: int, image_shape) -> np.ndarray:
  """The first ``num`` initial noises of an NHWC float32 .npy file of images shaped ``image_shape``.

  Raises:
    errors.MissingInputError: no such file.
    errors.InputError: not a regular .npy file of one floating-point array (an .npz archive, a pickle,
      an object array, text), another shape, fewer than ``num`` noises, or NaN/inf among them.
  """
  need = f"np.save a float32 array of shape (N >= {num}, {', '.join(map(str, image_shape))}) (NHWC)"
  if "://" in path:
    if not epath.Path(path).exists():
      raise errors.MissingInputError(f"--noise-file {path!r} does not exist; {need}")
  else:
    try:  # opened without blocking and checked with fstat: a FIFO or a device is refused, never waited on
      with files.open_regular(path, "--noise-file"):
        pass
    except errors.MissingInputError:
      raise errors.MissingInputError(f"--noise-file {path!r} does not exist; {need}") from None
    except files.UnsafePathError:
      raise errors.InputError(f"--noise-file {path!r} is not a regular file; {need}") from None
  try:
    noise = np.load(path, mmap_mode="r", allow_pickle=False)  # mapped: only the first num rows are read
  except (ValueError, OSError, EOFError) as e:
    why = "it holds pickled Python objects, which are not loaded" if "object" in str(e).lower() else str(e)
    raise errors.InputError(f"--noise-file {path!r} is not a readable .npy array ({why}); {need}") from None
  if not isinstance(noise, np.ndarray):  # an .npz archive
    noise.close()
    raise errors.InputError(f"--noise-file {path!r} is an .npz archive, not one .npy array; {need}")
  if not np.issubdtype(noise.dtype, np.floating):
    raise errors.InputError(f"--noise-file {path!r} holds {noise.dtype} values, not floating point; {need}")
  if noise.ndim != 4 or noise.shape[1:] != tuple(image_shape) or len(noise) < num:
    raise errors.InputError(f"--noise-file {path!r} holds shape {noise.shape}; need (N >= {num}, "
                            f"{', '.join(map(str, image_shape))}) (NHWC float32)")
  noise = np.array(noise[:num], dtype=np.float32)
  if not np.all(np.isfinite(noise)):
    raise errors.InputError(f"--noise-file {path!r} holds {int(np.sum(~np.isfinite(noise)))} NaN or inf values "
                            f"among its first {num} noises; {need} of finite standard normal draws")
  return noise


def initial_noise(seed: int, num: int, image_shape, noise_file: str | None = None,
                  use_numpy: bool = False) -> np.ndarray | None:
  """The initial noise of ``--noise-file`` (NHWC .npy) or ``--numpy-noise``; None: JAX keys (``batch_keys``)."""
  if noise_file:
    return load_noise_file(noise_file, num, image_shape)
  if use_numpy:
    return numpy_noise(seed, (num,) + tuple(image_shape))
  return None


def interpolation_noise(seed: int, num: int, image_shape, noise_file: str | None = None,
                        use_numpy: bool = False) -> np.ndarray:
  """The ``num`` end-point noises of ``interpolate`` (pair p: rows 2p, 2p + 1): those of ``initial_noise``,
  or else one JAX draw of ``key(seed)`` (not ``batch_keys``: the pairs are no batch of images)."""
  noise = initial_noise(seed, num, image_shape, noise_file, use_numpy)
  if noise is None:
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (num,) + tuple(image_shape)))
  return noise


def sample_images(model, variables, normalizer, num_images: int, image_size: int, steps: int, eta: float, seed: int,
                  batch_size: int, spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC,
                  initial_noise=None, sampler: solvers.Sampler = solvers.DDIM) -> np.ndarray:
  """Generates ``num_images`` images in batches (with a progress bar); returns (N, H, W, C) in [0, 1].

  Without ``initial_noise`` each batch's noise (and eta > 0 draws) come from ``batch_keys``; with
  it (N, H, W, C) (``--numpy-noise``, ``--noise-file``) the eta > 0 draws come from
  ``numpy_step_noise_generator(seed)``, so that the torch twin can reproduce the run.

  Each batch is split over this process's devices (``sharded.generate``: the most that divide it),
  giving the images of one device (tested to 1e-6). ``sampler``: DDIM (default) or DPM-Solver++(2M).
  """
  sampler.check(spec, eta)
  step_rng = numpy_step_noise_generator(seed) if initial_noise is not None else None
  out = []
  devices = sharded.devices_for(min(batch_size, num_images))
  with tqdm(total=num_images, desc=f"sampling ({sampler.describe()}, {steps} steps, {devices} device{'s' * (devices > 1)})",
            unit="img",
            disable=True if num_images <= batch_size else None) as bar:  # None: off when stderr is no terminal
    for start in range(0, num_images, batch_size):
      n = min(batch_size, num_images - start)
      noise_key, step_key = batch_keys(seed, start)
      step_noises = None
      if initial_noise is not None:
        noise = np.asarray(initial_noise[start:start + n], np.float32)
        if eta > 0:
          step_noises = step_rng.standard_normal((steps,) + noise.shape, dtype=np.float32)
      else:
        noise = jax.random.normal(noise_key, (n, image_size, image_size, model.channels))
      out.append(sharded.generate(model, variables, noise, normalizer, steps=steps, spec=spec, eta=eta,
                                  step_noises=step_noises, key=step_key if eta > 0 and step_noises is None else None,
                                  sampler=sampler))
      bar.update(n)
  return np.concatenate(out)


def select_step(ckpt: checkpointing.Checkpointer, which: str | int | None = "latest") -> tuple[int, str]:
  """The checkpoint step that ``which`` names, and how it was chosen (for messages).

  Args:
    ckpt: the workdir's checkpoints, opened with ``best_metric=checkpointing.BEST_METRIC``.
    which: "latest" (or None), "best" (``ckpt.best_step()``: the lowest ``val_kid`` that training logged,
      ties to the earlier step) or a step number.

  Raises:
    errors.MissingInputError: no checkpoint, or none of that step.
    errors.ConfigError: ``which`` is none of the above, or "best" where no checkpoint has a KID.
  """
  steps = ckpt.all_steps()
  if not steps:
    raise errors.MissingInputError(f"{ckpt.directory} holds no complete checkpoint; train first")
  which = "latest" if which is None else str(which).strip()
  if which == "latest":
    return steps[-1], "latest"
  if which == "best":
    best = ckpt.best_step()
    if best is None:
      raise errors.ConfigError(
          f"--checkpoint best: none of the checkpoints in {ckpt.directory} (steps {steps}) has a KID; training "
          "computes one every train.kid_every steps when Inception weights are available (eval.inception_weights). "
          "Use --checkpoint latest or a step number")
    return best, f"best: {ckpt.best_metric} {float(ckpt.metrics(best)[ckpt.best_metric]):.5f}"
  try:
    step = int(which)
  except ValueError:
    raise errors.ConfigError(f"--checkpoint {which!r}: use latest, best or a step number") from None
  if step not in steps:
    folder = epath.Path(ckpt.directory) / str(step)
    if folder.exists():  # a folder of that name that is no checkpoint (a user's, a partial copy)
      raise errors.MissingInputError(f"{folder} is not a checkpoint (orbax did not write it); the checkpoints there "
                                     f"are steps {steps}")
    raise errors.MissingInputError(f"no checkpoint of step {step} in {ckpt.directory}; it holds steps {steps}")
  return step, f"step {step}"


def restore_checkpoint(workdir: str, ema: bool = True, step: str | int | None = "latest"):
  """(model, variables, normalizer, config, step) of a checkpoint in ``workdir`` (on one device).

  ``step``: "latest" (the newest that restores), "best" (lowest KID) or a step number
  (``select_step``). ``variables`` are the EMA weights (default) or the raw ones, as NumPy.
  ``workdir`` may be a bucket (``gs://...``): it is read through ``etils.epath``, as orbax does.
  """
  return restore_checkpoint_described(workdir, ema, step)[:5]


def restore_checkpoint_described(workdir: str, ema: bool = True, step: str | int | None = "latest"):
  """``restore_checkpoint`` plus how the step was chosen ("latest", "best: val_kid ...", "step N")."""
  workdir = workdir_lib.check_location(workdir)
  # A bucket that cannot be reached (credentials, network, no such bucket) is one line within seconds; unchecked,
  # epath's backends retry for up to minutes and then find "no checkpoints".
  object_store.check_access(workdir)
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise errors.MissingInputError(f"no checkpoints in {workdir!r} (expected {directory}); train first with "
                                   f"`ddim-jax train --workdir {workdir}`")
  with warnings.catch_warnings():
    if str(step).strip().isdigit():  # select_step's one error line names a folder of that name that is no step
      warnings.filterwarnings("ignore", message=rf".*/{int(step)} is not a checkpoint",
                              category=checkpointing.ForeignFolderWarning)
    # A reader: opens the checkpoints read-only (a live trainer may be writing the next step).
    with checkpointing.Checkpointer(directory, best_metric=checkpointing.BEST_METRIC, async_save=False,
                                    read_only=True) as ckpt:
      chosen, how, state, meta = _restore_selected(ckpt, step)
  config = ml_collections.ConfigDict(meta["config"])
  model = models.create_model(**config.model)
  normalizer = {k: np.asarray(v, np.float32) for k, v in meta["normalizer"].items()}
  return model, jax.device_get(state.variables(ema=ema)), normalizer, config, chosen, how


def _restore_selected(ckpt: checkpointing.Checkpointer, step: str | int | None):
  """(step, how, state, meta) of the checkpoint ``step`` selects (``select_step``) in a reader's ``ckpt``."""
  chosen, how = select_step(ckpt, step)
  # Each step is read with the model of its own config (from its metadata, checked against its digest):
  # a damaged or edited newest step then never decides how the older ones are read.
  if how == "latest":  # the newest step that restores; each step passed over is one warning line
    restored = ckpt.restore_newest(_abstract_state_of)
    if restored is None:  # the steps select_step saw are gone (a trainer's retention deleted them)
      raise errors.MissingInputError(f"{ckpt.directory} holds no complete checkpoint any more; train first")
    chosen, state, meta = restored
    return chosen, how, state, meta
  try:
    state, meta = ckpt.restore_chosen(chosen, _abstract_state_of)
  except checkpointing.CheckpointError as e:
    raise type(e)(f"--checkpoint {step}: {e}; --checkpoint latest takes the newest step that restores") from e
  return chosen, how, state, meta


def _abstract_state_of(meta: dict):
  """The abstract train state (on the first device) of a checkpoint's ``meta``: its config's model."""
  config = ml_collections.ConfigDict(meta["config"])
  model = models.create_model(**config.model)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return step_lib.abstract_train_state(model, step_lib.StepConfig.from_config(config), int(config.model.image_size),
                                       jax.random.key(0), sharding)


def export_weights(workdir: str, out: str, raw: bool = False, step: str | int | None = "latest") -> tuple[int, str]:
  """Writes a checkpoint's EMA (or, ``raw``, its raw) weights to the safetensors weight file ``out``.

  Returns ``(step, how)``: the step written and how it was chosen (``restore_checkpoint_described``).
  """
  model, variables, normalizer, config, chosen, how = restore_checkpoint_described(workdir, ema=not raw, step=step)
  weight_files.save_weights(out, model, variables, normalizer, int(config.model.image_size),
                            schedules.DiffusionSpec.from_config(config), data=config.data,
                            weights="raw" if raw else "ema", step=chosen,
                            **solvers.Sampler.from_config(config.sample).record())
  return chosen, how


def load_model(workdir: str | None = None, weights: str | None = None, config: str | None = None,
               cpu_devices: str | int | None = None, step: str | int | None = None,
               overrides: Sequence[str] = ()) -> "InferenceModel":
  """The model of a workdir's checkpoint (EMA) or of a weight file (exactly one of the two).

  ``step`` (workdir only): "latest" (default), "best" or a step number (``select_step``).
  ``config`` and ``overrides`` (``--config.data.*``): where the model's real images are
  (``data_config_of_weights``; with a workdir, overrides of the run's own ``config.data``).
  ``cpu_devices`` ("auto": one per core, or a count): the JAX CPU devices that sampling, inversion
  and KID split their batches over (set before the backend starts; no effect on GPU/TPU).
  """
  if bool(workdir) == bool(weights):
    raise errors.ConfigError("give exactly one of a workdir (--workdir) and a weight file (--weights)")
  if weights and step not in (None, "latest"):
    raise errors.ConfigError("--checkpoint chooses a checkpoint of a --workdir; a weight file holds one step")
  if cpu_devices is not None:
    parallel.configure_cpu_devices(cpu_devices, None)
  if workdir:
    if config is not None:
      raise errors.ConfigError("--config is for a weight file; a --workdir's images are its run's config.data "
                               "(change where they are with --config.data.* overrides)")
    return InferenceModel.from_workdir(workdir, step, overrides)
  return InferenceModel.from_weights(weights, config, overrides)


DATA_OVERRIDE = "--config.data."


def data_overrides(overrides: Sequence[str]) -> list[str]:
  """``overrides`` if every one is ``--config.data.*`` (the only config the inference commands read)."""
  other = [o for o in overrides if not o.startswith(DATA_OVERRIDE)]
  if other:
    raise errors.ConfigError(f"unexpected argument {other[0]!r}: these commands take only --config.data.* "
                             "overrides (where the real images are)")
  return list(overrides)


def data_config_of_weights(path: str, recorded: dict | None, config: str | None = None,
                           overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The ``config.data`` of a weight file's real images.

  The data the file records (``weight_files.data_from_metadata``), on top of the preset of that
  dataset (demo for the bundled digits, else default), then ``overrides``; or, with ``config`` (a
  preset or file), that config's data. A file that records none needs ``config``.
  """
  overrides = data_overrides(overrides)
  if config is not None:
    return configs.load_config(config, overrides).data
  if recorded is None:
    raise errors.ConfigError(
        f"{path} does not record the data it was trained on (a file written before ddim-jax recorded it, or by "
        "other code): say where its real images are with --config PRESET_OR_FILE (demo: the bundled digits; "
        "default: Oxford Flowers 102) and --config.data.* overrides (e.g. --config.data.dataset=folder "
        "--config.data.folder=DIR)")
  base = configs.load_config("demo" if recorded["dataset"] == "digits" else "default")
  for key, value in recorded.items():
    base.data[key] = value
  return configs.apply_overrides(base, overrides).data


@dataclasses.dataclass
class InferenceModel:
  """A model to sample from, with what the commands need to know about it.

  Attributes:
    model, variables, normalizer: the UNet, its (EMA) variables (NumPy) and the data normaliser.
    image_size: training image side.
    spec: the diffusion (schedule, signal-rate bounds, target) the model was trained with.
    data_source: the ``config.data`` of the real images, or a function that returns it (a weight file's:
      resolved on first use, since sampling needs no data); read it as ``data_config``.
    description: for messages.
    step: the training step of the weights, when known.
    sampler: the sampler of its run's sample grids and KID (``config.sample``, or what a weight file
      records): the commands' default.
  """
  model: Any
  variables: Any
  normalizer: dict
  image_size: int
  spec: schedules.DiffusionSpec
  data_source: Any
  description: str
  step: int | None = None
  sampler: solvers.Sampler = solvers.DDIM

  @property
  def data_config(self) -> ml_collections.ConfigDict:
    """The ``config.data`` of the model's real images (the run's, or the one a weight file records)."""
    if callable(self.data_source):
      self.data_source = self.data_source()
    return self.data_source

  @classmethod
  def from_workdir(cls, workdir: str, step: str | int | None = "latest",
                   overrides: Sequence[str] = ()) -> "InferenceModel":
    """The EMA weights of a checkpoint of a training workdir (``step``: see ``select_step``)."""
    model, variables, normalizer, config, step, how = restore_checkpoint_described(workdir, step=step)
    configs.apply_overrides(config, data_overrides(overrides))
    chosen = "" if how == f"step {step}" else f", {how}"
    return cls(model, variables, normalizer, int(config.model.image_size), schedules.DiffusionSpec.from_config(config),
               config.data, f"{workdir} step {step} (EMA{chosen})", step, solvers.Sampler.from_config(config.sample))

  @classmethod
  def from_weights(cls, path: str, config: str | None = None, overrides: Sequence[str] = ()) -> "InferenceModel":
    """A weight file; its real images are the data it records (``data_config_of_weights``).

    The data is resolved when first needed (``data_config``): sampling needs none.
    """
    model, variables, normalizer, metadata = weight_files.load_weights(path)  # every metadata key validated
    recorded = weight_files.data_from_metadata(metadata)
    return cls(model, variables, normalizer, weight_files.image_size_from_metadata(metadata),
               schedules.DiffusionSpec.from_metadata(metadata),
               functools.partial(data_config_of_weights, path, recorded, config, overrides),
               f"{path} ({metadata.get('weights', 'unknown')} weights)", weight_files.step_from_metadata(metadata),
               weight_files.sampler_from_metadata(metadata))

  @property
  def channels(self) -> int:
    return int(self.model.channels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def real_images(self, split: str, num: int | None = None, start: int = 0) -> np.ndarray:
    """Real images of ``split`` (uint8 (N, S, S, C)) from the input pipeline's cache."""
    images = data.load_split(self.data_config, split, self.image_size)
    if images.shape[-1] != self.channels:
      raise errors.ConfigError(
          f"the {self.data_config.dataset!r} images have {images.shape[-1]} channels, the model of "
          f"{self.description} takes {self.channels}: give the data it was trained on (--config, --config.data.*)")
    return np.asarray(images[start:None if num is None else start + num])

  def first_noise(self, seed: int, num: int, num_images: int, batch_size: int) -> jax.Array:
    """The JAX-key initial noise of the first ``num`` images of ``sample(num_images, ..., seed, batch_size)``.

    (A draw of the whole first batch, then sliced: the first rows of a larger draw are other numbers.)
    """
    return batch_noise(seed, 0, (min(batch_size, num_images),) + self.image_shape)[:num]

  def choose_sampler(self, name: str | None = None, time_grid: str | None = None) -> solvers.Sampler:
    """The sampler ``name`` on ``time_grid``, each ``self.sampler``'s when None (the model's run's)."""
    sampler = solvers.Sampler(name or self.sampler.name, time_grid or self.sampler.time_grid)
    sampler.check(self.spec)
    return sampler

  def sample(self, num_images: int, steps: int, eta: float = 0.0, seed: int = 0, batch_size: int = 64,
             initial_noise=None, sampler: solvers.Sampler = solvers.DDIM) -> np.ndarray:
    """``sample_images`` with this model (``sampler``: DDIM by default, or DPM-Solver++(2M))."""
    return sample_images(self.model, self.variables, self.normalizer, num_images, self.image_size, steps, eta, seed,
                         batch_size, self.spec, initial_noise=initial_noise, sampler=sampler)

  def interpolate(self, pairs: int, num_frames: int, steps: int, seed: int = 0, noise_file: str | None = None,
                  use_numpy: bool = False) -> list[np.ndarray]:
    """The rows of ``interpolate``: per pair of ``interpolation_noise``, the (num_frames, H, W, C) images of
    their spherical interpolation at evenly spaced weights 0..1 (each row split over this process's devices)."""
    noise = interpolation_noise(seed, 2 * pairs, self.image_shape, noise_file, use_numpy)
    weights = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
    return [sharded.generate(self.model, self.variables, sampling.slerp(noise[2 * p], noise[2 * p + 1], weights),
                             self.normalizer, steps=steps, spec=self.spec) for p in range(pairs)]
