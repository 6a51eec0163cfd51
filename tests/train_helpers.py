"""Shared pieces of the training tests: a tiny config and reading a run's final weights."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(cache_dir, **extra) -> list[str]:
  """``--config.*`` overrides that make the demo preset a seconds-long CPU run (16x16, widths 8/16)."""
  values = {
      "model.widths": "(8,16)", "model.block_depth": "1", "train.batch_size": "8", "train.num_steps": "8",
      "train.checkpoint_every": "2", "train.log_every": "2", "train.sample_every": "0",
      "data.cache_dir": str(cache_dir), "sample.num_images": "4", "sample.steps": "3",
  }
  values.update({k: str(v) for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


def tiny_config(cache_dir, **extra):
  """The tiny config as a ConfigDict."""
  from ddim_jax import configs
  return configs.load_config("demo", tiny_overrides(cache_dir, **extra))


def final_weights(workdir, ema=False) -> dict[str, np.ndarray]:
  """The newest checkpoint's weights as a flat torch-named dict of NumPy arrays."""
  from ddim_jax import convert, inference
  _, variables, _, _, step = inference.restore_checkpoint(str(workdir), ema=ema)
  out = convert.flax_to_torch_state_dict(variables)
  out["__step__"] = np.asarray(step)
  return out


def final_state(workdir):
  """(step, TrainState, meta) of the newest checkpoint: EVERY leaf (raw weights, BatchNorm
  statistics, AdamW state, EMA, step) as NumPy, and the metadata (data-iterator position, ...)."""
  import jax
  import ml_collections
  from ddim_jax import checkpointing, models, train
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
    config = ml_collections.ConfigDict(ckpt.read_meta(ckpt.latest_step())["config"])
    model = models.create_model(**config.model)
    abstract = train.abstract_train_state(model, train.StepConfig.from_config(config), int(config.model.image_size),
                                          jax.random.key(0), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    step, state, meta = ckpt.restore_latest(abstract)
  return step, jax.device_get(state), meta


def train_command(workdir, cache_dir, **extra) -> list[str]:
  """The `ddim-jax train` command line of the tiny config (run with the test's Python)."""
  return [sys.executable, "-m", "ddim_jax.cli", "train", "--config", "demo", "--workdir", str(workdir),
          *tiny_overrides(cache_dir, **extra)]


def subprocess_env(devices: int = 1) -> dict:
  """Environment for a training subprocess: CPU, ``devices`` virtual devices, one thread each."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(cmd, env, timeout=600):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
