"""The training step in PyTorch: the loss, AdamW and the EMA of the weights (twin of ddim_jax/core/step.py).

Random draws (noises and diffusion times, or the rates of those times) are arguments, so a parity
test can feed this step and the JAX one the same NumPy draws. BatchNorm statistics are those of
the whole batch (the twin of the JAX step's synchronised BatchNorm on one device).
"""

import copy

import torch

from ddim_torch_ref import sampling

LOSSES = ("mae", "mse")


def make_optimizer(model, learning_rate=1e-3, weight_decay=1e-4):
  """AdamW as optax.adamw: b1 0.9, b2 0.999, eps 1e-8, decoupled decay on every parameter."""
  return torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=weight_decay)


def compute_loss(model, images, noises, noise_rates, signal_rates, loss="mae", target="noise"):
  """The Keras training loss on normalised ``images`` (B, C, H, W) at the given rates.

  Returns:
    (loss, metrics): the optimised loss (MAE or MSE on the target, mean over every element) and
    {'loss', 'noise_loss', 'image_loss'} (the two MAEs the Keras example logs), detached.
  """
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
  metrics = {"loss": value.detach(), "noise_loss": torch.mean(torch.abs(pred_noises - noises)).detach(),
             "image_loss": torch.mean(torch.abs(pred_images - images)).detach()}
  return value, metrics


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
  """The EMA decay of optimiser step ``step`` (0-based): constant, or min(decay, (1+n)/(10+n))."""
  if not warmup:
    return decay
  n = step + 1
  return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
  """An exponential moving average over a model's parameters AND buffers (BatchNorm statistics).

  After every step: ema = s * value + (1 - s) * ema with s = 1 - decay, in float32 (the arithmetic
  of ``optax.incremental_update``). It starts as a copy of the model (not the fresh random init
  Keras' clone_model gives).
  """

  def __init__(self, model, decay=0.999, warmup=False):
    self.decay, self.warmup = decay, warmup
    self.model = copy.deepcopy(model).eval()
    for p in self.model.parameters():
      p.requires_grad_(False)

  @torch.no_grad()
  def update(self, model, step: int):
    """Moves the average towards ``model``'s weights after optimiser step ``step`` (0-based)."""
    decay = torch.tensor(ema_decay_at(step, self.decay, self.warmup), dtype=torch.float32)
    step_size = 1.0 - decay
    ema_state = self.model.state_dict()
    for name, value in model.state_dict().items():
      ema_state[name].copy_(step_size * value + (1.0 - step_size) * ema_state[name])


def train_step_from_draws(model, optimizer, ema, step, images, noises, noise_rates, signal_rates, loss="mae",
                          target="noise", grad_clip_norm=0.0, grad_accum_steps=1):
  """One AdamW step (model in train mode) and the EMA update, given every random quantity.

  ``grad_accum_steps`` > 1: the batch in that many equal consecutive micro-batches, each forward
  (BatchNorm on its own statistics) and backward on ``loss / grad_accum_steps``, then one step.
  ``grad_clip_norm`` > 0: ``clip_grad_norm_`` before the step (torch divides by norm + 1e-6, optax
  by the norm: Adam's scale invariance makes the difference vanish in the update).

  Returns:
    dict of detached scalar metrics: loss, noise_loss, image_loss (means over the micro-batches).
  """
  model.train()
  optimizer.zero_grad(set_to_none=True)
  k = int(grad_accum_steps)
  if images.shape[0] % k:
    raise ValueError(f"grad_accum_steps={k} does not divide the batch of {images.shape[0]} images")
  totals = {}
  for micro in zip(*(t.chunk(k) for t in (images, noises, noise_rates, signal_rates))):
    value, metrics = compute_loss(model, *micro, loss, target)
    (value / k).backward()
    for name, m in metrics.items():
      totals[name] = totals.get(name, 0.0) + m
  metrics = {name: m / k for name, m in totals.items()}
  if grad_clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
  optimizer.step()
  if ema is not None:
    ema.update(model, step)
  return metrics


def train_step(model, optimizer, ema, step, images, noises, diffusion_times, schedule_fn, loss="mae",
               target="noise"):
  """``train_step_from_draws`` at the rates ``schedule_fn(diffusion_times)``."""
  noise_rates, signal_rates = schedule_fn(diffusion_times)
  return train_step_from_draws(model, optimizer, ema, step, images, noises, noise_rates, signal_rates, loss, target)
