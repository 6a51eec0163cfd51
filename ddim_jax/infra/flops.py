"""Model FLOPs counted from the jaxpr, the same on every backend, and the peaks that MFU divides by.

Not XLA's cost analysis: on GPU it counts cuDNN convolutions as 0 FLOPs. ``jax.make_jaxpr`` traces
(nothing compiles) and the equations are walked: 2 FLOPs per multiply-add of every convolution and
``dot_general``, nothing else; control flow by its trip count. The rules, case by case:
docs/flops.md. A leaf (jax and NumPy only), so that anything, the benchmark included, can import it.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

try:
  from jax.extend import core as jcore
except ImportError:  # older JAX
  from jax import core as jcore


@dataclasses.dataclass
class FlopCount:
  """The count of one function: ``total`` FLOPs, ``by_primitive`` and ``notes`` on approximations."""
  total: int = 0
  by_primitive: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)

  def add(self, primitive: str, flops: int) -> None:
    self.total += flops
    self.by_primitive[primitive] = self.by_primitive.get(primitive, 0) + flops

  def note(self, text: str) -> None:
    if text not in self.notes:
      self.notes.append(text)


def _prod(values) -> int:
  return math.prod(int(v) for v in values)


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 x batch x contracting x lhs-free x rhs-free elements of a ``dot_general``."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  batch = _prod(lhs_shape[d] for d in lhs_batch)
  contracting = _prod(lhs_shape[d] for d in lhs_contract)
  lhs_free = _prod(s for d, s in enumerate(lhs_shape) if d not in lhs_contract and d not in lhs_batch)
  rhs_free = _prod(s for d, s in enumerate(rhs_shape) if d not in rhs_contract and d not in rhs_batch)
  return 2 * batch * contracting * lhs_free * rhs_free


def _taps_on_input(out_size, kernel, stride, rhs_dilation, lhs_dilation, pad_lo, in_size) -> int:
  """The (output position, kernel tap) pairs of one spatial dimension that count.

  Without lhs dilation all of them, out_size * kernel (the dense convention: taps on the zero
  padding count). With lhs dilation (a transposed conv: the input gradient of a strided conv) only
  the taps on real input elements, neither holes nor padding, so that it counts the
  multiply-adds of the conv it transposes.
  """
  if lhs_dilation == 1:
    return out_size * kernel
  o = np.arange(out_size)[:, None]
  k = np.arange(kernel)[None, :]
  pos = o * stride + k * rhs_dilation - pad_lo  # position in the dilated (unpadded) input
  real = (pos >= 0) & (pos <= (in_size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
  return int(real.sum())


def conv_flops(lhs_shape, rhs_shape, out_shape, params: Mapping[str, Any]) -> int:
  """2 x output elements x rhs input features x kernel taps of a ``conv_general_dilated`` (see the module doc)."""
  dn = params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  in_features = int(rhs_shape[rhs_spec[1]])  # already in_features / feature_group_count
  out_spatial = [int(out_shape[d]) for d in out_spec[2:]]
  kernel = [int(rhs_shape[d]) for d in rhs_spec[2:]]
  lhs_spatial = [int(lhs_shape[d]) for d in lhs_spec[2:]]
  n_spatial = len(kernel)
  strides = params.get("window_strides") or (1,) * n_spatial
  padding = params.get("padding") or ((0, 0),) * n_spatial
  lhs_dil = params.get("lhs_dilation") or (1,) * n_spatial
  rhs_dil = params.get("rhs_dilation") or (1,) * n_spatial
  taps = 1
  for i in range(n_spatial):
    taps *= _taps_on_input(out_spatial[i], kernel[i], int(strides[i]), int(rhs_dil[i]), int(lhs_dil[i]),
                           int(padding[i][0]), lhs_spatial[i])
  # Output elements = batch x features x spatial; the spatial product is folded into ``taps``.
  out_batch_features = int(out_shape[out_spec[0]]) * int(out_shape[out_spec[1]])
  return 2 * out_batch_features * in_features * taps


def _closed(j):
  return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _sub_jaxprs(value):
  """The (open) jaxprs in one equation parameter: a jaxpr, a closed jaxpr, or a tuple/list of them."""
  if isinstance(value, (jcore.Jaxpr, jcore.ClosedJaxpr)):
    return [_closed(value)]
  if isinstance(value, (tuple, list)):
    return [_closed(v) for v in value if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
  return []


def _literal_value(atom):
  if isinstance(atom, jcore.Literal):
    value = np.asarray(atom.val)
    if value.shape == () and np.issubdtype(value.dtype, np.integer):
      return int(value)
  return None


def _static_trip_count(eqn) -> int | None:
  """The trip count of a ``while`` whose counter and bound are static, else None (see the module doc)."""
  p = eqn.params
  cond, body = _closed(p["cond_jaxpr"]), _closed(p["body_jaxpr"])
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  init = eqn.invars[cn + bn:]
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name not in ("lt", "le", "gt", "ge", "ne"):
    return None
  cmp = cond.eqns[0]
  if cmp.outvars[0] is not cond.outvars[0]:
    return None
  carry_in_cond = cond.invars[cn:]

  def carry_index(atom):
    for i, v in enumerate(carry_in_cond):
      if atom is v:
        return i
    return None

  def invariant_literal(atom):
    """A literal, or a carry the body passes through unchanged that starts at a literal."""
    value = _literal_value(atom)
    if value is not None:
      return value
    i = carry_index(atom)
    if i is None or body.outvars[i] is not body.invars[bn + i]:
      return None
    return _literal_value(init[i])

  def counter_step(i):
    """The literal step of carry i if the body does carry_i + literal (or - literal), else None."""
    out = body.outvars[i]
    for e in body.eqns:
      if e.outvars and e.outvars[0] is out and e.primitive.name in ("add", "sub"):
        a, b = e.invars
        if a is body.invars[bn + i] and _literal_value(b) is not None:
          return _literal_value(b) * (1 if e.primitive.name == "add" else -1)
        if e.primitive.name == "add" and b is body.invars[bn + i] and _literal_value(a) is not None:
          return _literal_value(a)
    return None

  x, y = cmp.invars
  op = cmp.primitive.name
  i = carry_index(x)
  bound = invariant_literal(y)
  if i is None or bound is None:  # maybe "bound op counter"
    i, bound = carry_index(y), invariant_literal(x)
    op = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "ne": "ne"}[op]
    if i is None or bound is None:
      return None
  start, step = _literal_value(init[i]), counter_step(i)
  if start is None or not step:
    return None
  if op == "lt" and step > 0:
    return max(0, -(-(bound - start) // step))
  if op == "le" and step > 0:
    return max(0, (bound - start) // step + 1)
  if op == "gt" and step < 0:
    return max(0, -(-(start - bound) // -step))
  if op == "ge" and step < 0:
    return max(0, (start - bound) // -step + 1)
  if op == "ne" and (bound - start) % step == 0 and (bound - start) // step >= 0:
    return (bound - start) // step
  return None


def _shard_map_devices(params) -> int:
  mesh = params.get("mesh")
  shape = dict(getattr(mesh, "shape", {}) or {})
  manual = params.get("newly_manual_axes", params.get("manual_axes"))
  if manual is None and "auto" in params:  # older JAX: the complement of the auto axes
    manual = [a for a in shape if a not in params["auto"]]
  if manual is None:
    manual = list(shape)
  return _prod(shape[a] for a in manual if a in shape)


def _walk(jaxpr, count: FlopCount, multiplier: int) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    p = eqn.params
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      count.add(name, multiplier * dot_general_flops(lhs, rhs, p["dimension_numbers"]))
    elif name == "conv_general_dilated":
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      count.add(name, multiplier * conv_flops(lhs, rhs, eqn.outvars[0].aval.shape, p))
    elif name == "cond":
      branches = [_closed(b) for b in p["branches"]]
      counts = []
      for b in branches:
        sub = FlopCount()
        _walk(b, sub, multiplier)
        counts.append(sub)
      best = max(counts, key=lambda c: c.total)
      for prim, flops in best.by_primitive.items():
        count.add(prim, flops)
      for n in (n for c in counts for n in c.notes):
        count.note(n)
      if len({c.total for c in counts}) > 1:
        count.note(f"cond: the largest of {len(branches)} branches counted (an upper bound)")
    elif name == "scan":
      _walk(_closed(p["jaxpr"]), count, multiplier * int(p["length"]))
    elif name == "while":
      trips = _static_trip_count(eqn)
      if trips is None:
        count.note("while: unknown trip count, the body counted once")
        _walk(_closed(p["body_jaxpr"]), count, multiplier)
        _walk(_closed(p["cond_jaxpr"]), count, multiplier)
      else:
        _walk(_closed(p["body_jaxpr"]), count, multiplier * trips)
        _walk(_closed(p["cond_jaxpr"]), count, multiplier * (trips + 1))
    elif name == "shard_map":
      _walk(_closed(p["jaxpr"]), count, multiplier * _shard_map_devices(p))
    elif name == "xla_pmap":
      _walk(_closed(p["call_jaxpr"]), count, multiplier * int(p["axis_size"]))
    else:  # jit/pjit, closed_call, custom_jvp_call, custom_vjp_call, remat, ...: every sub-jaxpr once
      if name.startswith("remat") or name == "checkpoint":
        if p.get("differentiated"):
          count.note("remat: the recomputed forward counted (executed FLOPs, above model FLOPs)")
      for value in p.values():
        for sub in _sub_jaxprs(value):
          _walk(sub, count, multiplier)


def jaxpr_flops(jaxpr) -> FlopCount:
  """The FlopCount of a jaxpr (open or closed)."""
  count = FlopCount()
  _walk(_closed(jaxpr), count, 1)
  return count


def flop_count(fn: Callable, *args, **kwargs) -> FlopCount:
  """The FlopCount (total, by_primitive, notes) of ``fn(*args, **kwargs)``, traced, never compiled.

  ``args`` are arrays or ``jax.ShapeDtypeStruct`` pytrees (traced); ``kwargs`` are bound as they
  are (static: models, configs, flags).
  """
  fn = functools.partial(fn, **kwargs) if kwargs else fn
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def count_flops(fn: Callable, *args, **kwargs) -> int:
  """Total FLOPs of ``fn(*args, **kwargs)``: 2 per multiply-add of every conv and dot (see the module doc)."""
  return flop_count(fn, *args, **kwargs).total


# ------------------------------------------------------------------------------------------------
# This project's U-Net: per-image counts.


def _per_image(total: int, batch: int) -> int:
  if total % batch:
    raise ValueError(f"{total} FLOPs are not a multiple of the batch {batch}")
  return total // batch


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def forward_flops(model, variables, image_size: int, batch: int = 1) -> int:
  """FLOPs per image of one inference evaluation ``model.apply(variables, x, v, train=False)``.

  ``variables``: {'params', 'batch_stats'} as arrays or shapes (``jax.eval_shape`` of the init).
  """
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, model.channels), jnp.float32)
  v = jax.ShapeDtypeStruct((batch, 1, 1, 1), jnp.float32)
  return _per_image(count_flops(lambda var, x, v: model.apply(var, x, v, train=False), _shapes(variables), x, v),
                    batch)


def train_step_flops(train_step: Callable, state, model, step_config, image_size: int, batch: int,
                     channels: int = 3) -> int:
  """FLOPs per image of one optimiser step: ``train.train_step`` on one device (no collectives).

  Pass ``train.train_step``, its TrainState (arrays or shapes), a model built without
  ``bn_axis_name`` and the StepConfig. The count includes the forward, the backward (input and
  weight gradients) and AdamW/EMA (no convs or dots there).
  """
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)
  normalizer = {"mean": jax.ShapeDtypeStruct((channels,), jnp.float32),
                "variance": jax.ShapeDtypeStruct((channels,), jnp.float32)}
  key = _shapes(jax.random.key_data(jax.random.key(0)))
  total = count_flops(train_step, _shapes(state), images, normalizer, key, model=model, step_config=step_config,
                      axis_name=None)
  return _per_image(total, batch)


def sample_flops(generate: Callable, model, variables, image_size: int, batch: int, steps: int) -> int:
  """FLOPs per image of a ``steps``-step DDIM run: ``sampling.generate(model, variables, noise, steps=steps)``."""
  noise = jax.ShapeDtypeStruct((batch, image_size, image_size, model.channels), jnp.float32)
  total = count_flops(lambda var, x: generate(model, var, x, steps=steps), _shapes(variables), noise)
  return _per_image(total, batch)


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s per device, for MFU.

# Dense (no structured sparsity) peak FLOP/s per device (one JAX device = one GPU / one TPU chip),
# by a substring of the device kind (``jax.Device.device_kind``, torch.cuda.get_device_name()),
# first match wins (so the more specific names come first), and by the benchmark's precision:
#   "bf16": bf16 inputs, fp32 accumulation, on tensor cores / the MXU.
#   "fp32": fp32 inputs at XLA's DEFAULT matmul/conv precision, which runs them on the GPU's TF32
#           tensor cores (Ampere and later; cuDNN's default for torch convolutions too) and as one
#           bf16 pass on the TPU's MXU. With JAX_DEFAULT_MATMUL_PRECISION=highest the peak does not
#           apply (see peak_flops).
# Sources: NVIDIA datasheets (the printed tensor figures are with 2:4 sparsity, dense is half):
#   H100 SXM / H200 SXM (and GH200): BF16 1,979 / TF32 989 TFLOP/s sparse; computed dense: 132 SMs x
#     1,830 MHz x 4,096 bf16 FLOP/clock/SM = 989.4 T, TF32 half of that, 494.7 T.
#   H100 PCIe: BF16 1,513 / TF32 756 sparse. H100 NVL and H200 NVL: BF16 1,671 / TF32 835 sparse.
#   A100 (SXM4 and PCIe, 40 and 80 GB): BF16 312 / TF32 156 dense.
# Google Cloud TPU system-architecture pages, bf16 peak per chip: v4 275, v5e ("TPU v5 lite") 197,
#   v5p ("TPU v5") 459, v6e Trillium ("TPU v6 lite") 918 TFLOP/s.
PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835.5e12, "fp32": 417.5e12},
    "H200": {"bf16": 989.4e12, "fp32": 494.7e12},  # also matches GH200 (the same SXM-class Hopper)
    "H100 NVL": {"bf16": 835.5e12, "fp32": 417.5e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp32": 378e12},
    "H100": {"bf16": 989.4e12, "fp32": 494.7e12},  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "TPU v4": {"bf16": 275e12, "fp32": 275e12},
    "TPU v5 lite": {"bf16": 197e12, "fp32": 197e12},
    "TPU v5e": {"bf16": 197e12, "fp32": 197e12},
    "TPU v5p": {"bf16": 459e12, "fp32": 459e12},
    "TPU v5": {"bf16": 459e12, "fp32": 459e12},
    "TPU v6 lite": {"bf16": 918e12, "fp32": 918e12},
    "TPU v6e": {"bf16": 918e12, "fp32": 918e12},
}
# How fp32 runs at the table's peak, and the jax_default_matmul_precision values that keep it so.
FP32_AS = {"TPU": ("one bf16 pass (XLA's default precision on TPU)", (None, "default", "fastest", "bfloat16")),
           "": ("TF32 tensor cores (XLA's default precision)",
                (None, "default", "fastest", "bfloat16", "high", "tensorfloat32"))}


def peak_flops(device_kind: str, precision: str, matmul_precision: str | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s of ONE device, a label), or (None, "unknown peak ...") where no peak is known.

  Args:
    device_kind: e.g. "NVIDIA H200", "TPU v5 lite", "cpu" (any string containing it will do).
    precision: "bf16" or "fp32" (the benchmark's --precision).
    matmul_precision: ``jax.config.jax_default_matmul_precision``; for fp32, a value that asks for
      more passes than the table's peak assumes ("highest", "float32"; on TPU also "high",
      "tensorfloat32") gives no peak.
  """
  kind = str(device_kind)
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in kind.lower() and precision in peaks:
      label = f"{key} dense {precision}"
      if precision == "fp32":
        fp32_as, allowed = next(v for k, v in FP32_AS.items() if k in key)
        if matmul_precision not in allowed:
          return None, f"unknown peak ({key} fp32 at jax_default_matmul_precision={matmul_precision!r})"
        label += " as " + fp32_as
      return peaks[precision], f"{label}: {peaks[precision] / 1e12:.1f} TFLOP/s"
  return None, f"unknown peak ({kind or 'no device'})"
