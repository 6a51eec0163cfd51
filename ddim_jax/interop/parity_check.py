"""``ddim-jax parity``: any model through both twins, with a verdict; ``--layers``: where they part.

``check_model`` runs a user's weights (not only the project's fixtures) through the JAX model and
the torch twin (``ddim_torch_ref``) on the same inputs: the noise prediction with BatchNorm in eval
and in train mode, and DDIM trajectories at eta 0 and 1 from the same NumPy noise (every state
compared). Each difference is relative to the largest value of the torch side, against a float32
bound; the check passes when every row is within its bound.

``layer_differences`` feeds the same batch through both twins and compares the output of every
module the two share (the flax path and the torch name map mechanically, as the weight file's
tensor names do), in the order torch runs them: the first module past the bound is where a port
went wrong (a BatchNorm epsilon, an upsampling, a skip order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.core import sampling
from ddim_jax.interop import keras_network, parity, weight_files

# Relative to the largest |value| of the torch side. float32 on a CPU, measured on the project's
# fixtures: forward <= ~1e-6, 50-step trajectories <= ~2e-5 (docs/parity.md); the bounds leave 10x.
FORWARD_BOUND = 1e-5
TRAJECTORY_BOUND = 1e-4
LAYER_BOUND = 1e-5
# Keras (TensorFlow) against JAX with batch statistics: TF reduces the batch moments in another order;
# measured up to 2.6e-5 on a perturbed 64x64 Keras U-Net, 1.6e-6 at 16x16 (docs/parity.md).
KERAS_BN_TRAIN_BOUND = 1e-4
# bfloat16 (JAX: model.dtype=bfloat16; torch: autocast) against the float32 reference and against
# each other. Measured on CPU (docs/parity.md): forward 5e-3 to 8e-3 (the trained 16x16 models) and
# 1.5e-2 (the perturbed 64x64 Keras U-Net); trajectories (noisy states and final images) 1.2e-2 at
# 50 steps, 1.8e-2 at 20, up to 9e-2 at 5: fewer, longer steps carry a prediction's rounding further.
BF16_FORWARD_BOUND = 2e-2
BF16_TRAJECTORY_BOUND = 1.5e-1
PRECISION_CHOICES = parity.PRECISIONS + ("bf16",)


@dataclasses.dataclass
class Row:
  """One comparison: max |JAX - torch|, that over max |torch|, and the bound of the latter."""
  name: str
  max_abs: float
  max_rel: float
  bound: float

  @property
  def ok(self) -> bool:
    return bool(self.max_rel <= self.bound)

  def to_json(self) -> dict:
    return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "bound": self.bound,
            "ok": self.ok}


@dataclasses.dataclass
class ParityCheck:
  """What ``check_model`` measured; ``passed`` is the verdict."""
  rows: list[Row]
  device: dict
  precision: str
  image_size: int
  steps: int
  batch: int
  layers: list[Row] | None = None

  @property
  def passed(self) -> bool:
    return all(row.ok for row in self.rows)

  @property
  def first_divergence(self) -> Row | None:
    """The first module (in torch's order) past ``LAYER_BOUND``, when the layers were compared."""
    return next((row for row in self.layers or [] if not row.ok), None)

  def record(self) -> dict:
    """The JSON record of ``parity --json``."""
    first = self.first_divergence
    return {"passed": self.passed, "rows": [r.to_json() for r in self.rows], "device": self.device,
            "precision": self.precision, "image_size": self.image_size, "steps": self.steps, "batch": self.batch,
            **({"layers": [r.to_json() for r in self.layers], "first_divergence": first and first.name}
               if self.layers is not None else {})}


def _row(name: str, max_abs: float, scale: float, bound: float) -> Row:
  return Row(name, float(max_abs), float(max_abs / scale) if scale > 0 else float(max_abs), bound)


def check_model(model, variables, image_size: int, *, steps: int = 20, batch: int = 4, seed: int = 1,
                precision: str = "highest", layers: bool = False, keras_path: str | None = None) -> ParityCheck:
  """The model through both twins: forward (BN eval and train), trajectories (eta 0 and 1), verdict.

  Args:
    model, variables: the ddim_jax UNet and its Flax variables (e.g. ``pipeline.load_model``'s).
    image_size: the side of the inputs.
    steps: DDIM steps of the trajectories.
    batch: images of each comparison.
    seed: of the NumPy inputs and noises.
    precision: JAX's float32 matmul/convolution precision (``parity.PRECISIONS``), or "bf16": the
      float32 rows at "highest", then bfloat16 against them (``bf16_rows``).
    layers: also compare every shared module's output (``layer_differences``).
    keras_path: the Keras example's ``.weights.h5`` of the same model: Keras too (``keras_rows``).
  """
  if precision not in PRECISION_CHOICES:
    raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISION_CHOICES}")
  with parity.precision("highest" if precision == "bf16" else precision):
    forward = parity.forward_parity(model, variables, image_size, batch=batch, seed=seed)
    trajectories = parity.trajectory_parities(model, variables, image_size, steps, etas=(0.0, 1.0), batch=batch,
                                              seed=seed + 1)
    scale = forward["output_max_abs"]
    rows = [_row("forward, BN eval", forward["forward_max_abs"], scale, FORWARD_BOUND),
            Row("forward, BN train", forward["forward_bn_train_max_abs"], forward["forward_bn_train_max_rel"],
                FORWARD_BOUND)]
    for eta, result in trajectories.items():
      rows.append(Row(f"trajectory eta={eta:g}, every state", result["max_abs"], result["max_rel"], TRAJECTORY_BOUND))
    if precision == "bf16":
      rows += bf16_rows(model, variables, image_size, steps=steps, batch=batch, seed=seed)
    device = parity.device_description()
    if keras_path is not None:
      rows += keras_rows(model, variables, image_size, keras_path, steps=steps, batch=batch, seed=seed)
      device.update(keras_network.description())
    per_layer = layer_differences(model, variables, image_size, batch=batch, seed=seed) if layers else None
  return ParityCheck(rows, device, precision, image_size, steps, batch, per_layer)


def bf16_rows(model, variables, image_size: int, *, steps: int, batch: int, seed: int) -> list[Row]:
  """bfloat16 against float32: JAX with the model's computation in bfloat16 (parameters float32, as
  ``model.dtype=bfloat16`` trains) and the torch twin under ``torch.autocast(bfloat16)``, each against
  the float32 JAX output (which is the twin's within the float32 bounds), and against each other.
  Forward in both BatchNorm modes; the eta-0 trajectory's noisy states and final images (its early
  predicted images divide by the signal rate 0.02, which magnifies any rounding 50x, and are not
  what a sampler returns)."""
  import torch  # pylint: disable=import-outside-toplevel
  from ddim_torch_ref import sampling as torch_sampling  # pylint: disable=import-outside-toplevel
  half = model.clone(dtype=jnp.bfloat16)
  twin = parity.torch_twin(model, variables)
  images, noise_variances = parity.mixed_noise_inputs(batch, image_size, model.channels, seed)
  initial_noise = np.random.default_rng(seed + 3).standard_normal(images.shape).astype(np.float32)

  def trajectory_outputs(out):  # every noisy state, then the final predicted images
    return np.concatenate([out["noisy_trajectory"].reshape(-1), out["pred_images"].reshape(-1)])

  with parity.precision("highest"):
    reference = {train: parity.predict(model, variables, images, noise_variances, train) for train in (False, True)}
    reference_trajectory = trajectory_outputs(jax.tree.map(np.asarray, sampling.generate(
        model, variables, initial_noise, steps=steps, return_trajectory=True)))
  ours = {train: parity.predict(half, variables, images, noise_variances, train) for train in (False, True)}
  our_trajectory = trajectory_outputs(jax.tree.map(np.asarray, sampling.generate(
      half, variables, initial_noise, steps=steps, return_trajectory=True)))
  theirs = {}
  with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    out = torch_sampling.reverse_diffusion(twin.eval(), torch.from_numpy(parity.nchw(initial_noise)), steps,
                                           return_trajectory=True)
    their_trajectory = trajectory_outputs({k: parity.nhwc(out[k].float().numpy())
                                           for k in ("noisy_trajectory", "pred_images")})
    for train in (False, True):  # eval first: a train-mode call moves the twin's running statistics
      theirs[train] = parity.nhwc(twin.train(train)(torch.from_numpy(parity.nchw(images)),
                                                    torch.from_numpy(noise_variances.copy())).float().numpy())

  def row(name, got, ref, bound):
    return _row(name, np.max(np.abs(got - ref)), np.max(np.abs(ref)), bound)

  rows = []
  for train in (False, True):
    mode = f"forward, BN {'train' if train else 'eval'}"
    rows += [row(f"bf16 JAX vs float32: {mode}", ours[train], reference[train], BF16_FORWARD_BOUND),
             row(f"bf16 torch vs float32: {mode}", theirs[train], reference[train], BF16_FORWARD_BOUND),
             row(f"bf16 JAX vs bf16 torch: {mode}", ours[train], theirs[train], BF16_FORWARD_BOUND)]
  name = "trajectory eta=0, states and images"
  rows += [row(f"bf16 JAX vs float32: {name}", our_trajectory, reference_trajectory, BF16_TRAJECTORY_BOUND),
           row(f"bf16 torch vs float32: {name}", their_trajectory, reference_trajectory, BF16_TRAJECTORY_BOUND),
           row(f"bf16 JAX vs bf16 torch: {name}", our_trajectory, their_trajectory, BF16_TRAJECTORY_BOUND)]
  return rows


def keras_rows(model, variables, image_size: int, keras_path: str, *, steps: int, batch: int, seed: int) -> list[Row]:
  """JAX against Keras running the example's network from ``keras_path`` (its EMA network): the
  prediction with BatchNorm in eval and in train mode, and the example's deterministic (eta 0)
  trajectory, every state, relative to the largest value of the Keras side."""
  network, kwargs = keras_network.load_network(keras_path, image_size)
  mine = {k: (tuple(getattr(model, k)) if k == "widths" else getattr(model, k)) for k in kwargs}
  if mine != kwargs:
    raise weight_files.WeightFileError(f"Keras weights file {keras_path!r} holds another model ({kwargs}) than the "
                                       f"weights compared ({mine}); give the .weights.h5 of the same model")
  images, noise_variances = parity.mixed_noise_inputs(batch, image_size, model.channels, seed)
  rows = []
  for train, bound in ((False, FORWARD_BOUND), (True, KERAS_BN_TRAIN_BOUND)):
    out = parity.predict(model, variables, images, noise_variances, train)
    ref = keras_network.forward(network, images, noise_variances, train)
    rows.append(_row(f"Keras: forward, BN {'train' if train else 'eval'}", np.max(np.abs(out - ref)),
                     np.max(np.abs(ref)), bound))
  initial_noise = np.random.default_rng(seed + 2).standard_normal(images.shape).astype(np.float32)
  ours = jax.tree.map(np.asarray, sampling.generate(model, variables, initial_noise, steps=steps,
                                                    return_trajectory=True))
  theirs = keras_network.reverse_diffusion(network, initial_noise, steps, sampling.DEFAULT_SPEC)
  diff = max(np.max(np.abs(ours[k] - theirs[k])) for k in theirs)
  scale = max(np.max(np.abs(theirs[k])) for k in theirs)
  rows.append(_row("Keras: trajectory eta=0, every state", diff, scale, TRAJECTORY_BOUND))
  return rows


def _flax_outputs(tree, path=()) -> dict[str, Any]:
  """{torch-style name: output} of every module call that ``capture_intermediates`` recorded."""
  out = {}
  for key, value in tree.items():
    if key == "__call__":
      out[weight_files.torch_name(path)] = value[0]
    elif isinstance(value, dict):
      out.update(_flax_outputs(value, path + (key,)))
  return out


def layer_differences(model, variables, image_size: int, *, batch: int = 4, seed: int = 1,
                      train: bool = False) -> list[Row]:
  """Every module both twins share, in torch's order: its output's max |JAX - torch| (relative to
  max |torch|) on the same noisy batch (``parity.mixed_noise_inputs``). The whole network is "output".
  """
  import torch  # pylint: disable=import-outside-toplevel
  images, noise_variances = parity.mixed_noise_inputs(batch, image_size, model.channels, seed)
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  _, state = model.apply(variables, images, noise_variances, train=train, capture_intermediates=True,
                         mutable=mutable)
  flax_outputs = {name: np.asarray(v) for name, v in _flax_outputs(jax.device_get(state["intermediates"])).items()
                  if hasattr(v, "shape")}
  twin = parity.torch_twin(model, variables).train(train)
  torch_outputs: dict[str, np.ndarray] = {}

  def record(name):
    def hook(module, inputs, output):  # pylint: disable=unused-argument
      if isinstance(output, torch.Tensor) and name not in torch_outputs:  # first call only
        torch_outputs[name] = output.detach().numpy()
    return hook

  handles = [module.register_forward_hook(record(name)) for name, module in twin.named_modules()]
  try:
    with torch.no_grad():
      twin(torch.from_numpy(parity.nchw(images)), torch.from_numpy(noise_variances.copy()))
  finally:
    for handle in handles:
      handle.remove()
  rows = []
  for name, ref in torch_outputs.items():  # the order torch finished them in
    if name not in flax_outputs:
      continue
    ref = parity.nhwc(ref) if ref.ndim == 4 else ref
    got = flax_outputs[name]
    if got.shape != ref.shape:
      continue
    rows.append(_row(name or "output", np.max(np.abs(got - ref)), np.max(np.abs(ref)), LAYER_BOUND))
  return rows
