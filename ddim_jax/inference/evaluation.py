"""Evaluation of a trained model's samples: KID and FID against real images, or the digits metric.

KID follows the Keras example (its ``KID`` metric, updated per validation batch in ``test_step``):
each batch of real (validation) images is paired with a batch of as many generated images, the
per-batch unbiased MMD^2 of their Inception features is averaged with equal weight
(``metrics.KIDAccumulator``). Generated batch i always starts from the noise of
``fold_in(key(seed), i)``, so the KID of several step counts (or of successive epochs during
training) is measured on the same real batches AND the same noises: the differences between them
are not sampling noise. FID compares the Gaussian fits of the same features (pytorch-fid).

The real images' features depend only on the data and the Inception weights: they are computed once
and kept in the data cache entry (``features/``), read back by every later evaluation (``evaluate``,
and KID during single-process training; a multi-process run computes them once per run in memory).

The command ``evaluate`` calls one function (``evaluate_model``): the model is loaded, measured,
and the results come back as a record that the command prints (and writes as JSON). DDIM
inversion (``ddim-jax invert``) is ``inversion``.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from ddim_jax import data, errors, files
from ddim_jax.core import rng, sampling, schedules
from ddim_jax.inference import pipeline, sharded
from ddim_jax.infra import checkpointing
from ddim_jax.quality import digits_metric, inception, inception_weights, metrics

FeatureFn = Callable[[Any], Any]
DIGITS_METRIC_IMAGES = 500  # samples of `evaluate`'s digits metric by default


def parse_step_counts(text: str) -> list[int]:
  """"10,20,50" -> [10, 20, 50] (``--steps`` of ``invert`` and ``evaluate``); a ValueError says what is wrong."""
  try:
    steps = [int(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise errors.ConfigError(f"--steps {text!r}: expected comma-separated integers such as 10,20,50") from e
  if not steps or min(steps) < 1:
    raise errors.ConfigError(f"--steps {text!r}: expected positive step counts")
  return steps


def write_json(path: str, record: dict) -> str:
  """Writes ``record`` as indented JSON to ``path`` (unless ``path`` is "-"); returns the JSON text."""
  text = json.dumps(record, indent=2, sort_keys=True)
  if path != "-":
    files.ensure_parent(path, "--json")
    files.replace_text(path, text + "\n", "--json")
  return text


@functools.lru_cache(maxsize=4)
def kid_feature_fn(weights_path: str, image_size: int) -> FeatureFn:
  """The (jitted) Inception feature function of a weights file, built once per process.

  Cached so that KID every epoch, or over several step counts, compiles InceptionV3 once (about
  as long as a few hundred training steps on a CPU).
  """
  model, variables = inception_weights.load_inception_weights(weights_path)
  return inception.feature_extractor(model, variables, image_size)


def resolve_inception_weights(path: str | None) -> str:
  """The Inception weights file to use (``path`` or the torch hub cache); FileNotFoundError if none."""
  return inception_weights.find_inception_weights(path)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def reference_features_file(data_config, image_size: int, inception_weights: str, feature_image_size: int,
                            num_images: int) -> str:
  """Where the features of the first ``num_images`` validation images live in the data cache entry.

  The name holds all they depend on beyond the entry (the data and its image size): the Inception
  weights (their SHA-256), its input side and the number of images.
  """
  stat = os.stat(inception_weights)
  digest = _file_digest(os.path.abspath(inception_weights), stat.st_size, stat.st_mtime_ns)
  entry = data.prepare_cache(data_config, image_size)
  return os.path.join(entry.path, "features",
                      f"validation-{num_images}-inception-{digest}-{feature_image_size}px.npy")


def reference_features(real_images, feature_fn: FeatureFn, batch: int, mesh=None,
                       cache_file: str | None = None) -> np.ndarray:
  """Features of the whole ``batch``-sized batches of ``real_images``: (num_batches * batch, d) float32.

  Read from ``cache_file`` when it holds them; computed (each batch split over ``mesh``) and written
  there otherwise. A cache that cannot be written is said once and skipped: the features are
  still returned.
  """
  used = len(real_images) // batch * batch
  if cache_file is not None and os.path.exists(cache_file):
    try:
      with files.open_regular(cache_file, follow=False) as f:
        features = np.load(f, allow_pickle=False)
      if features.ndim == 2 and len(features) == used and features.dtype == np.float32:
        return features
    except (OSError, ValueError, EOFError, errors.Error):
      pass  # damaged (or not a file of ours): computed again and rewritten below
  real_images = data.unit_float(real_images)
  features = np.concatenate([np.asarray(sharded.map_rows(feature_fn, real_images[i:i + batch], mesh), np.float32)
                             for i in range(0, used, batch)])
  if cache_file is not None:
    try:
      files.ensure_folder(os.path.dirname(cache_file))
      files.replace_file(cache_file, lambda f: np.save(f, features))
    except errors.Error as e:
      warnings.warn(f"the real images' Inception features were not cached in {cache_file} ({e}); they are computed "
                    "again next time", stacklevel=2)
  return features


def kid_batch_size(num_images: int, batch_size: int) -> int:
  """The KID batch: ``batch_size``, or all the images when there are fewer (at least 2 are needed)."""
  if num_images < 2:
    raise errors.InputError(f"KID needs at least 2 real images, got {num_images}")
  return min(batch_size, num_images)


def kid_for_steps(model, variables, normalizer: Mapping[str, Any], real_images, feature_fn: FeatureFn,
                  steps_list: Sequence[int], **kwargs) -> dict[int, float]:
  """``quality_for_steps`` without FID: {steps: KID}."""
  results = quality_for_steps(model, variables, normalizer, real_images, feature_fn, steps_list, fid=False, **kwargs)
  return {steps: values["kid"] for steps, values in results.items()}


def quality_for_steps(model, variables, normalizer: Mapping[str, Any], real_images, feature_fn: FeatureFn,
                      steps_list: Sequence[int], *, batch_size: int = 64, seed: int = 0, progress: bool = False,
                      spec: schedules.DiffusionSpec = sampling.DEFAULT_SPEC, mesh=None,
                      fid: bool = True, real_features: np.ndarray | None = None) -> dict[int, dict[str, float]]:
  """KID (and FID) of EMA samples against ``real_images`` for each step count (same batches, same noises).

  KID is the mean over paired batches (Keras); FID compares the Gaussian fits of all the real and
  all the generated features at once (pytorch-fid), of the same images: the real ones of the
  full batches and as many samples.

  Args:
    model, variables, normalizer: the UNet, its variables and the data normaliser.
    real_images: (N, H, W, C) uint8 or [0, 1] float; the partial last batch is dropped (Keras).
    feature_fn: images in [0, 1] -> (B, d) features (``kid_feature_fn``).
    steps_list: sampler step counts.
    batch_size: real (and generated) images per KID batch (Keras 64, R 128).
    seed: seed of the generated batches' noises.
    progress: show a progress bar.
    spec: the model's diffusion (schedule, signal-rate bounds, target).
    mesh: the devices to split each batch over when their number divides it (training: every
      device of every process); default, or when it does not divide: this process's devices.
    fid: also FID.
    real_features: the features of ``real_images``' whole batches (``reference_features``), when
      known; computed here otherwise.

  Returns:
    {steps: {"kid": KID, "fid": FID (when ``fid``)}}.
  """
  real_images = data.unit_float(real_images)
  batch = kid_batch_size(len(real_images), batch_size)
  num_batches = len(real_images) // batch
  shape = (batch,) + real_images.shape[1:3] + (int(model.channels),)
  key = jax.random.key(seed)
  # Every batch is split over the devices of ``mesh`` (by default the most of this process's that divide it).
  mesh = sharded.mesh_for(batch, mesh)
  variables, normalizer = sharded.replicate(variables, mesh), sharded.replicate(normalizer, mesh)
  # Real features once: they do not depend on the step count.
  if real_features is None:
    real_features = reference_features(real_images, feature_fn, batch, mesh)
  if len(real_features) != num_batches * batch:
    raise errors.InputError(f"{len(real_features)} real features for {num_batches} batches of {batch} images")
  all_real = real_features
  real_features = [all_real[i * batch:(i + 1) * batch] for i in range(num_batches)]
  results = {}
  for steps in steps_list:
    accumulator = metrics.KIDAccumulator()
    generated_features = []
    bar = tqdm(range(num_batches), desc=f"KID ({steps} steps, {mesh.size} devices)",
               disable=None if progress else True)  # None: only on a terminal (no carriage returns in logs)
    for i in bar:
      noise = jax.random.normal(jax.random.fold_in(key, i), shape)
      generated = sharded.generate(model, variables, noise, normalizer, steps=int(steps), spec=spec, mesh=mesh)
      generated_features.append(sharded.map_rows(feature_fn, generated, mesh))
      accumulator.update(real_features[i], generated_features[-1])
    results[int(steps)] = {"kid": accumulator.result()}
    if fid:
      results[int(steps)]["fid"] = metrics.fid_from_features(
          all_real, np.concatenate([np.asarray(f) for f in generated_features]))
  return results


# ------------------------------------------------------------------------------------------------
# KID during training.


FID_METRIC = "val_fid"  # beside checkpointing.BEST_METRIC (val_kid) in the training metrics


def make_training_kid(config, model, val_images, mesh=None) -> Callable | None:
  """The training loop's KID and FID: ``fn(variables, normalizer) -> {val_kid, val_fid}``, or None
  when KID is off (``config.eval.fid`` False: KID alone).

  KID is on when ``config.train.kid_every > 0`` and an Inception weights file is found
  (``config.eval.inception_weights`` or the torch hub cache); without one a single warning says
  how to get it and training goes on without KID. Settings: ``config.eval.kid_steps`` (Keras 5),
  ``kid_image_size`` (75 Keras, 299 R), ``num_kid_images`` (None: the whole validation split),
  ``kid_batch_size`` (64). The same noises are used at every evaluation. ``mesh``: the training
  mesh, over which each KID batch is split (see ``kid_for_steps``). The real images' features are
  computed at the first evaluation and kept (in the data cache too, when one process trains).
  """
  kid_every = int(config.train.get("kid_every", 0) or 0)
  if kid_every <= 0:
    return None
  eval_config = config.get("eval", {})
  try:
    weights = resolve_inception_weights(eval_config.get("inception_weights"))
  except FileNotFoundError as e:
    warnings.warn(f"KID during training is OFF (config.train.kid_every={kid_every}): {e}", stacklevel=2)
    return None
  image_size = int(eval_config.get("kid_image_size", 75))
  num = eval_config.get("num_kid_images")
  reals = val_images if num is None else val_images[:int(num)]
  feature_fn = kid_feature_fn(weights, image_size)
  batch_size = int(eval_config.get("kid_batch_size", 64))
  steps = int(eval_config.get("kid_steps", 5))
  spec = schedules.DiffusionSpec.from_config(config)
  seed = int(config.seed) + rng.KID_NOISE

  with_fid = bool(eval_config.get("fid", True))
  batch = kid_batch_size(len(reals), batch_size)
  # Several processes compute them together (every batch is split over all their devices): a file
  # that one process finds and another does not would leave the other alone in the collective.
  cache_file = (reference_features_file(config.data, int(config.model.image_size), weights, image_size,
                                        len(reals) // batch * batch) if jax.process_count() == 1 else None)
  reference = {}  # the real images' features, from the first evaluation on

  def evaluate(variables, normalizer) -> dict[str, float]:
    if "features" not in reference:
      reference["features"] = reference_features(reals, feature_fn, batch, mesh, cache_file)
    values = quality_for_steps(model, variables, normalizer, reals, feature_fn, [steps], batch_size=batch,
                               seed=seed, spec=spec, mesh=mesh, fid=with_fid,
                               real_features=reference["features"])[steps]
    return {checkpointing.BEST_METRIC: values["kid"], **({FID_METRIC: values["fid"]} if with_fid else {})}

  return evaluate


# ------------------------------------------------------------------------------------------------
# ``ddim-jax evaluate``: a model's KID, or its digits metric, per step count.


@dataclasses.dataclass
class KidEvaluation:
  """KID and FID of a model's EMA samples per step count (``evaluate_model`` with KID).

  Attributes:
    description: the model, for messages.
    kid: {steps: KID}.
    fid: {steps: FID} (the same samples and real images).
    steps: the step counts, as asked.
    num_images: the validation images used (whole batches).
    batch_size: images per KID batch.
    devices: the devices each batch is split over.
    image_size: the Inception input side (75 Keras, 299 R).
    inception_weights: the Inception weights file.
    checkpoint_step: the training step of the weights, when known.
    seed: the seed of the generated batches' noises.
    seconds: of the measurement (after loading the model).
  """
  description: str
  kid: dict[int, float]
  fid: dict[int, float]
  steps: list[int]
  num_images: int
  batch_size: int
  devices: int
  image_size: int
  inception_weights: str
  checkpoint_step: int | None
  seed: int
  seconds: float

  def record(self) -> dict:
    """The JSON record of ``evaluate --json``."""
    return {"kid": {str(k): v for k, v in self.kid.items()}, "fid": {str(k): v for k, v in self.fid.items()},
            "steps": self.steps, "num_images": self.num_images,
            "batch_size": self.batch_size, "image_size": self.image_size, "inception_weights": self.inception_weights,
            "checkpoint_step": self.checkpoint_step, "seed": self.seed, "seconds": self.seconds}


@dataclasses.dataclass
class DigitsEvaluation:
  """The digits metric of a model's EMA samples per step count, and its calibration points.

  Attributes:
    description: the model, for messages.
    scores: {steps: ``DigitsScore``}.
    calibration: the metric's calibration points (name -> ``DigitsScore``, best first).
    steps: the step counts, as asked.
    num_images: samples per step count (and images per calibration point).
    num_reference: the reference (validation) digits.
    feature_weights: the feature network's weights file.
    checkpoint_step: the training step of the weights, when known.
    seed: the seed of the samples.
    seconds: of the measurement (after loading the model).
  """
  description: str
  scores: dict[int, Any]
  calibration: Mapping[str, Any]
  steps: list[int]
  num_images: int
  num_reference: int
  feature_weights: str
  checkpoint_step: int | None
  seed: int
  seconds: float

  def record(self) -> dict:
    """The JSON record of ``evaluate --json``."""
    return {"metric": "digits", "steps": self.steps, "num_images": self.num_images,
            "reference_images": self.num_reference,
            **{key: {str(k): getattr(v, key) for k, v in self.scores.items()}
               for key in ("frechet_distance", "coverage")},
            "histogram": {str(k): list(v.histogram) for k, v in self.scores.items()},
            "calibration": [{"name": k, **v.to_json()} for k, v in self.calibration.items()],
            "feature_weights": self.feature_weights,
            "checkpoint_step": self.checkpoint_step, "seed": self.seed, "seconds": self.seconds}


def evaluate_model(workdir: str | None = None, weights: str | None = None, config: str | None = None,
                   cpu_devices: str | int | None = None, step: str | int | None = None,
                   overrides: Sequence[str] = (), *,
                   steps_list: Sequence[int], metric: str = "auto", num_images: int | None = None,
                   batch_size: int = 64, inception_weights: str | None = None, image_size: int = 75,
                   seed: int = 0) -> "KidEvaluation | DigitsEvaluation":
  """``ddim-jax evaluate``: the model of a workdir or weight file (``pipeline.load_model``), measured.

  Args:
    workdir, weights, config, cpu_devices, step, overrides: the model and its data (``pipeline.load_model``).
    steps_list: sampler step counts.
    metric: "kid", "digits", or "auto": the digits metric for a model of the bundled digits, else KID.
    num_images: KID: validation images (None: all); digits: samples (None: ``DIGITS_METRIC_IMAGES``).
    batch_size: KID: images per batch (Keras 64, R 128); digits: images per sampling call.
    inception_weights: KID: the Inception weights file (None: the torch hub cache).
    image_size: KID: the Inception input side (75 Keras, 299 R).
    seed: the seed of the samples' noises.

  Returns:
    A ``KidEvaluation`` or a ``DigitsEvaluation``.
  """
  if num_images is not None and num_images < 2:
    raise errors.ConfigError(f"--num-images {num_images}: the metrics compare sets of at least 2 images")
  source = pipeline.load_model(workdir, weights, config, cpu_devices, step, overrides)
  if metric == "digits" or (metric == "auto" and digits_metric.is_digits(source.data_config)):
    return evaluate_digits(source, steps_list, num_images=num_images, batch_size=batch_size, seed=seed)
  return evaluate_kid(source, steps_list, num_images=num_images, batch_size=batch_size,
                      inception_weights=inception_weights, image_size=image_size, seed=seed)


def evaluate_kid(source: "pipeline.InferenceModel", steps_list: Sequence[int], *, num_images: int | None = None,
                 batch_size: int = 64, inception_weights: str | None = None, image_size: int = 75,
                 seed: int = 0) -> KidEvaluation:
  """KID and FID of ``source``'s EMA samples against its validation images, per step count
  (``quality_for_steps``)."""
  if batch_size < 2:
    raise errors.ConfigError(f"--batch-size {batch_size}: KID needs batches of at least 2 images")
  weights = resolve_inception_weights(inception_weights)
  reals = source.real_images("validation", num_images)
  batch = kid_batch_size(len(reals), batch_size)
  used = len(reals) // batch * batch
  feature_fn = kid_feature_fn(weights, image_size)
  start = time.time()
  features = reference_features(reals, feature_fn, batch, cache_file=reference_features_file(
      source.data_config, source.image_size, weights, image_size, used))
  results = quality_for_steps(source.model, source.variables, source.normalizer, reals, feature_fn, steps_list,
                              batch_size=batch, seed=seed, progress=True, spec=source.spec, real_features=features)
  return KidEvaluation(source.description, {s: v["kid"] for s, v in results.items()},
                       {s: v["fid"] for s, v in results.items()}, list(steps_list), used, batch,
                       sharded.devices_for(batch), image_size, weights, source.step, seed, time.time() - start)


def evaluate_digits(source: "pipeline.InferenceModel", steps_list: Sequence[int], *, num_images: int | None = None,
                    batch_size: int = 64, seed: int = 0) -> DigitsEvaluation:
  """The digits metric of ``source``'s EMA samples per step count, then its calibration points."""
  if not digits_metric.is_digits(source.data_config):
    raise errors.ConfigError("--metric digits needs a model of the bundled digits (config.data.dataset='digits')")
  num = num_images or DIGITS_METRIC_IMAGES
  start = time.time()
  metric = digits_metric.DigitsMetric.for_data(source.data_config, source.image_size)
  results = {steps: metric.score(source.sample(num, steps, 0.0, seed, batch_size)) for steps in steps_list}
  calibration = metric.calibration(num)
  return DigitsEvaluation(source.description, results, calibration, list(steps_list), num, metric.num_reference,
                          metric.weights, source.step, seed, time.time() - start)
