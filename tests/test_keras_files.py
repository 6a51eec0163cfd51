"""The Keras example's ``.weights.h5`` both ways, against real Keras 3 (TensorFlow backend).

The Keras side is built here from the specification (``seed_spec.md`` §4-5: ``get_network``, and
``DiffusionModel`` with ``normalizer``, ``network``, ``ema_network = clone_model(network)``), saved with
Keras's own ``save_weights``, converted, and run by Keras, JAX and the torch twin on the same inputs.
"""

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras", reason="Keras 3 is not installed (it comes with the tfds extra's TensorFlow: "
                                            "pip install 'ddim-jax[tfds]'); the Keras file tests need it")
if int(keras.__version__.split(".")[0]) < 3:
  pytest.skip(f"Keras {keras.__version__} is not Keras 3 (the example's .weights.h5 format)", allow_module_level=True)

import jax  # noqa: E402
import torch  # noqa: E402

from ddim_jax.core import models, sampling  # noqa: E402
from ddim_jax.interop import keras_files, parity, parity_fixtures, weight_files  # noqa: E402
from ddim_torch_ref import sampling as torch_sampling  # noqa: E402
from ddim_torch_ref import weight_files as torch_weight_files  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # TensorFlow and Keras start in seconds, and every test builds a Keras model
    # Keras 3.15's TensorFlow backend and NumPy 2, in every conversion to NumPy: not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    # Loading into a compiled model: its optimiser has no variables in any weights file.
    pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning"),
]
ops, layers = keras.ops, keras.layers
EMBEDDING_DIMS = 32
SIZE = 16
SMALL = dict(widths=(8, 16, 24), block_depth=2)


@keras.saving.register_keras_serializable(package="ddim_jax_tests")
def example_embedding(x):
  """The example's embedding: 16 log-spaced frequencies in [1, 1000], sin then cos, the angular
  speeds formed in float32 Keras ops as the example forms them."""
  frequencies = ops.exp(ops.linspace(ops.log(1.0), ops.log(1000.0), EMBEDDING_DIMS // 2))
  angular_speeds = ops.cast(2.0 * math.pi * frequencies, "float32")
  return ops.concatenate([ops.sin(angular_speeds * x), ops.cos(angular_speeds * x)], axis=3)


@keras.saving.register_keras_serializable(package="ddim_jax_tests")
def spec_embedding(x):
  """The same embedding with the angular speeds 2*pi*f_k formed in float64 and rounded once to
  float32: the numbers both of the project's twins multiply (``models.angular_speeds``)."""
  angular_speeds = ops.convert_to_tensor(models.angular_speeds(EMBEDDING_DIMS))
  return ops.concatenate([ops.sin(angular_speeds * x), ops.cos(angular_speeds * x)], axis=3)


def example_network(image_size, widths, block_depth, embedding=spec_embedding):
  """``get_network`` of the example; returns (model, {id(layer): the twin's module name}).

  Written here from the specification on purpose, not imported from ``interop/keras_network.py``:
  the files Keras saves from this network are what the package must read, and the package's own
  Keras network, filled from such a file, must compute what this one computes
  (``test_the_packages_keras_network_is_the_examples``)."""
  tags = {}

  def tag(layer, name):
    tags[id(layer)] = name
    return layer

  def residual_block(x, width, name):
    residual = x if x.shape[3] == width else tag(layers.Conv2D(width, 1), f"{name}.proj")(x)
    x = tag(layers.BatchNormalization(center=False, scale=False), f"{name}.norm")(x)
    x = tag(layers.Conv2D(width, 3, padding="same", activation=keras.activations.swish), f"{name}.conv1")(x)
    x = tag(layers.Conv2D(width, 3, padding="same"), f"{name}.conv2")(x)
    return layers.Add()([x, residual])

  noisy_images = keras.Input(shape=(image_size, image_size, 3))
  noise_variances = keras.Input(shape=(1, 1, 1))
  e = layers.Lambda(embedding, output_shape=(1, 1, EMBEDDING_DIMS))(noise_variances)
  e = layers.UpSampling2D(size=image_size, interpolation="nearest")(e)
  x = tag(layers.Conv2D(widths[0], 1), "stem")(noisy_images)
  x = layers.Concatenate()([x, e])
  skips = []
  for i, width in enumerate(widths[:-1]):
    for j in range(block_depth):
      x = residual_block(x, width, f"down_blocks.{i}.residual_blocks.{j}")
      skips.append(x)
    x = layers.AveragePooling2D(pool_size=2)(x)
  for j in range(block_depth):
    x = residual_block(x, widths[-1], f"mid_blocks.{j}")
  for i, width in enumerate(reversed(widths[:-1])):
    x = layers.UpSampling2D(size=2, interpolation="bilinear")(x)
    for j in range(block_depth):
      x = layers.Concatenate()([x, skips.pop()])
      x = residual_block(x, width, f"up_blocks.{i}.residual_blocks.{j}")
  x = tag(layers.Conv2D(3, 1, kernel_initializer="zeros"), "head")(x)
  return keras.Model([noisy_images, noise_variances], x, name="residual_unet"), tags


class DiffusionModel(keras.Model):
  """The example's model as far as its weights go: normaliser, network, EMA network."""

  def __init__(self, image_size, widths, block_depth):
    super().__init__()
    self.normalizer = layers.Normalization()
    self.network, _ = example_network(image_size, widths, block_depth)
    self.ema_network = keras.models.clone_model(self.network)


class KIDLike(keras.metrics.Metric):
  """The example's KID metric as far as saving goes: a tracker and an encoder network."""

  def __init__(self, name="kid"):
    super().__init__(name=name)
    self.kid_tracker = keras.metrics.Mean(name="kid_tracker")
    self.encoder = keras.Sequential([keras.Input(shape=(SIZE, SIZE, 3)), layers.Conv2D(4, 3),
                                     layers.GlobalAveragePooling2D()])

  def update_state(self, *args, **kwargs):
    pass

  def result(self):
    return self.kid_tracker.result()


def randomize(network, seed):
  """Non-trivial weights: every bias, the head and the BatchNorm statistics away from their init."""
  rng = np.random.default_rng(seed)
  for layer in network.layers:
    values = layer.get_weights()
    if isinstance(layer, layers.BatchNormalization):
      values = [rng.normal(0.0, 0.3, values[0].shape), rng.uniform(0.5, 2.0, values[1].shape)]
    elif values:
      kernel = values[0] if np.any(values[0]) else rng.normal(0.0, 0.05, values[0].shape)
      values = [kernel * rng.uniform(0.8, 1.2), rng.normal(0.0, 0.05, values[1].shape)]
    layer.set_weights([np.asarray(v, np.float32) for v in values])


def build_example(widths=SMALL["widths"], block_depth=SMALL["block_depth"], image_size=SIZE):
  """The example's model with an adapted normaliser and non-trivial, different network and EMA weights."""
  model = DiffusionModel(image_size, widths, block_depth)
  rng = np.random.default_rng(0)
  model.normalizer.adapt(rng.uniform(0.0, 1.0, (8, image_size, image_size, 3)).astype(np.float32))
  randomize(model.network, 1)
  randomize(model.ema_network, 2)
  model.built = True
  return model


def inputs(batch=4, image_size=SIZE, seed=3):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
  variances = rng.uniform(0.0, 1.0, (batch, 1, 1, 1)).astype(np.float32)
  return images, variances


def keras_trajectory(network, initial_noise, steps, training=False):
  """The example's ``reverse_diffusion`` (its cosine schedule in float32 Keras ops), every state kept."""
  start, end = math.acos(0.95), math.acos(0.02)
  batch = initial_noise.shape[0]
  noisy, noisy_states, predictions = ops.convert_to_tensor(initial_noise), [initial_noise], []
  for step in range(steps):
    times = ops.ones((batch, 1, 1, 1)) - step * (1.0 / steps)
    angles = start + times * (end - start)
    noise_rates, signal_rates = ops.sin(angles), ops.cos(angles)
    pred_noises = network([noisy, noise_rates ** 2], training=training)
    pred_images = (noisy - noise_rates * pred_noises) / signal_rates
    next_angles = start + (times - 1.0 / steps) * (end - start)
    noisy = ops.cos(next_angles) * pred_images + ops.sin(next_angles) * pred_noises
    noisy_states.append(ops.convert_to_numpy(noisy))
    predictions.append(ops.convert_to_numpy(pred_images))
  return np.stack(noisy_states), np.stack(predictions)


def rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("widths,block_depth,image_size", [((8, 16, 24), 2, 16), ((8, 16), 1, 8), ((8, 8, 16), 1, 8),
                                                           ((32, 64, 96, 128), 2, 64)])
def test_the_layer_order_rule_is_keras_own(widths, block_depth, image_size):
  network, tags = example_network(image_size, widths, block_depth)
  expected = {}
  counts = {}
  for layer in network.layers:  # the order Keras's save_weights names the groups in
    if id(layer) in tags:
      base = "conv2d" if isinstance(layer, layers.Conv2D) else "batch_normalization"
      n = counts.get(base, 0)
      counts[base] = n + 1
      expected[tags[id(layer)]] = base if n == 0 else f"{base}_{n}"
  assert keras_files.keras_layer_names(widths, block_depth, EMBEDDING_DIMS) == expected


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """The example's model saved by Keras, and converted (EMA and raw networks)."""
  root = tmp_path_factory.mktemp("keras")
  model = build_example()
  path = str(root / "diffusion_model.weights.h5")
  model.save_weights(path)
  converted = {}
  for network in ("ema", "raw"):
    out = str(root / f"{network}.safetensors")
    keras_files.keras_file_to_weights(path, out, overrides=[f"--config.model.image_size={SIZE}"], network=network)
    converted[network] = out
  return model, path, converted


def test_a_keras_file_converts_with_its_architecture_and_normalizer(example):
  model, path, converted = example
  for network, attr in (("ema", "ema_network"), ("raw", "network")):
    jax_model, variables, normalizer, metadata = weight_files.load_weights(converted[network])
    assert (jax_model.variant, tuple(jax_model.widths), jax_model.block_depth) == ("keras",) + tuple(SMALL.values())
    assert metadata["weights"] == network and metadata["image_size"] == str(SIZE)
    assert metadata["schedule"] == "cosine" and float(metadata["min_signal_rate"]) == 0.02
    np.testing.assert_array_equal(normalizer["mean"], np.asarray(model.normalizer.mean).reshape(-1))
    np.testing.assert_array_equal(normalizer["variance"], np.asarray(model.normalizer.variance).reshape(-1))
    head = getattr(model, attr).layers[-1].get_weights()[0]  # (1, 1, in, 3)
    np.testing.assert_array_equal(np.asarray(variables["params"]["head"]["kernel"]), head)


@pytest.mark.parametrize("training", [False, True], ids=["bn_eval", "bn_train"])
def test_keras_jax_and_torch_agree_on_the_converted_model(example, training):
  model, _, converted = example
  images, variances = inputs()
  weights = model.ema_network.get_weights()
  keras_out = ops.convert_to_numpy(model.ema_network([images, variances], training=training))
  model.ema_network.set_weights(weights)  # a training=True call moved its BatchNorm statistics
  jax_model, variables, _, _ = weight_files.load_weights(converted["ema"])
  if training:
    jax_out, _ = jax_model.apply(variables, images, variances, train=True, mutable=["batch_stats"])
  else:
    jax_out = jax_model.apply(variables, images, variances, train=False)
  twin, _, _ = torch_weight_files.load_weights(converted["ema"])
  with torch.no_grad():
    torch_out = parity.nhwc(twin.train(training)(torch.from_numpy(parity.nchw(images)),
                                                 torch.from_numpy(variances)).numpy())
  assert np.max(np.abs(keras_out)) > 0.1  # a model that computes something
  assert rel(jax_out, keras_out) <= 1e-5
  assert rel(torch_out, keras_out) <= 1e-5


@pytest.mark.parametrize("network", ["ema", "raw"])
def test_the_packages_keras_network_is_the_examples(example, network):
  """``interop/keras_network.py`` (what ``parity --keras`` runs), filled from the example's saved
  file through the layer-order rule, computes what the example's network computes."""
  from ddim_jax.interop import keras_network
  model, path, _ = example
  ours, kwargs = keras_network.load_network(path, SIZE, network)
  assert kwargs["widths"] == SMALL["widths"] and kwargs["block_depth"] == SMALL["block_depth"]
  theirs = model.ema_network if network == "ema" else model.network
  images, variances = inputs()
  for train in (False, True):
    want = keras_network.forward(theirs, images, variances, train)
    assert rel(keras_network.forward(ours, images, variances, train), want) <= 1e-6, train


def test_the_examples_own_float32_embedding_moves_the_prediction_a_little(example, tmp_path):
  """The example forms its angular speeds in float32 (exp of a linspace, times 2*pi): up to 4 ulps
  from the correctly rounded speeds the twins share, ~2e-3 rad at the top frequency. That alone,
  with the same weights, moves the prediction by ~1e-4 relative (docs/parity.md)."""
  model, _, converted = example
  network, _ = example_network(SIZE, SMALL["widths"], SMALL["block_depth"], embedding=example_embedding)
  network.set_weights(model.ema_network.get_weights())
  images, variances = inputs()
  jax_model, variables, _, _ = weight_files.load_weights(converted["ema"])
  jax_out = jax_model.apply(variables, images, variances, train=False)
  assert rel(jax_out, ops.convert_to_numpy(network([images, variances], training=False))) <= 1e-3
  assert rel(jax_out, ops.convert_to_numpy(model.ema_network([images, variances], training=False))) <= 1e-5


def test_a_trained_model_through_keras_gives_the_same_ten_step_trajectories(trained_weights, tmp_path):
  """The trained parity model (JAX) exported to .weights.h5 and loaded by the example's model: its
  10-step DDIM trajectories in Keras, JAX and torch agree; saved again by Keras, it converts back to
  the same tensors."""
  path = trained_weights("keras")
  jax_model, variables, _, _ = weight_files.load_weights(path)
  exported = str(tmp_path / "trained.weights.h5")
  keras_files.weights_to_keras_file(path, exported)
  model = build_example(tuple(jax_model.widths), jax_model.block_depth)
  model.load_weights(exported)
  steps = 10
  initial_noise = np.random.default_rng(5).standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
  keras_noisy, keras_pred = keras_trajectory(model.ema_network, initial_noise, steps)
  out = jax.tree.map(np.asarray, sampling.generate(jax_model, variables, initial_noise, steps=steps,
                                                   return_trajectory=True))
  twin, _, _ = torch_weight_files.load_weights(path)
  with torch.no_grad():
    ref = torch_sampling.reverse_diffusion(twin.eval(), torch.from_numpy(parity.nchw(initial_noise)), steps,
                                           return_trajectory=True)
  assert np.max(np.abs(keras_noisy)) < 50  # a denoiser's bounded states, not a random net's
  assert rel(out["noisy_trajectory"], keras_noisy) <= 1e-4
  assert rel(out["pred_trajectory"], keras_pred) <= 1e-4
  assert rel(parity.nhwc(ref["noisy_trajectory"].numpy()), keras_noisy) <= 1e-4
  assert rel(parity.nhwc(ref["pred_trajectory"].numpy()), keras_pred) <= 1e-4
  saved = str(tmp_path / "saved_by_keras.weights.h5")
  model.save_weights(saved)
  back = str(tmp_path / "back.safetensors")
  keras_files.keras_file_to_weights(saved, back, overrides=[f"--config.model.image_size={SIZE}"])
  original, again = weight_files.read_weight_file(path)[0], weight_files.read_weight_file(back)[0]
  assert sorted(original) == sorted(again)
  for name, value in original.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_a_project_file_exported_to_keras_loads_in_the_example(tmp_path):
  jax_model = models.create_model("keras", **SMALL)
  variables = parity_fixtures.perturbed_variables(jax_model, SIZE, seed=4)
  normalizer = {"mean": np.array([0.4, 0.5, 0.6], np.float32), "variance": np.array([0.07, 0.08, 0.09], np.float32)}
  path = str(tmp_path / "w.safetensors")
  weight_files.save_weights(path, jax_model, variables, normalizer, SIZE, weights="ema", step=9)
  out = str(tmp_path / "exported.weights.h5")
  keras_files.weights_to_keras_file(path, out)
  model = build_example()  # other weights, which the file must replace
  # As the example holds it after compile(): a KID metric with an encoder the file does not hold
  # (the example's is ImageNet's InceptionV3); skip_mismatch leaves it and loads the rest.
  model.compile(optimizer="adam", loss="mae")
  model.kid = KIDLike()
  with pytest.raises(ValueError, match="could not be loaded"):
    model.load_weights(out)
  with pytest.warns(UserWarning, match="A total of 1 objects could not be loaded"):  # the encoder's conv only
    model.load_weights(out, skip_mismatch=True)
  np.testing.assert_array_equal(np.asarray(model.normalizer.mean).reshape(-1), normalizer["mean"])
  np.testing.assert_array_equal(np.asarray(model.normalizer.variance).reshape(-1), normalizer["variance"])
  images, variances = inputs()
  jax_out = np.asarray(jax_model.apply(variables, images, variances, train=False))
  for network in (model.ema_network, model.network):
    assert rel(ops.convert_to_numpy(network([images, variances], training=False)), jax_out) <= 1e-5
  # And back: the same weight file, tensor for tensor, with its metadata.
  back = str(tmp_path / "back.safetensors")
  keras_files.keras_file_to_weights(out, back)
  original, original_meta = weight_files.read_weight_file(path)
  again, again_meta = weight_files.read_weight_file(back)
  assert sorted(original) == sorted(again) and original_meta == again_meta
  for name, value in original.items():
    np.testing.assert_array_equal(again[name], value)


def _cli(command, *argv):
  """``ddim-jax COMMAND ARGV`` in process: (exit status, stdout, stderr)."""
  import contextlib
  import io

  from ddim_jax import cli
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([command, *map(str, argv)])
  return code, out.getvalue(), err.getvalue()


def _convert(*argv):
  return _cli("convert", *argv)


def test_the_convert_command_both_ways_and_its_errors_in_one_line(example, trained_weights, tmp_path):
  import h5py
  _, path, converted = example
  code, out, err = _convert(path, "--out", tmp_path / "raw.safetensors", "--network", "raw",
                            f"--config.model.image_size={SIZE}")
  assert code == 0, err
  assert "the Keras file's raw network; the architecture from the file's shapes" in out
  np.testing.assert_array_equal(weight_files.read_weight_file(str(tmp_path / "raw.safetensors"))[0]["head.weight"],
                                weight_files.read_weight_file(converted["raw"])[0]["head.weight"])
  code, out, err = _convert(converted["ema"], "--out", tmp_path / "back.weights.h5")
  assert code == 0 and "load it in the Keras example" in out, err
  with h5py.File(tmp_path / "other.weights.h5", "w") as f:
    f.create_group("layers/dense/vars").create_dataset("0", data=np.zeros(3))
  (tmp_path / "broken.weights.h5").write_bytes(b"not hdf5")
  r_path = trained_weights("r")
  cases = [
      ((tmp_path / "other.weights.h5", "--out", tmp_path / "x.safetensors"), "has no 'ema_network'"),
      ((tmp_path / "broken.weights.h5", "--out", tmp_path / "x.safetensors"), "cannot read Keras weights file"),
      ((tmp_path / "missing.weights.h5", "--out", tmp_path / "x.safetensors"), "does not exist"),
      ((r_path, "--out", tmp_path / "x.weights.h5"), "no Keras original"),
      ((path, "--out", tmp_path / "x.safetensors", "--config.model.variant=r"), "only the Keras U-Net"),
      ((path, "--out", tmp_path / "x.safetensors", "--config.model.widths=(8,16)"), "does not fit the model"),
  ]
  for argv, message in cases:
    code, out, err = _convert(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
  assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.weights.h5").exists()


def _parity(*argv):
  return _cli("parity", *argv)


def test_parity_with_keras_passes_on_the_same_model_and_fails_on_an_altered_file(trained_weights, example, tmp_path):
  import json

  import h5py
  path = trained_weights("keras")
  exported = tmp_path / "trained.weights.h5"
  keras_files.weights_to_keras_file(path, str(exported))
  code, out, err = _parity("--weights", path, "--keras", exported, "--steps", 5, "--batch-size", 2,
                           "--json", tmp_path / "parity.json")
  assert code == 0, out + err
  assert f"Keras {keras.__version__} on tensorflow: the EMA network of {exported}" in out
  record = json.loads((tmp_path / "parity.json").read_text())
  keras_rows = [r for r in record["rows"] if r["name"].startswith("Keras")]
  assert [r["name"] for r in keras_rows] == ["Keras: forward, BN eval", "Keras: forward, BN train",
                                            "Keras: trajectory eta=0, every state"]
  assert all(r["ok"] for r in record["rows"]) and record["device"]["keras_backend"] == "tensorflow"
  # One upsampling block's convolution off by 1% in the Keras file: the Keras rows say so (exit 1).
  group = keras_files.keras_layer_names((16, 32, 48), 2)["up_blocks.0.residual_blocks.1.conv1"]
  with h5py.File(exported, "r+") as f:
    f[f"ema_network/layers/{group}/vars/0"][...] *= 1.01
  code, out, err = _parity("--weights", path, "--keras", exported, "--steps", 5, "--batch-size", 2)
  assert code == 1 and "Keras: forward, BN eval" in out and "OUTSIDE" in out, out + err
  # Another model's Keras file: bad input, one line.
  _, keras_path, _ = example
  code, out, err = _parity("--weights", path, "--keras", keras_path, "--steps", 5, "--batch-size", 2)
  assert code == 2 and "holds another model" in err and len(err.strip().splitlines()) == 1, err
