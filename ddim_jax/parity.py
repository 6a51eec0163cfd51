"""JAX-vs-PyTorch parity: non-trivial shared weights, a briefly trained reference, and the comparisons.

Used by ``tests/test_parity.py`` and ``scripts/parity_report.py``. Rules (README, "Parity"):
every random draw is made once in NumPy and fed to both twins; weights are converted, never
re-initialised; forward comparisons perturb every tensor (a fresh model's zero head would make
them vacuous); trajectories use a briefly trained model, because a random U-Net's DDIM trajectory
grows by up to 1/min_signal_rate per step and makes any absolute bound meaningless.

torch is imported inside the functions that need it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import convert, data, models, sampling, schedules, train


def _nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3))


def _nhwc(x) -> np.ndarray:
  return np.moveaxis(np.asarray(x), -3, -1)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, images, noise_variances, train: bool):
  """``model.apply`` under jit; in train mode also returns the updated batch statistics."""
  if train:
    return model.apply(variables, images, noise_variances, train=True, mutable=["batch_stats"])
  return model.apply(variables, images, noise_variances, train=False)


def batch_statistics(model, variables, images, noise_variances) -> dict:
  """The batch mean/variance every BatchNorm layer sees in a train-mode pass, as a batch_stats tree.

  Backed out of one running-average update: new = m * old + (1 - m) * batch.
  """
  momentum = models.get_variant_spec(model.variant).bn_momentum
  _, updates = _apply(model, variables, images, noise_variances, True)
  return jax.tree.map(lambda new, old: (new - momentum * old) / (1 - momentum), updates["batch_stats"],
                      variables["batch_stats"])


def perturbed_variables(model, image_size: int, seed: int = 0, scale: float = 0.3) -> dict:
  """Initialised variables with EVERY tensor perturbed, for forward comparisons.

  Kernels get noise of ``scale`` times their init's standard deviation (the zero-initialised head
  gets a fan-in scaled kernel, so predictions are O(1) and non-zero), biases and BN affine
  parameters noise of 0.1, and BatchNorm statistics are the batch statistics of a calibration
  batch (so eval-mode activations stay O(1), as in a trained model) jittered by 10%.
  """
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(np.asarray, jax.jit(models.init_variables, static_argnums=(0, 2))(
      model, jax.random.key(seed), image_size))

  def perturb(path, x):
    leaf = getattr(path[-1], "key", "")
    if leaf == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      std = max(float(np.std(x)), 1.0 / np.sqrt(fan_in))
      return (x + scale * std * rng.standard_normal(x.shape)).astype(np.float32)
    if leaf == "scale":
      return (x * rng.uniform(0.8, 1.2, x.shape)).astype(np.float32)
    return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
  images = rng.standard_normal((8, image_size, image_size, model.channels)).astype(np.float32)
  noise_variances = rng.uniform(0.05, 1.0, (8, 1, 1, 1)).astype(np.float32)
  stats = batch_statistics(model, {"params": params, "batch_stats": variables["batch_stats"]}, images,
                           noise_variances)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.asarray(s) * (rng.uniform(0.9, 1.1, s.shape) if getattr(path[-1], "key", "") == "var"
                                        else 1.0) + (0.1 * rng.standard_normal(s.shape) if getattr(
                                            path[-1], "key", "") == "mean" else 0.0)).astype(np.float32), stats)
  return {"params": params, "batch_stats": stats}


def torch_twin(model, variables):
  """A ``ddim_torch_ref`` UNet with ``model``'s hyper-parameters, loaded with ``variables``."""
  from ddim_torch_ref import models as torch_models  # pylint: disable=import-outside-toplevel
  twin = torch_models.create_model(variant=model.variant, widths=model.widths, block_depth=model.block_depth,
                                   embedding_dims=model.embedding_dims, channels=model.channels)
  return convert.flax_to_torch(variables, twin)


def mixed_noise_inputs(batch: int, image_size: int, channels: int, seed: int = 1):
  """A batch of noisy images at mixed noise levels (t spread over [0, 1], endpoints included)."""
  rng = np.random.default_rng(seed)
  diffusion_times = np.linspace(0.0, 1.0, batch, dtype=np.float32).reshape(batch, 1, 1, 1)
  noise_rates, signal_rates = schedules.offset_cosine_schedule(jnp.asarray(diffusion_times))
  images = rng.uniform(-1.5, 1.5, (batch, image_size, image_size, channels)).astype(np.float32)
  noises = rng.standard_normal(images.shape).astype(np.float32)
  noisy_images = np.asarray(signal_rates * images + noise_rates * noises, np.float32)
  return noisy_images, np.asarray(jnp.square(noise_rates), np.float32)


def forward_parity(model, variables, image_size: int, batch: int = 8, seed: int = 1) -> dict:
  """Max differences between the twins' noise predictions (BN eval and train) and BN statistics.

  Returns:
    dict with forward_max_abs / forward_max_rel (eval mode), forward_bn_train_max_abs /
    forward_bn_train_max_rel (train mode), bn_stats_max_abs (running statistics after the train
    pass) and output_max_abs (the scale of the predictions).
  """
  import torch  # pylint: disable=import-outside-toplevel
  twin = torch_twin(model, variables)
  noisy_images, noise_variances = mixed_noise_inputs(batch, image_size, model.channels, seed)
  x_t, v_t = torch.from_numpy(_nchw(noisy_images)), torch.from_numpy(noise_variances.copy())

  out_eval = np.asarray(_apply(model, variables, noisy_images, noise_variances, False))
  out_train, updates = _apply(model, variables, noisy_images, noise_variances, True)
  with torch.no_grad():
    ref_eval = _nhwc(twin.eval()(x_t, v_t).numpy())
    ref_train = _nhwc(twin.train()(x_t, v_t).numpy())
  new_stats = convert.flax_to_torch_state_dict({"batch_stats": updates["batch_stats"]})
  twin_state = twin.state_dict()
  bn_diff = max(float(np.max(np.abs(v - twin_state[k].numpy()))) for k, v in new_stats.items())
  return {
      "forward_max_abs": float(np.max(np.abs(out_eval - ref_eval))),
      "forward_max_rel": float(np.max(np.abs(out_eval - ref_eval)) / np.max(np.abs(ref_eval))),
      "forward_bn_train_max_abs": float(np.max(np.abs(np.asarray(out_train) - ref_train))),
      "forward_bn_train_max_rel": float(np.max(np.abs(np.asarray(out_train) - ref_train)) / np.max(np.abs(ref_train))),
      "bn_stats_max_abs": bn_diff,
      "output_max_abs": float(np.max(np.abs(ref_eval))),
  }


def load_digits_images(image_size: int) -> np.ndarray:
  """scikit-learn's bundled digits (1,797 8x8 images) as uint8 RGB (N, S, S, 3), bilinear-upsampled."""
  return data.load_digits_images(image_size)


@functools.lru_cache(maxsize=4)
def trained_reference(variant: str = "keras", widths=(16, 32, 48), block_depth: int = 2, image_size: int = 16,
                      num_steps: int = 300, batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0):
  """Trains the torch twin briefly on the bundled digits: a model whose DDIM trajectories stay bounded.

  Deterministic on CPU for a given seed. Takes seconds at the default (16x16, widths 16/32/48).

  Returns:
    (jax_model, jax_variables, normalizer): the trained weights converted to Flax, and the data
    normaliser {'mean', 'variance'} of the digits.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import models as torch_models  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import schedules as torch_schedules  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import train as torch_train  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  data = load_digits_images(image_size).astype(np.float32) / 255.0
  normalizer = {"mean": data.mean(axis=(0, 1, 2)).astype(np.float32), "variance": data.var(axis=(0, 1, 2)).astype(
      np.float32)}
  normalized = (data - normalizer["mean"]) / np.sqrt(normalizer["variance"])
  images = torch.from_numpy(_nchw(normalized))
  twin = torch_models.create_model(variant=variant, widths=widths, block_depth=block_depth)
  optimizer = torch_train.make_optimizer(twin, learning_rate)
  schedule_fn = torch_schedules.get_schedule("cosine")
  rng = np.random.default_rng(seed)
  for step in range(num_steps):
    idx = rng.choice(len(images), batch_size, replace=False)
    noises = torch.from_numpy(rng.standard_normal((batch_size,) + tuple(images.shape[1:])).astype(np.float32))
    times = torch.from_numpy(rng.uniform(0.0, 1.0, (batch_size, 1, 1, 1)).astype(np.float32))
    torch_train.train_step(twin, optimizer, None, step, images[idx], noises, times, schedule_fn)
  model = models.create_model(variant=variant, widths=widths, block_depth=block_depth)
  reference = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_size))
  variables = convert.torch_state_dict_to_flax(twin.state_dict(), reference)
  return model, variables, normalizer


def trajectory_parity(model, variables, image_size: int, steps: int, eta: float = 0.0, batch: int = 4,
                      seed: int = 2) -> dict:
  """Max differences over EVERY state of a DDIM trajectory of the twins from the same noise.

  For eta > 0 the per-step draws are made in NumPy and injected into both.

  Returns:
    dict with max_abs / max_rel over all noisy and predicted images of the trajectory, final_max_abs
    (the last predicted images) and state_max_abs (the scale of the states).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import sampling as torch_sampling  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  shape = (batch, image_size, image_size, model.channels)
  initial_noise = rng.standard_normal(shape).astype(np.float32)
  step_noises = rng.standard_normal((steps,) + shape).astype(np.float32) if eta > 0 else None
  out = sampling.generate(model, variables, jnp.asarray(initial_noise),
                          step_noises=None if step_noises is None else jnp.asarray(step_noises), steps=steps, eta=eta,
                          return_trajectory=True)
  twin = torch_twin(model, variables).eval()
  ref = torch_sampling.reverse_diffusion(
      twin, torch.from_numpy(_nchw(initial_noise)), steps, eta=eta,
      step_noises=None if step_noises is None else torch.from_numpy(_nchw(step_noises)), return_trajectory=True)
  diffs, scales = [], []
  for key in ("noisy_trajectory", "pred_trajectory"):
    a, b = np.asarray(out[key]), _nhwc(ref[key].numpy())
    diffs.append(np.max(np.abs(a - b)))
    scales.append(np.max(np.abs(b)))
  final = float(np.max(np.abs(np.asarray(out["pred_images"]) - _nhwc(ref["pred_images"].numpy()))))
  return {"max_abs": float(max(diffs)), "max_rel": float(max(diffs) / max(scales)), "final_max_abs": final,
          "state_max_abs": float(max(scales))}


def _relative_tree_diff(jax_state: dict, torch_state: dict, masks: dict | None = None) -> tuple[float, str]:
  """max over tensors of max|a - b| / max|b| (tensor-relative), and the worst tensor's name.

  ``masks`` (name -> bool array) restricts the difference to the selected elements.
  """
  worst, worst_name = 0.0, ""
  for name, value in jax_state.items():
    ref = torch_state[name]
    diff = np.abs(value - ref)
    if masks is not None and name in masks:
      diff = np.where(masks[name], diff, 0.0)
    rel = float(np.max(diff) / max(float(np.max(np.abs(ref))), 1e-30))
    if rel > worst:
      worst, worst_name = rel, name
  return worst, worst_name


def train_step_parity(model, variables, image_size: int, num_steps: int = 10, batch: int = 8, seed: int = 4,
                      step_config=None, check_steps=(1,), min_first_grad: float = 0.0) -> dict:
  """Runs the JAX and the torch training step side by side from the same weights and draws.

  Each step's normalised images, noises and diffusion times are drawn in NumPy; the rates of the
  times come from the shared float64 table (1-ulp sin/cos differences between the frameworks are
  amplified ~6,000x by the embedding; the schedule itself is tested against its closed form).

  Adam's first step moves every parameter by about lr * g / (|g| + eps): for the rare elements
  whose gradient is within a few eps (1e-8) of zero, the ~1e-10 absolute float32 difference of
  the two frameworks' gradient sums changes the step by up to lr. ``min_first_grad`` > 0 leaves
  the parameters whose first-step gradient is smaller than it out of ``params_rel_*`` and counts
  them in ``ill_conditioned``.

  Returns:
    dict: loss_abs_1 (the optimised loss of the first step, from identical weights), loss_max_abs
    (over all steps, as the weights drift apart by float32 rounding), metrics_max_abs (the noise and image
    MAE metrics), and for each step n in ``check_steps`` + (num_steps,):
    ``params_rel_<n>``, ``batch_stats_rel_<n>``, ``ema_rel_<n>`` (max over tensors of the
    tensor-relative difference) and ``worst_<n>`` (the tensor that attains the largest).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import train as torch_train  # pylint: disable=import-outside-toplevel
  step_config = step_config or train.StepConfig()
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
      opt_state=train.make_optimizer(step_config).init(variables["params"]), ema_params=variables["params"],
      ema_batch_stats=variables["batch_stats"])
  jax_step = jax.jit(functools.partial(train.train_step_from_draws, model=model, step_config=step_config,
                                       axis_name=None))
  twin = torch_twin(model, variables)
  optimizer = torch_train.make_optimizer(twin, step_config.learning_rate, step_config.weight_decay)
  ema = torch_train.EMA(twin, step_config.ema_decay, step_config.ema_warmup)
  rng = np.random.default_rng(seed)
  out = {"loss_max_abs": 0.0, "metrics_max_abs": 0.0}
  for step in range(num_steps):
    shape = (batch, image_size, image_size, model.channels)
    images = rng.standard_normal(shape).astype(np.float32)
    noises = rng.standard_normal(shape).astype(np.float32)
    noise_rates, signal_rates = step_config.diffusion.rate_table(rng.uniform(0.0, 1.0, (batch, 1, 1, 1)))
    state, metrics = jax_step(state, images, noises, noise_rates, signal_rates)
    torch_metrics = torch_train.train_step_from_draws(
        twin, optimizer, ema, step, torch.from_numpy(_nchw(images)), torch.from_numpy(_nchw(noises)),
        torch.from_numpy(noise_rates), torch.from_numpy(signal_rates), step_config.loss, step_config.diffusion.target)
    out["loss_max_abs"] = max(out["loss_max_abs"], abs(float(metrics["loss"]) - float(torch_metrics["loss"])))
    if step == 0:
      out["loss_abs_1"] = out["loss_max_abs"]  # identical weights: the loss itself
    for key in ("noise_loss", "image_loss"):
      out["metrics_max_abs"] = max(out["metrics_max_abs"], abs(float(metrics[key]) - float(torch_metrics[key])))
    n = step + 1
    if n == 1:
      masks = {k: np.abs(p.grad.numpy()) >= min_first_grad for k, p in twin.named_parameters()}
      out["ill_conditioned"] = int(sum(np.sum(~m) for m in masks.values()))
      out["num_parameters"] = int(sum(m.size for m in masks.values()))
    if n in check_steps or n == num_steps:
      raw = convert.flax_to_torch_state_dict(state.variables(ema=False))
      ema_jax = convert.flax_to_torch_state_dict(state.variables(ema=True))
      twin_state = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
      ema_state = {k: v.detach().numpy() for k, v in ema.model.state_dict().items()}
      param_names = {k for k in raw if not k.endswith(("running_mean", "running_var"))}
      out[f"params_rel_{n}"], worst = _relative_tree_diff({k: raw[k] for k in param_names}, twin_state, masks)
      out[f"batch_stats_rel_{n}"], _ = _relative_tree_diff({k: v for k, v in raw.items() if k not in param_names},
                                                           twin_state)
      out[f"ema_rel_{n}"], _ = _relative_tree_diff(ema_jax, ema_state)
      out[f"worst_{n}"] = worst
  return out
