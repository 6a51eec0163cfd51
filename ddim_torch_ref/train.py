"""The training step in PyTorch: the loss, AdamW and the EMA of the weights (twin of ddim_jax/train.py).

Random draws (diffusion times and noises) are arguments, so a parity test can feed the JAX step and
this one the same NumPy draws.
"""

import copy

import torch

from ddim_torch_ref import sampling

LOSSES = ("mae", "mse")


def make_optimizer(model, learning_rate=1e-3, weight_decay=1e-4):
  """AdamW as optax.adamw: b1 0.9, b2 0.999, eps 1e-8, decoupled decay on every parameter."""
  return torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=weight_decay)


def diffusion_loss(model, images, noises, diffusion_times, schedule_fn, loss="mae", target="noise"):
  """The Keras training loss on normalised ``images`` (B, C, H, W).

  Returns:
    (loss, (noise_loss, image_loss)): the optimised loss (MAE or MSE on the target, mean over
    every element) and the two MAE metrics the Keras example logs.
  """
  noise_rates, signal_rates = schedule_fn(diffusion_times)
  noisy_images = signal_rates * images + noise_rates * noises
  output = model(noisy_images, sampling.network_variances(noise_rates, signal_rates, target))
  pred_noises, pred_images = sampling.denoise(output, noisy_images, noise_rates, signal_rates, target)
  prediction, truth = (pred_noises, noises) if target == "noise" else (pred_images, images)
  if loss == "mae":
    value = torch.mean(torch.abs(prediction - truth))
  elif loss == "mse":
    value = torch.mean(torch.square(prediction - truth))
  else:
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
  metrics = (torch.mean(torch.abs(pred_noises - noises)).detach(), torch.mean(torch.abs(pred_images - images)).detach())
  return value, metrics


class EMA:
  """An exponential moving average over a model's parameters AND buffers (BatchNorm statistics).

  ``ema = decay * ema + (1 - decay) * value`` after every step, starting from a copy of the
  model (not the fresh random init Keras' clone_model gives).
  """

  def __init__(self, model, decay=0.999):
    self.decay = decay
    self.model = copy.deepcopy(model).eval()
    for p in self.model.parameters():
      p.requires_grad_(False)

  @torch.no_grad()
  def update(self, model):
    """Moves the average towards ``model``'s current weights."""
    ema_state = self.model.state_dict()
    for name, value in model.state_dict().items():
      ema_state[name].copy_(self.decay * ema_state[name] + (1 - self.decay) * value)


def train_step(model, optimizer, ema, images, noises, diffusion_times, schedule_fn, loss="mae", target="noise"):
  """One optimiser step (model in train mode, BatchNorm on batch statistics) and the EMA update.

  Returns:
    dict of float metrics: loss, noise_loss, image_loss.
  """
  model.train()
  optimizer.zero_grad(set_to_none=True)
  value, (noise_loss, image_loss) = diffusion_loss(model, images, noises, diffusion_times, schedule_fn, loss, target)
  value.backward()
  optimizer.step()
  if ema is not None:
    ema.update(model)
  return {"loss": value.detach(), "noise_loss": noise_loss, "image_loss": image_loss}
