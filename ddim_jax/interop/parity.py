"""JAX-vs-PyTorch parity: the comparisons of noise predictions, trajectories and training steps.

Used by ``tests/test_parity.py`` and ``scripts/parity_report.py``; the weights compared are
``parity_fixtures``'. Rules (README, "Parity"): every random draw is made once in NumPy and fed
to both twins; weights are converted, never re-initialised.

Precision: the torch twin runs on the CPU in float32 and is the reference. On GPUs XLA's default
precision runs float32 convolutions and matmuls in TF32 (bf16 passes on TPUs), so a float32 bound
holds there only under ``precision("highest")``; on CPU both settings compute the same numbers.

torch is imported inside the functions that need it.
"""

import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.core import models, sampling, schedules, solvers, step as step_lib
from ddim_jax.interop import weight_files

PRECISIONS = ("default", "highest")


@contextlib.contextmanager
def precision(name: str = "highest"):
  """The precision of JAX's float32 convolutions and matmuls inside the block; torch stays float32.

  'highest': ``jax.default_matmul_precision("highest")``, full float32 on GPUs and TPUs (what a
  float32 bound needs there). 'default': XLA's default (even where JAX_DEFAULT_MATMUL_PRECISION
  says otherwise): TF32 on Ampere and later GPUs, bf16 passes on TPUs; on CPU float32 either way.
  In both cases torch's TF32 switches (CUDA matmuls, cuDNN convolutions) are off inside the block
  and restored after: the twin is the float32 reference (it runs on the CPU here, where they do
  nothing).
  """
  if name not in PRECISIONS:
    raise ValueError(f"unknown precision {name!r}; choose one of {PRECISIONS}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
  saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if torch else None
  try:
    if torch:
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with jax.default_matmul_precision("highest" if name == "highest" else None):  # None: XLA's default
      yield
  finally:
    if torch:
      torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_accelerator() -> bool:
  """Whether JAX computes on a GPU or TPU (where 'default' precision is not float32)."""
  return jax.default_backend() != "cpu"


def device_description() -> dict:
  """What JAX computes on: backend, device kind and count, and the versions of both frameworks."""
  import torch  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "torch": torch.__version__, "torch_device": "cpu",
          "torch_threads": torch.get_num_threads()}


def pin_torch_threads(threads: int | None = None) -> int:
  """Sets torch's CPU threads (default: half the CPUs this process may use, 1 to 4); returns the count.

  The twin's ops are small (16x16 trajectories, batch 4; the fixture's batch of 32 at 16x16): torch's
  default of one thread per core mostly spins, and its OpenMP threads collapse when another job holds
  a core (on the shared 2-core CPU the fixture's 300 steps took 616 s with 2 threads).
  """
  import torch  # pylint: disable=import-outside-toplevel
  if threads is None:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = min(4, available // 2)
  torch.set_num_threads(max(1, int(threads)))
  return torch.get_num_threads()


def no_timer(name: str):  # pylint: disable=unused-argument
  """The default ``timer`` of the comparisons: times nothing."""
  return contextlib.nullcontext()


class Phases:
  """Wall-clock seconds of named phases, in order of first use: ``with phases("name"): ...``.

  Passed as ``timer`` to the comparisons below, which time their compiles and each framework's run.
  """

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


_EXECUTABLES: dict = {}


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves)


def _executable(jitted, label: str, timer, static: dict, **dynamic):
  """``jitted`` compiled ahead of time for ``dynamic`` (the compile timed as ``label``), cached.

  Compiling apart from running lets the report time the two. The cache key holds the shapes and the
  matmul precision in force: the same call under another precision is another program.
  """
  key = (jitted, tuple(sorted(static.items())), _signature(dynamic), jax.config.jax_default_matmul_precision)
  if key not in _EXECUTABLES:
    with timer(label):
      _EXECUTABLES[key] = jitted.lower(**static, **dynamic).compile()
  return _EXECUTABLES[key]


def nchw(x: np.ndarray) -> np.ndarray:
  """(..., H, W, C) -> (..., C, H, W), contiguous (what torch takes)."""
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3))


def nhwc(x) -> np.ndarray:
  """(..., C, H, W) -> (..., H, W, C)."""
  return np.moveaxis(np.asarray(x), -3, -1)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, images, noise_variances, train: bool):
  """``model.apply`` under jit; in train mode also returns the updated batch statistics."""
  if train:
    return model.apply(variables, images, noise_variances, train=True, mutable=["batch_stats"])
  return model.apply(variables, images, noise_variances, train=False)


def predict(model, variables, images, noise_variances, train: bool) -> np.ndarray:
  """The model's noise prediction (BatchNorm on the batch's statistics when ``train``), as NumPy."""
  out = _apply(model, variables, images, noise_variances, train)
  return np.asarray(out[0] if train else out)


def _apply_executable(model, train: bool, timer=no_timer, **inputs):
  """``_apply`` compiled for ``inputs`` (variables, images, noise_variances); see ``_executable``."""
  return _executable(_apply, f"JAX compile: forward, BN {'train' if train else 'eval'}", timer,
                     dict(model=model, train=train), **inputs)


def batch_statistics(model, variables, images, noise_variances, timer=no_timer) -> dict:
  """The batch mean/variance every BatchNorm layer sees in a train-mode pass, as a batch_stats tree.

  Backed out of one running-average update: new = m * old + (1 - m) * batch.
  """
  momentum = models.get_variant_spec(model.variant).bn_momentum
  inputs = dict(variables=variables, images=images, noise_variances=noise_variances)
  _, updates = _apply_executable(model, True, timer, **inputs)(**inputs)
  return jax.tree.map(lambda new, old: (new - momentum * old) / (1 - momentum), updates["batch_stats"],
                      variables["batch_stats"])


def torch_twin(model, variables):
  """A ``ddim_torch_ref`` UNet with ``model``'s hyper-parameters, loaded with ``variables``."""
  from ddim_torch_ref import models as torch_models  # pylint: disable=import-outside-toplevel
  twin = torch_models.create_model(variant=model.variant, widths=model.widths, block_depth=model.block_depth,
                                   embedding_dims=model.embedding_dims, channels=model.channels)
  return weight_files.flax_to_torch(variables, twin)


def mixed_noise_inputs(batch: int, image_size: int, channels: int, seed: int = 1):
  """A batch of noisy images at mixed noise levels (t spread over [0, 1], endpoints included)."""
  rng = np.random.default_rng(seed)
  diffusion_times = np.linspace(0.0, 1.0, batch, dtype=np.float32).reshape(batch, 1, 1, 1)
  noise_rates, signal_rates = schedules.offset_cosine_schedule(jnp.asarray(diffusion_times))
  images = rng.uniform(-1.5, 1.5, (batch, image_size, image_size, channels)).astype(np.float32)
  noises = rng.standard_normal(images.shape).astype(np.float32)
  noisy_images = np.asarray(signal_rates * images + noise_rates * noises, np.float32)
  return noisy_images, np.asarray(jnp.square(noise_rates), np.float32)


def forward_parity(model, variables, image_size: int, batch: int = 8, seed: int = 1, timer=no_timer) -> dict:
  """Max differences between the twins' noise predictions (BN eval and train) and BN statistics.

  ``timer`` (e.g. a ``Phases``) times the JAX compiles, the JAX run and the torch run apart.

  Returns:
    dict with forward_max_abs / forward_max_rel (eval mode), forward_bn_train_max_abs /
    forward_bn_train_max_rel (train mode), bn_stats_max_abs (running statistics after the train
    pass) and output_max_abs (the scale of the predictions).
  """
  import torch  # pylint: disable=import-outside-toplevel
  twin = torch_twin(model, variables)
  noisy_images, noise_variances = mixed_noise_inputs(batch, image_size, model.channels, seed)
  x_t, v_t = torch.from_numpy(nchw(noisy_images)), torch.from_numpy(noise_variances.copy())

  inputs = dict(variables=variables, images=noisy_images, noise_variances=noise_variances)
  eval_fn, train_fn = (_apply_executable(model, mode, timer, **inputs) for mode in (False, True))
  with timer("JAX run: forward"):
    out_eval = np.asarray(eval_fn(**inputs))
    out_train, updates = jax.tree.map(np.asarray, train_fn(**inputs))
  with timer("torch run: forward"), torch.no_grad():
    ref_eval = nhwc(twin.eval()(x_t, v_t).numpy())
    ref_train = nhwc(twin.train()(x_t, v_t).numpy())
  new_stats = weight_files.flax_to_torch_state_dict({"batch_stats": updates["batch_stats"]})
  twin_state = twin.state_dict()
  bn_diff = max(float(np.max(np.abs(v - twin_state[k].numpy()))) for k, v in new_stats.items())
  return {
      "forward_max_abs": float(np.max(np.abs(out_eval - ref_eval))),
      "forward_max_rel": float(np.max(np.abs(out_eval - ref_eval)) / np.max(np.abs(ref_eval))),
      "forward_bn_train_max_abs": float(np.max(np.abs(out_train - ref_train))),
      "forward_bn_train_max_rel": float(np.max(np.abs(out_train - ref_train)) / np.max(np.abs(ref_train))),
      "bn_stats_max_abs": bn_diff,
      "output_max_abs": float(np.max(np.abs(ref_eval))),
  }


@functools.partial(jax.jit, static_argnames=("model", "steps", "etas", "sampler"))
def _trajectories(model, variables, initial_noise, step_noises, steps: int, etas: tuple,
                  sampler: solvers.Sampler = solvers.DDIM):
  """``sampling.generate`` with every trajectory, for each eta of ``etas``: one program, one compile."""
  return tuple(sampling.generate(model, variables, initial_noise, step_noises=step_noises if eta > 0 else None,
                                 steps=steps, eta=eta, return_trajectory=True, sampler=sampler) for eta in etas)


def trajectory_parities(model, variables, image_size: int, steps: int, etas=(0.0, 1.0), batch: int = 4,
                        seed: int = 2, timer=no_timer, sampler: solvers.Sampler = solvers.DDIM) -> dict:
  """``trajectory_parity`` for several etas, from the same initial noise and step draws: {eta: result}.

  The JAX trajectories of all etas are one compiled program (``generate`` takes eta as a static
  argument, so separate calls would compile once per eta). ``sampler``: DDIM (any eta) or
  DPM-Solver++(2M) (eta 0 only), on its time grid, the same in both twins.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import sampling as torch_sampling  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import solvers as torch_solvers  # pylint: disable=import-outside-toplevel
  etas = tuple(float(eta) for eta in etas)
  rng = np.random.default_rng(seed)
  shape = (batch, image_size, image_size, model.channels)
  initial_noise = rng.standard_normal(shape).astype(np.float32)
  step_noises = rng.standard_normal((steps,) + shape).astype(np.float32) if max(etas) > 0 else None
  inputs = dict(variables=variables, initial_noise=initial_noise, step_noises=step_noises)
  run = _executable(_trajectories, "JAX compile: trajectories", timer,
                    dict(model=model, steps=steps, etas=etas, sampler=sampler), **inputs)
  with timer("JAX run: trajectories"):
    outs = jax.tree.map(np.asarray, run(**inputs))
  twin = torch_twin(model, variables).eval()
  results = {}
  for eta, out in zip(etas, outs):
    with timer("torch run: trajectories"):
      ref = torch_sampling.reverse_diffusion(
          twin, torch.from_numpy(nchw(initial_noise)), steps, eta=eta,
          step_noises=torch.from_numpy(nchw(step_noises)) if eta > 0 else None, return_trajectory=True,
          sampler=torch_solvers.Sampler(sampler.name, sampler.time_grid))
    diffs, scales = [], []
    for key in ("noisy_trajectory", "pred_trajectory"):
      a, b = out[key], nhwc(ref[key].numpy())
      diffs.append(np.max(np.abs(a - b)))
      scales.append(np.max(np.abs(b)))
    final = float(np.max(np.abs(out["pred_images"] - nhwc(ref["pred_images"].numpy()))))
    results[eta] = {"max_abs": float(max(diffs)), "max_rel": float(max(diffs) / max(scales)),
                    "final_max_abs": final, "state_max_abs": float(max(scales))}
  return results


def trajectory_parity(model, variables, image_size: int, steps: int, eta: float = 0.0, batch: int = 4,
                      seed: int = 2, timer=no_timer, sampler: solvers.Sampler = solvers.DDIM) -> dict:
  """Max differences over EVERY state of a trajectory of the twins (DDIM or ``sampler``) from the same noise.

  For eta > 0 the per-step draws are made in NumPy and injected into both.

  Returns:
    dict with max_abs / max_rel over all noisy and predicted images of the trajectory, final_max_abs
    (the last predicted images) and state_max_abs (the scale of the states).
  """
  return trajectory_parities(model, variables, image_size, steps, (eta,), batch, seed, timer, sampler)[float(eta)]


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
    MAE metrics), grad_norm_1 (the global norm of the twin's first gradient, after clipping when
    ``step_config.grad_clip_norm`` > 0), and for each step n in ``check_steps`` + (num_steps,):
    ``params_rel_<n>``, ``batch_stats_rel_<n>``, ``ema_rel_<n>`` (max over tensors of the
    tensor-relative difference) and ``worst_<n>`` (the tensor that attains the largest).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import step as torch_step  # pylint: disable=import-outside-toplevel
  step_config = step_config or step_lib.StepConfig()
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
      opt_state=step_lib.make_optimizer(step_config).init(variables["params"]), ema_params=variables["params"],
      ema_batch_stats=variables["batch_stats"])
  jax_step = jax.jit(functools.partial(step_lib.train_step_from_draws, model=model, step_config=step_config,
                                       axis_name=None))
  twin = torch_twin(model, variables)
  optimizer = torch_step.make_optimizer(twin, step_config.learning_rate, step_config.weight_decay)
  ema = torch_step.EMA(twin, step_config.ema_decay, step_config.ema_warmup)
  rng = np.random.default_rng(seed)
  out = {"loss_max_abs": 0.0, "metrics_max_abs": 0.0}
  for step in range(num_steps):
    shape = (batch, image_size, image_size, model.channels)
    images = rng.standard_normal(shape).astype(np.float32)
    noises = rng.standard_normal(shape).astype(np.float32)
    noise_rates, signal_rates = step_config.diffusion.rate_table(rng.uniform(0.0, 1.0, (batch, 1, 1, 1)))
    state, metrics = jax_step(state, images, noises, noise_rates, signal_rates)
    torch_metrics = torch_step.train_step_from_draws(
        twin, optimizer, ema, step, torch.from_numpy(nchw(images)), torch.from_numpy(nchw(noises)),
        torch.from_numpy(noise_rates), torch.from_numpy(signal_rates), step_config.loss, step_config.diffusion.target,
        grad_clip_norm=step_config.grad_clip_norm, grad_accum_steps=step_config.grad_accum_steps)
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
      # The global norm of the gradient the optimiser used (after clipping, when on).
      out["grad_norm_1"] = float(np.sqrt(sum(float(np.sum(np.square(p.grad.numpy().astype(np.float64))))
                                             for p in twin.parameters())))
    if n in check_steps or n == num_steps:
      raw = weight_files.flax_to_torch_state_dict(state.variables(ema=False))
      ema_jax = weight_files.flax_to_torch_state_dict(state.variables(ema=True))
      twin_state = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
      ema_state = {k: v.detach().numpy() for k, v in ema.model.state_dict().items()}
      param_names = {k for k in raw if not k.endswith(("running_mean", "running_var"))}
      out[f"params_rel_{n}"], worst = _relative_tree_diff({k: raw[k] for k in param_names}, twin_state, masks)
      out[f"batch_stats_rel_{n}"], _ = _relative_tree_diff({k: v for k, v in raw.items() if k not in param_names},
                                                           twin_state)
      out[f"ema_rel_{n}"], _ = _relative_tree_diff(ema_jax, ema_state)
      out[f"worst_{n}"] = worst
  return out
