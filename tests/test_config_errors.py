"""Config values, config files and JAX_PLATFORMS that failed with a traceback (issue 31): one line, exit 2.

``CASES``: bad config values and config files, through ``cli.main`` in-process; each must fail
before the workdir exists. ``PLATFORM_CASES``: a ``JAX_PLATFORMS`` whose backend does not start
here, in a subprocess (the backend of this process has started already).
"""

import os
import subprocess
import sys

import pytest

from ddim_jax import cli, configs, errors
from ddim_jax.infra import parallel
from ddim_jax.training import validation
from train_helpers import subprocess_env

NO_TRAIN = """import ml_collections
def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict({"image_size": 8})
  return config
"""
TRAIN_NOT_A_GROUP = """import ml_collections
from ddim_jax.configs import default
def get_config():
  config = ml_collections.ConfigDict(default.get_config().to_dict())
  with config.ignore_type():
    config.train = 5
  return config
"""
CONFIG_FILES = {"no_train.py": NO_TRAIN, "train_not_a_group.py": TRAIN_NOT_A_GROUP}

TINY = ["train", "--config", "demo", "--config.model.widths=(8,16)", "--config.model.block_depth=1"]

# (id, argv after `train --workdir W`, needles of the error line).
CASES = [
    ("seed-negative", [*TINY[1:], "--config.seed=-1"], ["config.seed=-1", "0..4294967295"]),
    ("seed-negative-spaced", [*TINY[1:], "--config.seed", "-1"], ["config.seed=-1", "0..4294967295"]),
    ("seed-too-large", [*TINY[1:], "--config.seed=4294967296"], ["config.seed=4294967296", "0..4294967295"]),
    ("split-seed-negative", [*TINY[1:], "--config.data.split_seed=-1"], ["config.data.split_seed=-1", "0.."]),
    ("keep-checkpoints-0", [*TINY[1:], "--config.train.keep_checkpoints=0"],
     ["config.train.keep_checkpoints=0", ">= 1"]),
    ("repetitions-0", [*TINY[1:], "--config.data.repetitions=0"], ["config.data.repetitions=0", ">= 1"]),
    ("validation-fraction-1", [*TINY[1:], "--config.data.validation_fraction=1.0"],
     ["config.data.validation_fraction=1.0", "[0, 1)"]),
    ("sample-num-images-0", [*TINY[1:], "--config.sample.num_images=0"], ["config.sample.num_images=0", ">= 1"]),
    ("sampler-unknown", [*TINY[1:], "--config.sample.sampler=euler"], ["config.sample.sampler='euler'", "dpmpp_2m"]),
    ("time-grid-unknown", [*TINY[1:], "--config.sample.time_grid=karras"], ["config.sample.time_grid='karras'", "logsnr"]),
    ("logsnr-on-linear", [*TINY[1:], "--config.sample.time_grid=logsnr", "--config.diffusion.schedule=linear"],
     ["logsnr time grid needs the cosine schedule", "uniform"]),
    ("quality-images-1", [*TINY[1:], "--config.eval.num_quality_images=1"],
     ["config.eval.num_quality_images=1", ">= 2"]),
    ("kid-steps-0", [*TINY[1:], "--config.train.kid_every=4", "--config.eval.kid_steps=0"],
     ["config.eval.kid_steps=0", ">= 1"]),
    ("kid-image-size-32", [*TINY[1:], "--config.train.kid_every=4", "--config.eval.kid_image_size=32"],
     ["config.eval.kid_image_size=32", ">= 75"]),
    ("config-file-without-train", ["--config", "{root}/no_train.py"],
     ["no_train.py", "without 'data', 'diffusion', 'eval', 'parallel', 'sample', 'train'",
      "config = default.get_config()"]),
    ("config-file-train-not-a-group", ["--config", "{root}/train_not_a_group.py"],
     ["train_not_a_group.py", "config.train is a int, not a group of keys"]),
]


@pytest.fixture(name="root")
def fixture_root(tmp_path):
  for name, text in CONFIG_FILES.items():
    (tmp_path / name).write_text(text, encoding="utf-8")
  return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_exit_2_and_no_workdir(case, root, capsys, monkeypatch):
  _, argv, needles = case
  monkeypatch.delenv("DDIM_JAX_DEBUG", raising=False)
  workdir = root / "never_workdir"
  argv = ["train", "--workdir", str(workdir), *(a.format(root=root) for a in argv)]
  capsys.readouterr()
  status = cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2 and "Traceback" not in err and len(lines) == 1, err
  assert lines[0].startswith("ddim-jax train: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert not workdir.exists(), "the workdir was created before the config was checked"


def test_presets_pass_the_top_level_check():
  for name in configs.PRESETS:
    configs.check_top_level_keys(configs.get_preset(name), name)


def test_config_file_may_leave_out_the_optional_keys(root):
  path = root / "no_cpu_devices.py"
  path.write_text("from ddim_jax.configs import default\ndef get_config():\n  c = default.get_config()\n"
                  "  del c['cpu_devices']\n  return c\n", encoding="utf-8")
  assert "cpu_devices" not in configs.load_config(str(path))


def test_seed_bound_is_the_command_line_one():
  from ddim_jax import arguments
  assert validation.MAX_SEED == arguments.MAX_SEED


# ------------------------------------------------------------------------------------------------
# JAX_PLATFORMS naming a platform that does not start here.


def test_backend_error_reads_jax_messages():
  error = parallel.backend_error(RuntimeError(
      "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: No such file or directory "
      "(set JAX_PLATFORMS='' to automatically choose an available backend)"), "tpu")
  assert isinstance(error, errors.ConfigError)
  text = str(error)
  assert "JAX_PLATFORMS='tpu'" in text and "Failed to open libtpu.so" in text and "jax[tpu]" in text
  assert "automatically choose" not in text  # JAX's own advice is replaced
  assert parallel.backend_error(RuntimeError("something else"), "tpu") is None
  assert parallel.backend_error(AssertionError(), "cuda") is None  # not raised in xla_bridge
  error = parallel.backend_error(RuntimeError(
      "Unable to initialize backend 'cuda': plugin broke (you may need to uninstall the failing plugin package, "
      "or set JAX_PLATFORMS=cpu to skip this backend.)"), "")
  assert "'cuda'" in str(error) and "JAX_PLATFORMS=cpu" in str(error) and "plugin broke" in str(error)


def write_tiny_weights(path) -> str:
  """A weight file of a freshly initialised tiny U-Net (8x8, widths 8/16): enough for `sample` to run."""
  import jax
  from ddim_jax.core import models
  from ddim_jax.interop import weight_files
  config = configs.load_config("demo", ["--config.model.widths=(8,16)", "--config.model.block_depth=1"])
  model = models.create_model(**config.model)
  variables = models.init_variables(model, jax.random.key(0), 8)
  weight_files.save_weights(str(path), model, variables, {"mean": [0.5] * 3, "variance": [0.1] * 3}, 8,
                            weights="raw", data=config.data)
  return str(path)


def _has_nvidia_gpu() -> bool:
  return os.path.exists("/dev/nvidiactl")


def _has_tpu() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None or os.path.exists("/dev/accel0")


# (id, platform, argv (W: a weight file), skip when the platform is there).
PLATFORM_CASES = [
    ("train-tpu", "tpu", ["train", "--config", "demo", "--workdir", "{root}/never_workdir"], _has_tpu),
    ("demo-tpu", "tpu", ["demo", "--workdir", "{root}/never_workdir"], _has_tpu),
    ("sample-tpu", "tpu", ["sample", "--weights", "{root}/w.safetensors", "--out", "{root}/x.png"], _has_tpu),
    ("sample-cuda", "cuda", ["sample", "--weights", "{root}/w.safetensors", "--out", "{root}/x.png"], _has_nvidia_gpu),
]


@pytest.mark.parametrize("case", PLATFORM_CASES, ids=[c[0] for c in PLATFORM_CASES])
@pytest.mark.slow
def test_jax_platforms_without_that_device_is_one_line(case, tmp_path):
  _, platform, argv, present = case
  if present():
    pytest.skip(f"this machine has a {platform}")
  write_tiny_weights(tmp_path / "w.safetensors")
  env = {**subprocess_env(1), "JAX_PLATFORMS": platform}
  env.pop("DDIM_JAX_DEBUG", None)
  result = subprocess.run([sys.executable, "-m", "ddim_jax.cli", *(a.format(root=tmp_path) for a in argv)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"ddim-jax {argv[0]}: error: environment variable JAX_PLATFORMS='{platform}'"), lines[0]
  assert "unset JAX_PLATFORMS" in lines[0]
  assert not (tmp_path / "never_workdir").exists() and not (tmp_path / "x.png").exists()
