"""The state a new run starts from: a fresh init, or a weight file's weights (fine-tuning).

``config.train.init_weights`` names a weight file (``ddim-jax export`` or ``demo``, or the torch
twin's safetensors); a resumed run ignores it and continues from its checkpoint.
"""

import jax
import jax.numpy as jnp

from ddim_jax import errors
from ddim_jax.core import models, step as step_lib
from ddim_jax.interop import weight_files


def initial_state(config, model, step_config: step_lib.StepConfig, init_key, image_size: int) -> step_lib.TrainState:
  """The state of a new run: fresh weights, or (``config.train.init_weights``) a weight file's.

  From a file (this project's export or demo weights, or the torch twin's safetensors), the raw
  and the EMA weights both start as the file's weights and BatchNorm statistics; AdamW starts
  fresh. The file's U-Net must be the config's (``config.model``); its image size may differ (the
  network is convolutional). The normaliser stays the training data's.
  """
  state = jax.jit(step_lib.create_train_state, static_argnums=(0, 1, 3))(model, step_config, init_key, image_size)
  path = config.train.get("init_weights")
  if not path:
    return state
  file_model, variables, _, _ = weight_files.load_weights(str(path))
  wanted = models.create_model(**config.model)
  differs = [f"{name} {getattr(file_model, name)!r} (config.model.{name}: {getattr(wanted, name)!r})"
             for name in weight_files.MODEL_KEYS
             if getattr(file_model, name) != getattr(wanted, name)]
  if differs:
    raise errors.ConfigError(f"config.train.init_weights={str(path)!r} holds another U-Net: {', '.join(differs)}; "
                             "set config.model to the file's values (`ddim-jax info --weights FILE` shows them)")
  params = jax.tree.map(jnp.asarray, variables["params"])
  batch_stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
  return state.replace(params=params, batch_stats=batch_stats, ema_params=params, ema_batch_stats=batch_stats,
                       opt_state=step_lib.make_optimizer(step_config).init(params))
