"""ddim_jax.infra.flops: the jaxpr FLOP count against closed forms (the U-Net, convs, dots, control flow) and the peaks.

The U-Net's closed form below is written from the architecture (/work/shared/reference/seed_spec.md
section 5 and the models.py docstring), not from the jaxpr: every conv is 2 x H x W x C_in x C_out x
k x k FLOPs per image ('SAME', stride 1: the padded border counts, the dense convention), and the
only matmul is the noise embedding's identity einsum (B, 1, 1, E) x (E, E) -> 2 E^2 per image, which
models.py keeps so that XLA does not recompute the sines per pixel. BatchNorm, swish, the 2x2
average pooling, the bilinear x2 upsampling (a 3/4-1/4 stencil), the concatenations and the bias
additions have no multiply-add of a conv or dot and count 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ddim_jax.core import models, sampling, step as step_lib
from ddim_jax.infra import flops


def unet_convs(variant, widths, size, block_depth=2, embedding_dims=32, channels=3):
  """[(name, resolution, c_in, c_out, kernel)] of every convolution of the U-Net, in order.

  keras: stem 1x1 (channels -> widths[0]), concat the E-channel embedding; a down level per
  widths[:-1] (block_depth residual blocks, each output a skip, then 2x2 average pooling);
  block_depth middle blocks at widths[-1]; an up level per reversed(widths[:-1]) (x2 upsampling,
  then block_depth times concat [x, last skip] -> residual block); head 1x1 -> channels.
  r: stem 1x1 -> E; a down level per width; middle blocks 2*widths[-1] then widths[-1]; up levels
  per reversed(widths[:-1]) and a last one at E.
  Residual block (c_in -> w): 3x3 c_in -> w, 3x3 w -> w, and a 1x1 projection c_in -> w where
  c_in != w (keras) or always (r).
  """
  convs = []
  stem = widths[0] if variant == "keras" else embedding_dims
  convs.append(("stem", size, channels, stem, 1))
  c, res, skips = stem + embedding_dims, size, []

  def block(name, c_in, w):
    convs.append((name + "/conv1", res, c_in, w, 3))
    convs.append((name + "/conv2", res, w, w, 3))
    if variant == "r" or c_in != w:
      convs.append((name + "/proj", res, c_in, w, 1))

  for i, w in enumerate(widths[:-1] if variant == "keras" else widths):
    for j in range(block_depth):
      block(f"down{i}/{j}", c, w)
      c = w
      skips.append(w)
    res //= 2
  mids = [widths[-1]] * block_depth if variant == "keras" else [2 * widths[-1], widths[-1]]
  for j, w in enumerate(mids):
    block(f"mid{j}", c, w)
    c = w
  ups = list(reversed(widths[:-1])) + ([] if variant == "keras" else [embedding_dims])
  for i, w in enumerate(ups):
    res *= 2
    for j in range(block_depth):
      block(f"up{i}/{j}", c + skips.pop(), w)
      c = w
  assert res == size and not skips
  convs.append(("head", size, c, channels, 1))
  return convs


def closed_form_forward(variant, widths, size, block_depth=2, embedding_dims=32, channels=3):
  """FLOPs per image of one forward: every conv plus the embedding's (E x E) dot."""
  convs = unet_convs(variant, widths, size, block_depth, embedding_dims, channels)
  return sum(2 * r * r * ci * co * k * k for _, r, ci, co, k in convs) + 2 * embedding_dims ** 2


def closed_form_train(variant, widths, size, block_depth=2, embedding_dims=32, channels=3):
  """FLOPs per image of one training step.

  3x the forward, less what reverse mode never computes: the stem's input gradient (the noisy
  images are not differentiated) and both gradients of the embedding dot (the embedding depends
  on the diffusion times only, not on a parameter). Every other conv has a forward, an input
  gradient and a weight gradient of the same size; AdamW and the EMA have no conv or dot.
  """
  convs = unet_convs(variant, widths, size, block_depth, embedding_dims, channels)
  conv = sum(2 * r * r * ci * co * k * k for _, r, ci, co, k in convs)
  _, r, ci, co, k = convs[0]
  stem = 2 * r * r * ci * co * k * k
  return 3 * conv - stem + 2 * embedding_dims ** 2


def _model_and_shapes(variant, widths, size, block_depth=2, embedding_dims=32, dtype="float32"):
  model = models.create_model(variant=variant, widths=widths, block_depth=block_depth,
                              embedding_dims=embedding_dims, dtype=dtype)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), size))
  return model, variables


SMALL = [("keras", (8, 16, 24), 16, 2, 8), ("keras", (8, 16, 24), 32, 1, 8),
         ("r", (8, 16, 24), 16, 2, 8), ("r", (8, 16, 24), 32, 1, 8)]


@pytest.mark.parametrize("variant,widths,size,depth,emb", SMALL)
def test_forward_matches_the_closed_form(variant, widths, size, depth, emb):
  model, variables = _model_and_shapes(variant, widths, size, depth, emb)
  counted = flops.forward_flops(model, variables, size, batch=2)
  assert counted == closed_form_forward(variant, widths, size, depth, emb)
  detail = flops.flop_count(lambda v, x, t: model.apply(v, x, t, train=False), variables,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
                            jax.ShapeDtypeStruct((2, 1, 1, 1), jnp.float32))
  assert detail.by_primitive == {"dot_general": 2 * 2 * emb ** 2,
                                 "conv_general_dilated": 2 * (counted - 2 * emb ** 2)}
  assert detail.notes == []


@pytest.mark.parametrize("variant,widths,size,depth,emb", SMALL[:1] + SMALL[3:])
def test_train_step_matches_the_closed_form(variant, widths, size, depth, emb):
  model, _ = _model_and_shapes(variant, widths, size, depth, emb)
  config = step_lib.StepConfig()
  state = jax.eval_shape(lambda: step_lib.create_train_state(model, config, jax.random.key(0), size))
  counted = flops.train_step_flops(step_lib.train_step, state, model, config, size, batch=2)
  assert counted == closed_form_train(variant, widths, size, depth, emb)


@pytest.mark.slow
def test_the_real_keras_config_at_64():
  """The default model (keras, widths 32/64/96/128, depth 2) at 64x64: ~2.28 GFLOP per forward.

  Per image: stem 2*64*64*3*32 = 786,432; embedding dot 2*32*32 = 2,048; head 2*64*64*32*3 =
  786,432; the residual blocks 2,282,225,664 (from ``unet_convs``); total 2,283,800,576.
  """
  model, variables = _model_and_shapes("keras", (32, 64, 96, 128), 64)
  forward = flops.forward_flops(model, variables, 64, batch=1)
  assert forward == closed_form_forward("keras", (32, 64, 96, 128), 64) == 2_283_800_576
  # The same count in bf16 (nothing depends on the dtype or the backend).
  model16, _ = _model_and_shapes("keras", (32, 64, 96, 128), 64, dtype="bfloat16")
  assert flops.forward_flops(model16, variables, 64, batch=1) == forward

  config = step_lib.StepConfig()
  state = jax.eval_shape(lambda: step_lib.create_train_state(model, config, jax.random.key(0), 64))
  step = flops.train_step_flops(step_lib.train_step, state, model, config, 64, batch=2)
  assert step == closed_form_train("keras", (32, 64, 96, 128), 64) == 6_850_611_200
  # About 3x the forward (forward + input gradients + weight gradients), a little below 3: the
  # stem's input gradient and the embedding dot's gradients are never computed (0.03% here).
  assert 2.99 < step / forward < 3.0


def test_r_variant_at_64_and_sampling_is_steps_times_the_forward():
  model, variables = _model_and_shapes("r", (32, 64, 96, 128), 64)
  forward = flops.forward_flops(model, variables, 64, batch=1)
  assert forward == closed_form_forward("r", (32, 64, 96, 128), 64) == 1_868_040_192
  # sampling.generate: a lax.scan of `steps` network evaluations, nothing else with a conv or dot.
  assert flops.sample_flops(sampling.generate, model, variables, 64, batch=2, steps=20) == 20 * forward
  assert flops.sample_flops(sampling.generate, model, variables, 64, batch=2, steps=3) == 3 * forward


# ------------------------------------------------------------------------------------------------
# Primitives and control flow against hand counts.


def test_dot_general_with_batch_dims():
  a = jax.ShapeDtypeStruct((5, 3, 7), jnp.float32)
  b = jax.ShapeDtypeStruct((5, 7, 11), jnp.float32)
  assert flops.count_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 5 * 3 * 7 * 11
  # Two batch dims, two contracting dims, free dims on both sides.
  x = jax.ShapeDtypeStruct((2, 4, 3, 6, 5), jnp.float32)  # b c i k l
  y = jax.ShapeDtypeStruct((4, 2, 6, 5, 9), jnp.float32)  # c b k l j
  fn = lambda x, y: jax.lax.dot_general(x, y, (((3, 4), (2, 3)), ((0, 1), (1, 0))))
  assert flops.count_flops(fn, x, y) == 2 * (2 * 4) * (6 * 5) * 3 * 9
  assert flops.count_flops(lambda x: x @ x, jax.ShapeDtypeStruct((6, 6), jnp.bfloat16)) == 2 * 6 ** 3


def conv(x, w, groups=1, strides=(1, 1), padding="SAME", batch_groups=1, rhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                      batch_group_count=batch_groups)


def test_conv_with_feature_groups_strides_and_dilation():
  x = jax.ShapeDtypeStruct((2, 10, 10, 12), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 12 // 4, 8), jnp.float32)  # 4 groups: 3 inputs per output feature
  assert flops.count_flops(functools.partial(conv, groups=4), x, w) == 2 * (2 * 10 * 10 * 8) * 3 * 9
  depthwise = jax.ShapeDtypeStruct((3, 3, 1, 12), jnp.float32)
  assert flops.count_flops(functools.partial(conv, groups=12), x, depthwise) == 2 * (2 * 10 * 10 * 12) * 9
  full = jax.ShapeDtypeStruct((3, 3, 12, 8), jnp.float32)
  # Stride 2, 'SAME': 5x5 outputs; 'VALID' with rhs dilation 2: a 5x5 window, 6x6 outputs.
  assert flops.count_flops(functools.partial(conv, strides=(2, 2)), x, full) == 2 * (2 * 5 * 5 * 8) * 12 * 9
  assert flops.count_flops(functools.partial(conv, padding="VALID", rhs_dilation=(2, 2)), x, full) == (
      2 * (2 * 6 * 6 * 8) * 12 * 9)
  # NCHW / OIHW dimension numbers give the same count.
  xc = jax.ShapeDtypeStruct((2, 12, 10, 10), jnp.float32)
  wc = jax.ShapeDtypeStruct((8, 12, 3, 3), jnp.float32)
  fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
  assert flops.count_flops(fn, xc, wc) == 2 * (2 * 10 * 10 * 8) * 12 * 9


def test_conv_with_batch_groups_and_the_gradients_of_a_strided_conv():
  # batch_group_count 2: the batch of 4 splits in 2 groups, output features 8 = 2 groups x 4.
  x = jax.ShapeDtypeStruct((4, 6, 6, 5), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 5, 8), jnp.float32)
  assert flops.count_flops(functools.partial(conv, batch_groups=2), x, w) == 2 * (2 * 6 * 6 * 8) * 5 * 9
  # Both gradients of a stride-1 conv cost what the forward costs: 3x in all.
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
  forward = 2 * (2 * 8 * 8 * 6) * 4 * 9
  loss = lambda x, w: jnp.sum(conv(x, w))
  assert flops.count_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward
  assert flops.count_flops(jax.grad(loss, argnums=1), x, w) == 2 * forward  # no input gradient
  # Stride 2, 'VALID', 9x9 -> 4x4: the input gradient is a conv over the lhs-dilated output
  # gradient; its holes do not count, so it costs exactly the forward (no padding here).
  x = jax.ShapeDtypeStruct((2, 9, 9, 4), jnp.float32)
  strided = lambda x, w: jnp.sum(conv(x, w, strides=(2, 2), padding="VALID"))
  forward = 2 * (2 * 4 * 4 * 6) * 4 * 9
  assert flops.count_flops(strided, x, w) == forward
  grads = flops.flop_count(jax.grad(strided, argnums=(0, 1)), x, w)
  assert grads.by_primitive["conv_general_dilated"] == 3 * forward


def test_scan_multiplies_by_its_length_and_nesting_multiplies():
  x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  one = 2 * 4 ** 3
  body = lambda c, _: (c @ c, None)
  assert flops.count_flops(lambda x: jax.lax.scan(body, x, None, length=7)[0], x) == 7 * one
  inner = lambda c, _: (jax.lax.scan(body, c, None, length=3)[0], None)
  assert flops.count_flops(lambda x: jax.lax.scan(inner, x, None, length=5)[0], x) == 15 * one
  # fori_loop with static bounds is a scan; under jit and vmap too.
  fn = jax.jit(jax.vmap(lambda x: jax.lax.fori_loop(0, 6, lambda i, c: c @ c, x)))
  assert flops.count_flops(fn, jax.ShapeDtypeStruct((3, 4, 4), jnp.float32)) == 3 * 6 * one


def test_while_cond_remat_and_custom_rules():
  x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  one = 2 * 4 ** 3
  static = lambda x: jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]
  count = flops.flop_count(static, x)
  assert count.total == 5 * one and count.notes == []
  down = lambda x: jax.lax.while_loop(lambda c: c[0] > 2, lambda c: (c[0] - 2, c[1] @ c[1]), (9, x))[1]
  assert flops.count_flops(down, x) == 4 * one  # 9, 7, 5, 3
  dynamic = lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c @ c, x)
  count = flops.flop_count(dynamic, x, jax.ShapeDtypeStruct((), jnp.int32))
  assert count.total == one and "unknown trip count" in count.notes[0]

  branches = lambda x: jax.lax.cond(x[0, 0] > 0, lambda y: y @ y @ y, lambda y: y @ y, x)
  count = flops.flop_count(branches, x)
  assert count.total == 2 * one and "largest" in count.notes[0]

  assert flops.count_flops(jax.checkpoint(lambda x: x @ x), x) == one

  @jax.custom_jvp
  def f(x):
    return x @ x
  f.defjvp(lambda p, t: (f(p[0]), t[0] @ p[0] + p[0] @ t[0]))

  @jax.custom_vjp
  def g(x):
    return x @ x
  g.defvjp(lambda x: (x @ x, x), lambda r, t: (t @ r.T + r.T @ t,))
  assert flops.count_flops(f, x) == one and flops.count_flops(g, x) == one
  assert flops.count_flops(jax.grad(lambda x: jnp.sum(g(x))), x) == 3 * one  # the forward and the rule's 2 dots


def test_shard_map_counts_every_device_and_the_sharded_train_step_is_the_same():
  devices = jax.devices()[:4]
  mesh = Mesh(np.asarray(devices), ("data",))
  x = jax.ShapeDtypeStruct((8, 6), jnp.float32)
  w = jax.ShapeDtypeStruct((6, 5), jnp.float32)
  fn = jax.jit(jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
  assert flops.count_flops(fn, x, w) == 2 * 8 * 6 * 5  # 4 devices x (2 rows x 6 x 5)
  pmapped = jax.pmap(lambda x, w: x @ w, in_axes=(0, None), devices=devices)
  assert flops.count_flops(pmapped, jax.ShapeDtypeStruct((4, 2, 6), jnp.float32), w) == 2 * 8 * 6 * 5

  # The data-parallel training step (step_lib.per_device_step under shard_map, as parallel.py runs it)
  # over 4 devices counts what the single-device step counts for the same global batch.
  size, batch = 16, 8
  model = models.create_model(widths=(8, 16), block_depth=1, embedding_dims=8, bn_axis_name="data")
  single = models.create_model(widths=(8, 16), block_depth=1, embedding_dims=8)
  config = step_lib.StepConfig()
  state = jax.eval_shape(lambda: step_lib.create_train_state(single, config, jax.random.key(0), size))
  step = jax.jit(jax.shard_map(step_lib.per_device_step(model, config), mesh=mesh, in_specs=(P(), P("data"), P(), P()),
                               out_specs=(P(), P()), check_vma=False))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  normalizer = {"mean": jax.ShapeDtypeStruct((3,), jnp.float32), "variance": jax.ShapeDtypeStruct((3,), jnp.float32)}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  sharded = flops.count_flops(step, state, images, normalizer, key)
  assert sharded == batch * flops.train_step_flops(step_lib.train_step, state, single, config, size, batch)
  assert sharded == batch * closed_form_train("keras", (8, 16), size, 1, 8)


# ------------------------------------------------------------------------------------------------
# Peaks.


def test_peak_flops_table():
  peak, label = flops.peak_flops("gpu:NVIDIA H200 x1", "bf16")
  assert peak == 989.4e12 and "H200" in label
  assert flops.peak_flops("cuda:NVIDIA H100 80GB HBM3", "fp32")[0] == 494.7e12
  assert "TF32" in flops.peak_flops("NVIDIA H100 80GB HBM3", "fp32")[1]
  assert flops.peak_flops("NVIDIA H100 PCIe", "bf16")[0] == 756.5e12  # not the SXM figure
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 156e12
  assert flops.peak_flops("TPU v4", "bf16")[0] == 275e12
  assert flops.peak_flops("TPU v5 lite", "bf16")[0] == 197e12  # v5e, not v5p's 459
  assert flops.peak_flops("TPU v5", "bf16")[0] == 459e12
  assert flops.peak_flops("TPU v6 lite", "bf16")[0] == 918e12
  # fp32 at precision "highest" is not what the table's peak assumes: no peak, no MFU.
  assert flops.peak_flops("NVIDIA H200", "fp32", "highest")[0] is None
  assert flops.peak_flops("NVIDIA H200", "bf16", "highest")[0] == 989.4e12
  for kind in ("cpu", "cpu x2", "cpu (2 threads)", "NVIDIA L4", "TPU v3", ""):
    peak, label = flops.peak_flops(kind, "fp32")
    assert peak is None and label.startswith("unknown peak")
