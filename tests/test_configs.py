"""The config presets against the originals' settings, written here independently.

Every expected number below is read from the originals, never copied from ddim_jax/configs: the
Keras example "Denoising Diffusion Implicit Models" by A. Béres
(https://keras.io/examples/generative/ddim/) and its R torch port in the Posit AI blog "De-noising
Diffusion with torch" by D. Falbel and S. Keydana
(https://blogs.rstudio.com/ai/posts/2023-04-13-denoising-diffusion/, code in
github.com/dfalbel/denoising-diffusion). The demo preset is this project's own (README, "Config
presets"). Also here: unknown presets and keys (refused before JAX is imported), and the
``cpu_devices`` setting.
"""

import os
import math
import subprocess
import sys

import jax
import pytest

import ddim_jax
from ddim_jax import arguments, cli, configs
from ddim_jax.core import models, step as step_lib
from ddim_jax.infra import parallel
from train_helpers import REPO, subprocess_env

# Oxford Flowers 102: 8189 images, 80% for training in both originals (6551), each repeated 5 times.
TRAIN_IMAGES = int(0.8 * 8189)
assert TRAIN_IMAGES == 6551
KERAS_STEPS_PER_EPOCH = (TRAIN_IMAGES * 5) // 64  # tf.data batch(64, drop_remainder=True): "511/511"
R_STEPS_PER_EPOCH = math.ceil(TRAIN_IMAGES * 5 / 64)  # torch DataLoader, drop_last=False: 512 batches
assert (KERAS_STEPS_PER_EPOCH, R_STEPS_PER_EPOCH) == (511, 512)

# The Keras example: its hyperparameters, data pipeline, network, sampler and KID.
KERAS = {
    "model.variant": "keras",
    "model.image_size": 64,
    "model.channels": 3,
    "model.widths": (32, 64, 96, 128),
    "model.block_depth": 2,
    "model.embedding_dims": 32,
    "model.dtype": "float32",
    "diffusion.schedule": "cosine",
    "diffusion.min_signal_rate": 0.02,
    "diffusion.max_signal_rate": 0.95,
    "diffusion.target": "noise",
    "data.dataset": "oxford_flowers102",
    "data.split": "keras",  # train[:80%]+validation[:80%]+test[:80%]
    "data.validation_fraction": 0.2,
    "data.antialias": True,  # tf.image.resize(..., antialias=True)
    "data.repetitions": 5,  # dataset.repeat(5)
    "train.batch_size": 64,
    "train.learning_rate": 1e-3,
    "train.lr_schedule": "constant",  # Keras and R: a constant rate, no warm-up
    "train.warmup_steps": 0,
    "train.weight_decay": 1e-4,
    "train.ema_decay": 0.999,
    "train.ema_warmup": False,
    "train.loss": "mae",
    "train.num_steps": 50 * KERAS_STEPS_PER_EPOCH,  # "train for at least 50 epochs"
    "train.kid_every": KERAS_STEPS_PER_EPOCH,  # val_kid once per epoch (test_step)
    "sample.steps": 20,  # plot_diffusion_steps
    "sample.num_images": 3 * 6,  # plot_images(num_rows=3, num_cols=6)
    "eval.kid_steps": 5,  # kid_diffusion_steps
    "eval.kid_image_size": 75,
    "eval.kid_batch_size": 64,  # one validation batch
}

# The R port: its train.R values where they differ from Keras.
R = dict(KERAS, **{
    "model.variant": "r",  # widths 32/64/96/128, block_depth 2, embedding_dim 32 as in Keras
    "data.split": "r",  # sample.int(N, 0.8 * N) after set.seed(1)
    "data.split_seed": 1,
    "data.antialias": False,  # torchvision-R resize: bilinear, no antialiasing
    "train.ema_decay": 0.0,  # R has no EMA
    "train.loss": "mae",  # loss <- "l1"
    "train.num_steps": 50 * R_STEPS_PER_EPOCH,  # epochs <- 50
    "train.kid_every": R_STEPS_PER_EPOCH,
    "eval.kid_image_size": 299,  # kid_img_size = c(299, 299)
    "eval.kid_batch_size": 128,  # evaluate(valid_dataset, batch_size = 128)
})
# Not pinned for R: sample.steps / sample.num_images / eval.kid_steps keep the Keras values; R's
# sampler counts grid points (S - 1 evaluations), so R's KID at "5 steps" is 4 evaluations here.
for key in ("sample.steps", "sample.num_images", "eval.kid_steps"):
  del R[key]

# The offline demo (README, "Config presets": the digits at 8x8, widths 32/64/96, batch 64, 2e-3,
# a short EMA with warm-up, no KID offline); the rest is the Keras example.
DEMO = dict(KERAS, **{
    "model.image_size": 8,
    "train.learning_rate": 2e-3,
    "model.widths": (32, 64, 96),
    "data.dataset": "digits",
    "train.batch_size": 64,
    "train.ema_warmup": True,
    "train.kid_every": 0,
})
for key in ("train.ema_decay", "train.num_steps", "data.repetitions", "sample.num_images"):
  del DEMO[key]

EXPECTED = {"default": KERAS, "r_variant": R, "demo": DEMO}
# Trainable parameters at 64x64: the Keras example's network 1,950,627; the R port's 3,562,211 (as
# printed by its README).
PARAMETERS_AT_64 = {"keras": 1_950_627, "r": 3_562_211}


def _get(config, dotted):
  node = config
  for name in dotted.split("."):
    node = node[name]
  return node


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_presets_hold_the_originals_settings(preset):
  expected = EXPECTED[preset]
  for config in (configs.get_preset(preset), configs.load_config(preset)):
    wrong = {key: (_get(config, key), want) for key, want in expected.items()
             if not (_get(config, key) == want and type(_get(config, key)) is type(want))}
    assert not wrong, f"{preset}: (got, expected from the originals) {wrong}"


def test_demo_ema_is_short():
  """With 0.999 the EMA of a 1,000-step run still holds 0.999^1000 = 37% of the initial weights."""
  config = configs.get_preset("demo")
  assert 0.9 <= config.train.ema_decay < 0.999


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_presets_reach_the_step_and_the_model(preset):
  config = configs.get_preset(preset)
  expected = EXPECTED[preset]
  step = step_lib.StepConfig.from_config(config)
  assert (step.learning_rate, step.weight_decay, step.loss, step.diffusion.target, step.diffusion.schedule) == (
      expected["train.learning_rate"], expected["train.weight_decay"], expected["train.loss"],
      expected["diffusion.target"], expected["diffusion.schedule"])
  assert (step.diffusion.min_signal_rate, step.diffusion.max_signal_rate) == (0.02, 0.95)
  assert step.ema_decay == config.train.ema_decay and step.ema_warmup == expected["train.ema_warmup"]
  model = models.create_model(**config.model)
  models.check_image_size(model, config.model.image_size)
  if config.model.image_size == 64:
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))
    assert models.count_parameters(shapes["params"]) == PARAMETERS_AT_64[model.variant]


def test_unknown_preset_and_key_are_named():
  with pytest.raises(ValueError, match="unknown config preset 'flowers'"):
    configs.load_config("flowers")
  with pytest.raises(ValueError, match="unknown config key 'train.stepz'"):
    configs.load_config("demo", ["--config.train.stepz=3"])


def test_cpu_devices_default_and_auto_override(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
  assert configs.load_config("demo").cpu_devices == "auto"  # one JAX CPU device per core by default
  assert parallel.cpu_device_count(configs.load_config("demo").cpu_devices, 64) == 2
  assert configs.load_config("demo", ["--config.cpu_devices=1"]).cpu_devices == "1"
  assert configs.load_config("default", ["--config.cpu_devices=2"]).cpu_devices == "2"


def test_overrides_take_a_value_after_an_equals_sign_or_a_space():
  tokens = ["--config.train.num_steps", "100", "--config.seed", "-1", "--config.model.widths=(8,16)",
            "--config.data.antialias", "--other", "x"]
  assert arguments.join_override_values(tokens) == [
      "--config.train.num_steps=100", "--config.seed=-1", "--config.model.widths=(8,16)",
      "--config.data.antialias", "--other", "x"]
  spaced = configs.load_config("demo", arguments.join_override_values(["--config.train.num_steps", "7"]))
  assert spaced.train.num_steps == configs.load_config("demo", ["--config.train.num_steps=7"]).train.num_steps == 7


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"ddim-jax {ddim_jax.__version__}"


def test_clipping_and_accumulation_values_are_checked():
  from ddim_jax import errors
  from ddim_jax.training import validation
  config = configs.load_config("demo", ["--config.train.batch_size=8", "--config.train.grad_accum_steps=3"])
  with pytest.raises(errors.ConfigError, match=r"train.grad_accum_steps=3 is invalid: .* = 4\)"):
    validation.validate_config(config, 2)
  validation.validate_config(configs.load_config("demo", ["--config.train.batch_size=8",
                                                          "--config.train.grad_accum_steps=4"]), 2)
  with pytest.raises(errors.ConfigError, match="train.grad_clip_norm"):
    validation.validate_config(configs.load_config("demo", ["--config.train.grad_clip_norm=-1"]), 1)


# An unknown key or a bad value on the command line: refused (one line, exit 2) before anything imports
# JAX; the preset and the overrides are ml_collections only.
REFUSAL_CODE = ("import sys\n"
                "from ddim_jax import cli\n"
                "status = cli.main(sys.argv[1:])\n"
                "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', "
                "'orbax', 'torch', 'tensorflow'))\n"
                "print(heavy[:5])\n"
                "sys.exit(status)\n")


@pytest.mark.parametrize("argv, message", [
    (["train", "--workdir", "{workdir}", "--config.train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    (["train", "--workdir", "{workdir}", "--config", "default", "--config.model.widths=abc"],
     "bad config override --config.model.widths=abc"),
    (["demo", "--workdir", "{workdir}", "--config.nope.x", "1"], "unknown config key 'nope'"),
])
def test_a_bad_override_is_refused_before_jax_is_imported(argv, message, tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-c", REFUSAL_CODE, *(a.format(workdir=workdir) for a in argv)],
                          env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"  # no JAX (nor flax, optax, orbax, torch, TensorFlow) imported
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"ddim-jax {argv[0]}: error: ") and message in lines[0], lines
  assert not workdir.exists()
