"""Evaluation of a trained model's samples: KID and FID against real images, or the digits metric.

KID follows the Keras example (its ``KID`` metric, updated per validation batch in ``test_step``):
each batch of real (validation) images is paired with a batch of as many generated images, the
per-batch unbiased MMD^2 of their Inception features is averaged with equal weight
(``metrics.KIDAccumulator``). Generated batch i always starts from the noise of
``fold_in(key(seed), i)``, so the KID of several step counts (or of successive epochs during
training) is measured on the same real batches AND the same noises: the differences between them
are not sampling noise.

FID compares the Gaussian fits of all the real and all the generated images' features (pytorch-fid),
of the same images, but with its own Inception: by default the standard FID's (the 2015 FID Inception,
``pt_inception-2015-12-05-6726825d.pth``, at 299 px, as pytorch-fid, clean-fid and torchmetrics), named
``fid``; at other settings it is named by them (``metrics.fid_name``: ``fid_torchvision_75px``). KID
keeps the Keras settings (its own weights file, 75 px). Without the FID weights file KID is reported
alone and one line says where to get the file.

The real images' features depend only on the data and the Inception weights and side: they are computed once
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
from ddim_jax.core import rng, sampling, schedules, solvers
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


@functools.lru_cache(maxsize=2)
def _inception(weights_path: str):
  """(model, variables) of a weights file, read once per process."""
  return inception_weights.load_inception_weights(weights_path)


@functools.lru_cache(maxsize=4)
def kid_feature_fn(weights_path: str, image_size: int) -> FeatureFn:
  """The (jitted) Inception feature function of a weights file at ``image_size`` px (KID's or FID's),
  built once per process.

  Cached so that KID every epoch, or over several step counts, compiles InceptionV3 once (about
  as long as a few hundred training steps on a CPU at 75 px; at 299 px every image costs ~16x).
  """
  model, variables = _inception(weights_path)
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


def weights_digest(path: str) -> str:
  """The first 16 hex digits of the SHA-256 of a weights file (hashed once per process and version)."""
  stat = os.stat(path)
  return _file_digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class InceptionSettings:
  """The Inception of a metric: its weights file, their flavour and SHA-256 (16 hex), its input side.

  The preprocessing is the same for all (bilinear resize without antialiasing, as pytorch-fid's
  ``F.interpolate(align_corners=False)``, then ``2x - 1``), so these settings fix the features.
  """
  weights: str
  flavour: str
  image_size: int
  sha256: str

  @classmethod
  def of(cls, weights: str, image_size: int) -> "InceptionSettings":
    """The settings of a weights file (read once: its flavour) at ``image_size`` px."""
    model, _ = _inception(weights)
    return cls(weights, model.flavour, int(image_size), weights_digest(weights))

  def feature_fn(self) -> FeatureFn:
    """The jitted images -> features function (``kid_feature_fn``)."""
    return kid_feature_fn(self.weights, self.image_size)

  @property
  def fid_name(self) -> str:
    """The name of FID with these settings: "fid" for the standard ones (``metrics.fid_name``)."""
    return metrics.fid_name(self.flavour, self.image_size)

  @property
  def published_fid_weights(self) -> bool:
    """Whether the weights are pytorch-fid's published file (by its SHA-256), not just of its flavour."""
    return self.flavour == "fid" and self.sha256.startswith(inception_weights.FID_WEIGHTS_SHA256_PREFIX)

  def same_features(self, other: "InceptionSettings | None") -> bool:
    """Whether ``other`` computes the same features (same weights content and side)."""
    return other is not None and (self.sha256, self.image_size) == (other.sha256, other.image_size)

  def record(self) -> dict:
    """The settings in a JSON record."""
    return {"inception_weights": self.weights, "flavour": self.flavour, "image_size": self.image_size,
            "weights_sha256": self.sha256}


def fid_settings(fid_weights: str | None, image_size: int = metrics.STANDARD_FID_IMAGE_SIZE
                 ) -> "tuple[InceptionSettings | None, str | None]":
  """FID's Inception: ``(settings, None)``, or ``(None, the one line that says where to get the file)``
  when ``fid_weights`` is None and pytorch-fid's file is not in the torch hub cache.

  Raises:
    FileNotFoundError: ``fid_weights`` names no file (asked for, so not skipped).
  """
  try:
    path = inception_weights.find_fid_weights(fid_weights)
  except FileNotFoundError as e:
    if fid_weights:
      raise
    return None, str(e)
  return InceptionSettings.of(path, image_size), None


def fid_comparability_note(settings: InceptionSettings) -> str | None:
  """One line when a FID is not comparable with published numbers (None when it is)."""
  if settings.fid_name != "fid":
    return (f"{settings.fid_name}: FID at other settings than the standard one ({settings.flavour} weights at "
            f"{settings.image_size} px); not comparable with pytorch-fid/clean-fid/torchmetrics numbers")
  if not settings.published_fid_weights:
    return (f"fid: {os.path.basename(settings.weights)} is not pytorch-fid's published "
            f"{inception_weights.FID_WEIGHTS_FILE} (SHA-256 {settings.sha256}...); not comparable with published FIDs")
  return None


def reference_features_file(data_config, image_size: int, inception_weights: str, feature_image_size: int,
                            num_images: int) -> str:
  """Where the features of the first ``num_images`` validation images live in the data cache entry.

  The name holds all they depend on beyond the entry (the data and its image size): the Inception
  weights (their SHA-256, which fixes the flavour), its input side and the number of images (the
  preprocessing is the same for all, ``InceptionSettings``). KID's and FID's features share a file
  when their settings are equal.
  """
  digest = weights_digest(inception_weights)
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
                      fid: bool = True, real_features: np.ndarray | None = None,
                      fid_feature_fn: FeatureFn | None = None,
                      real_fid_features: np.ndarray | None = None,
                      sampler: solvers.Sampler = solvers.DDIM) -> dict[int, dict[str, float]]:
  """KID (and FID) of EMA samples against ``real_images`` for each step count (same batches, same noises).

  KID is the mean over paired batches (Keras); FID compares the Gaussian fits of all the real and
  all the generated features at once (pytorch-fid), of the same images: the real ones of the
  full batches and as many samples, with its own feature function (the standard FID's Inception at
  299 px, ``fid_settings``) or KID's.

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
    fid_feature_fn: FID's images -> features (None: KID's ``feature_fn``).
    real_fid_features: ``fid_feature_fn``'s features of the real whole batches, when known.
    sampler: the sampler of the generated images (DDIM, Keras' KID, by default).

  Returns:
    {steps: {"kid": KID, "fid": FID (when ``fid``; of ``fid_feature_fn``'s features, whatever its
    name, ``metrics.fid_name``)}}.
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
  separate_fid = fid and fid_feature_fn is not None and fid_feature_fn is not feature_fn
  if separate_fid:
    if real_fid_features is None:
      real_fid_features = reference_features(real_images, fid_feature_fn, batch, mesh)
    if len(real_fid_features) != num_batches * batch:
      raise errors.InputError(f"{len(real_fid_features)} real FID features for {num_batches} batches of {batch} images")
  all_real = real_features
  real_features = [all_real[i * batch:(i + 1) * batch] for i in range(num_batches)]
  results = {}
  for steps in steps_list:
    accumulator = metrics.KIDAccumulator()
    generated_features, generated_fid_features = [], []
    bar = tqdm(range(num_batches), desc=f"KID ({sampler.describe()}, {steps} steps, {mesh.size} devices)",
               disable=None if progress else True)  # None: only on a terminal (no carriage returns in logs)
    for i in bar:
      noise = jax.random.normal(jax.random.fold_in(key, i), shape)
      generated = sharded.generate(model, variables, noise, normalizer, steps=int(steps), spec=spec, mesh=mesh,
                                   sampler=sampler)
      generated_features.append(sharded.map_rows(feature_fn, generated, mesh))
      accumulator.update(real_features[i], generated_features[-1])
      if separate_fid:
        generated_fid_features.append(sharded.map_rows(fid_feature_fn, generated, mesh))
    results[int(steps)] = {"kid": accumulator.result()}
    if fid:
      results[int(steps)]["fid"] = metrics.fid_from_features(
          real_fid_features if separate_fid else all_real,
          np.concatenate([np.asarray(f) for f in (generated_fid_features if separate_fid else generated_features)]))
  return results


# ------------------------------------------------------------------------------------------------
# KID during training.


FID_METRIC = "val_fid"  # the standard FID beside checkpointing.BEST_METRIC (val_kid) in the training metrics


def training_fid_metric(settings: InceptionSettings) -> str:
  """The training metric of FID with ``settings``: ``val_fid`` (standard) or e.g. ``val_fid_torchvision_75px``."""
  return f"val_{settings.fid_name}"


def make_training_kid(config, model, val_images, mesh=None) -> Callable | None:
  """The training loop's KID and FID: ``fn(variables, normalizer) -> {val_kid, val_fid}``, or None
  when KID is off.

  KID is on when ``config.train.kid_every > 0`` and an Inception weights file is found
  (``config.eval.inception_weights`` or the torch hub cache); without one a single warning says
  how to get it and training goes on without KID (and FID). Settings: ``config.eval.kid_steps`` (Keras 5)
  of ``config.sample.sampler`` on ``config.sample.time_grid`` (DDIM, uniform: Keras'),
  ``kid_image_size`` (75 Keras, 299 R), ``num_kid_images`` (None: the whole validation split),
  ``kid_batch_size`` (64). The same noises are used at every evaluation. ``mesh``: the training
  mesh, over which each KID batch is split (see ``kid_for_steps``). The real images' features are
  computed at the first evaluation and kept (in the data cache too, when one process trains).

  FID (``config.eval.fid``, on by default) of the same images uses its own Inception:
  ``eval.fid_weights`` (None: pytorch-fid's file in the torch hub cache) at ``eval.fid_image_size``
  (299): logged as ``val_fid`` at the standard settings, else by its settings
  (``val_fid_torchvision_75px``, ``metrics.fid_name``). Without its weights file one warning (one line)
  says where to get it, and KID is logged alone.
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
  kid_settings = InceptionSettings.of(weights, image_size)
  feature_fn = kid_settings.feature_fn()
  batch_size = int(eval_config.get("kid_batch_size", 64))
  steps = int(eval_config.get("kid_steps", 5))
  spec = schedules.DiffusionSpec.from_config(config)
  sampler = solvers.Sampler.from_config(config.sample)
  seed = int(config.seed) + rng.KID_NOISE

  fid = None
  if bool(eval_config.get("fid", True)):
    fid_size = eval_config.get("fid_image_size", metrics.STANDARD_FID_IMAGE_SIZE)
    if not isinstance(fid_size, int) or fid_size < inception.MIN_IMAGE_SIZE:
      raise errors.ConfigError(f"eval.fid_image_size {fid_size!r}: must be an integer >= {inception.MIN_IMAGE_SIZE} "
                               "(Inception's input side; 299: the standard FID)")
    try:
      fid, missing = fid_settings(eval_config.get("fid_weights"), fid_size)
    except FileNotFoundError as e:
      fid, missing = None, str(e)
    if missing:
      warnings.warn(f"{missing} Training logs KID alone.", stacklevel=2)
  shared = kid_settings.same_features(fid)  # e.g. r_variant with the FID weights for KID: one computation
  fid_feature_fn = None if fid is None else (feature_fn if shared else fid.feature_fn())
  batch = kid_batch_size(len(reals), batch_size)
  used = len(reals) // batch * batch
  # Several processes compute them together (every batch is split over all their devices): a file
  # that one process finds and another does not would leave the other alone in the collective.
  one_process = jax.process_count() == 1

  def cache_file(settings):
    return (reference_features_file(config.data, int(config.model.image_size), settings.weights, settings.image_size,
                                    used) if one_process else None)

  reference = {}  # the real images' features, from the first evaluation on

  def evaluate(variables, normalizer) -> dict[str, float]:
    if "kid" not in reference:
      reference["kid"] = reference_features(reals, feature_fn, batch, mesh, cache_file(kid_settings))
      if fid is not None:
        reference["fid"] = (reference["kid"] if shared else
                            reference_features(reals, fid_feature_fn, batch, mesh, cache_file(fid)))
    values = quality_for_steps(model, variables, normalizer, reals, feature_fn, [steps], batch_size=batch,
                               seed=seed, spec=spec, mesh=mesh, fid=fid is not None,
                               real_features=reference["kid"], fid_feature_fn=fid_feature_fn,
                               real_fid_features=reference.get("fid"), sampler=sampler)[steps]
    return {checkpointing.BEST_METRIC: values["kid"], **({training_fid_metric(fid): values["fid"]} if fid else {})}

  return evaluate


# ------------------------------------------------------------------------------------------------
# ``ddim-jax evaluate``: a model's KID, or its digits metric, per step count.


@dataclasses.dataclass
class KidEvaluation:
  """KID and FID of a model's EMA samples per step count (``evaluate_model`` with KID).

  Attributes:
    description: the model, for messages.
    kid: {steps: KID}.
    fid: {steps: FID} (the same samples and real images; {} when not computed).
    steps: the step counts, as asked.
    num_images: the validation images used (whole batches).
    batch_size: images per KID batch.
    devices: the devices each batch is split over.
    kid_settings: KID's Inception (weights, flavour, side).
    fid_settings: FID's Inception; None when FID was not computed.
    fid_note: one line: why FID was not computed, or why it is not comparable with published FIDs.
    checkpoint_step: the training step of the weights, when known.
    seed: the seed of the generated batches' noises.
    seconds: of the measurement (after loading the model).
    sampler: the sampler of the generated images.
  """
  description: str
  kid: dict[int, float]
  fid: dict[int, float]
  steps: list[int]
  num_images: int
  batch_size: int
  devices: int
  kid_settings: InceptionSettings
  fid_settings: InceptionSettings | None
  fid_note: str | None
  checkpoint_step: int | None
  seed: int
  seconds: float
  sampler: solvers.Sampler = solvers.DDIM

  @property
  def fid_name(self) -> str | None:
    """FID's metric name: "fid" (standard) or e.g. "fid_torchvision_75px"; None when not computed."""
    return None if self.fid_settings is None else self.fid_settings.fid_name

  def record(self) -> dict:
    """The JSON record of ``evaluate --json``: ``kid`` and FID under its name (``fid`` only for the
    standard FID), each with its settings."""
    record = {"kid": {str(k): v for k, v in self.kid.items()},
              "kid_settings": {**self.kid_settings.record(), "batch_size": self.batch_size},
              "steps": self.steps, **self.sampler.record(), "num_images": self.num_images,
              "batch_size": self.batch_size, "checkpoint_step": self.checkpoint_step, "seed": self.seed,
              "seconds": self.seconds}
    if self.fid_settings is not None:
      record[self.fid_name] = {str(k): v for k, v in self.fid.items()}
      record["fid_settings"] = {**self.fid_settings.record(), "name": self.fid_name,
                                "published_weights": self.fid_settings.published_fid_weights}
    if self.fid_note:
      record["fid_note"] = self.fid_note
    return record

  def table_lines(self) -> list[str]:
    """The printed table: a heading that says what was measured, then one line per step count."""
    k, f = self.kid_settings, self.fid_settings
    fid_text = ("" if f is None else
                f"; {'FID' if f.fid_name == 'fid' else f.fid_name}: {os.path.basename(f.weights)} at {f.image_size} px")
    heading = (f"KID{' and FID' if f is not None else ''} of {self.description} ({self.sampler.describe()} samples) "
               f"against {self.num_images} validation images (batches of {self.batch_size} split over {self.devices} "
               f"device{'s' * (self.devices > 1)}; "
               f"KID: {os.path.basename(k.weights)} at {k.image_size} px{fid_text}):")
    fid_column = "" if f is None else f" {'FID' if f.fid_name == 'fid' else f.fid_name:>10}"
    lines = [heading, f"{'steps':>6} {'KID':>10}{fid_column}"]
    for steps, value in self.kid.items():
      lines.append(f"{steps:>6} {value:>10.5f}" + ("" if f is None else f" {self.fid[steps]:>10.3f}"))
    return lines


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
    sampler: the sampler of the samples.
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
  sampler: solvers.Sampler = solvers.DDIM

  def record(self) -> dict:
    """The JSON record of ``evaluate --json``."""
    return {"metric": "digits", "steps": self.steps, **self.sampler.record(), "num_images": self.num_images,
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
                   fid: bool = True, fid_weights: str | None = None,
                   fid_image_size: int = metrics.STANDARD_FID_IMAGE_SIZE,
                   seed: int = 0, sampler: str | None = None,
                   time_grid: str | None = None) -> "KidEvaluation | DigitsEvaluation":
  """``ddim-jax evaluate``: the model of a workdir or weight file (``pipeline.load_model``), measured.

  Args:
    workdir, weights, config, cpu_devices, step, overrides: the model and its data (``pipeline.load_model``).
    steps_list: sampler step counts.
    metric: "kid", "digits", or "auto": the digits metric for a model of the bundled digits, else KID.
    num_images: KID: validation images (None: all); digits: samples (None: ``DIGITS_METRIC_IMAGES``).
    batch_size: KID: images per batch (Keras 64, R 128); digits: images per sampling call.
    inception_weights: KID: the Inception weights file (None: the torch hub cache).
    image_size: KID: the Inception input side (75 Keras, 299 R).
    fid: KID also gets FID beside it (``evaluate_kid``).
    fid_weights: FID's Inception weights (None: pytorch-fid's file in the torch hub cache; absent: no FID).
    fid_image_size: FID's Inception input side (299: the standard FID).
    seed: the seed of the samples' noises.
    sampler, time_grid: the sampler of the samples ("ddim" or "dpmpp_2m") and its time grid ("uniform" or
      "logsnr"); None: the model's (``InferenceModel.choose_sampler``).

  Returns:
    A ``KidEvaluation`` or a ``DigitsEvaluation``.
  """
  if num_images is not None and num_images < 2:
    raise errors.ConfigError(f"--num-images {num_images}: the metrics compare sets of at least 2 images")
  source = pipeline.load_model(workdir, weights, config, cpu_devices, step, overrides)
  chosen = source.choose_sampler(sampler, time_grid)
  if metric == "digits" or (metric == "auto" and digits_metric.is_digits(source.data_config)):
    return evaluate_digits(source, steps_list, num_images=num_images, batch_size=batch_size, seed=seed,
                           sampler=chosen)
  return evaluate_kid(source, steps_list, num_images=num_images, batch_size=batch_size,
                      inception_weights=inception_weights, image_size=image_size, fid=fid, fid_weights=fid_weights,
                      fid_image_size=fid_image_size, seed=seed, sampler=chosen)


def evaluate_kid(source: "pipeline.InferenceModel", steps_list: Sequence[int], *, num_images: int | None = None,
                 batch_size: int = 64, inception_weights: str | None = None, image_size: int = 75,
                 fid: bool = True, fid_weights: str | None = None,
                 fid_image_size: int = metrics.STANDARD_FID_IMAGE_SIZE, seed: int = 0,
                 sampler: solvers.Sampler = solvers.DDIM) -> KidEvaluation:
  """KID and FID of ``source``'s EMA samples against its validation images, per step count
  (``quality_for_steps``): KID with ``inception_weights`` at ``image_size``, FID with its own
  Inception (``fid_settings``: the standard FID's by default; skipped, with a note, when its default
  file is absent)."""
  if batch_size < 2:
    raise errors.ConfigError(f"--batch-size {batch_size}: KID needs batches of at least 2 images")
  sampler.check(source.spec)
  if fid_image_size < inception.MIN_IMAGE_SIZE:
    raise errors.ConfigError(f"--fid-image-size {fid_image_size}: InceptionV3 needs >= {inception.MIN_IMAGE_SIZE}")
  weights = resolve_inception_weights(inception_weights)
  kid_settings = InceptionSettings.of(weights, image_size)
  fid_inception, note = fid_settings(fid_weights, fid_image_size) if fid else (None, None)
  if fid_inception is not None:
    note = fid_comparability_note(fid_inception)
  reals = source.real_images("validation", num_images)
  batch = kid_batch_size(len(reals), batch_size)
  used = len(reals) // batch * batch
  feature_fn = kid_settings.feature_fn()
  start = time.time()

  def real_features(settings, fn):
    return reference_features(reals, fn, batch, cache_file=reference_features_file(
        source.data_config, source.image_size, settings.weights, settings.image_size, used))

  features = real_features(kid_settings, feature_fn)
  fid_feature_fn, fid_features = None, None
  if fid_inception is not None:
    if kid_settings.same_features(fid_inception):
      fid_feature_fn, fid_features = feature_fn, features
    else:
      fid_feature_fn = fid_inception.feature_fn()
      fid_features = real_features(fid_inception, fid_feature_fn)
  results = quality_for_steps(source.model, source.variables, source.normalizer, reals, feature_fn, steps_list,
                              batch_size=batch, seed=seed, progress=True, spec=source.spec, real_features=features,
                              fid=fid_inception is not None, fid_feature_fn=fid_feature_fn,
                              real_fid_features=fid_features, sampler=sampler)
  return KidEvaluation(source.description, {s: v["kid"] for s, v in results.items()},
                       {s: v["fid"] for s, v in results.items() if "fid" in v}, list(steps_list), used, batch,
                       sharded.devices_for(batch), kid_settings, fid_inception, note, source.step, seed,
                       time.time() - start, sampler)


def evaluate_digits(source: "pipeline.InferenceModel", steps_list: Sequence[int], *, num_images: int | None = None,
                    batch_size: int = 64, seed: int = 0, sampler: solvers.Sampler = solvers.DDIM) -> DigitsEvaluation:
  """The digits metric of ``source``'s EMA samples per step count, then its calibration points."""
  if not digits_metric.is_digits(source.data_config):
    raise errors.ConfigError("--metric digits needs a model of the bundled digits (config.data.dataset='digits')")
  num = num_images or DIGITS_METRIC_IMAGES
  start = time.time()
  metric = digits_metric.DigitsMetric.for_data(source.data_config, source.image_size)
  results = {steps: metric.score(source.sample(num, steps, 0.0, seed, batch_size, sampler=sampler))
             for steps in steps_list}
  calibration = metric.calibration(num)
  return DigitsEvaluation(source.description, results, calibration, list(steps_list), num, metric.num_reference,
                          metric.weights, source.step, seed, time.time() - start, sampler)
