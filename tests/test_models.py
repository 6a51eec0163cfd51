"""The U-Net of both twins: embedding, building blocks, parameter counts, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from ddim_jax.core import models
from ddim_jax.interop import parity, parity_fixtures
from ddim_torch_ref import models as torch_models


def test_embedding_matches_numpy_formula():
  variances = np.array([0.0, 0.0975, 0.5, 0.9996], np.float32).reshape(4, 1, 1, 1)
  # The spec's formula in float64: 16 log-spaced frequencies in [1, 1000], angles 2 pi f v.
  frequencies = np.exp(np.linspace(np.log(1.0), np.log(1000.0), 16))
  angles = 2 * np.pi * frequencies * variances.astype(np.float64)
  expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
  got = np.asarray(models.sinusoidal_embedding(jnp.asarray(variances), 32))
  got_torch = torch_models.sinusoidal_embedding(torch.from_numpy(variances), 32).numpy()
  assert got.shape == (4, 1, 1, 32) and got_torch.shape == (4, 32, 1, 1)
  # float32 angles up to 6283 rad carry ~2.5e-4 rad of rounding: the twins share it exactly.
  np.testing.assert_allclose(got, expected, atol=1e-3)
  np.testing.assert_allclose(got, np.moveaxis(got_torch, 1, -1), atol=1e-6)
  np.testing.assert_allclose(got[0], np.concatenate([np.zeros(16), np.ones(16)]).reshape(1, 1, 32))


def test_upsample_matches_half_pixel_bilinear():
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  got = np.asarray(models.upsample2x_bilinear(jnp.asarray(x)))
  ref_torch = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).numpy()
  with parity.precision("highest"):  # resize applies dense weight matrices: TF32 on GPUs by default
    ref_jax = np.asarray(jax.image.resize(jnp.asarray(x), (2, 10, 14, 3), "bilinear"))
  np.testing.assert_allclose(got, ref_torch, atol=1e-6)
  np.testing.assert_allclose(got, ref_jax, atol=1e-6)


@pytest.mark.parametrize("variant,params,stats", [("keras", 1_950_627, 2_880), ("r", 3_562_211, 4_288)])
def test_parameter_counts_at_64x64(variant, params, stats):
  model = models.create_model(variant)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))
  assert models.count_parameters(shapes["params"]) == params
  assert models.count_parameters(shapes["batch_stats"]) == stats
  twin = torch_models.create_model(variant)
  assert torch_models.count_parameters(twin) == params
  assert sum(b.numel() for b in twin.buffers()) == stats


def test_keras_variant_structure():
  model = models.create_model("keras")
  params = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))["params"]
  # Projections exactly where the width changes (the Keras example's network).
  projected = sorted(f"{a}/{b}" for a, blk in params.items() if isinstance(blk, dict)
                     for b, sub in blk.items() if isinstance(sub, dict) and "proj" in sub)
  assert projected == ["down_blocks_0/residual_blocks_0", "down_blocks_1/residual_blocks_0",
                       "down_blocks_2/residual_blocks_0", "up_blocks_0/residual_blocks_0",
                       "up_blocks_0/residual_blocks_1", "up_blocks_1/residual_blocks_0",
                       "up_blocks_1/residual_blocks_1", "up_blocks_2/residual_blocks_0",
                       "up_blocks_2/residual_blocks_1"]
  assert "proj" in params["mid_blocks_0"] and "proj" not in params["mid_blocks_1"]
  # BatchNorm(center=False, scale=False): no BN parameter anywhere.
  assert not any("norm" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


@pytest.mark.parametrize("variant", ["keras", "r"])
@pytest.mark.slow
def test_fresh_model_predicts_zero_and_glorot_init(variant):
  model = models.create_model(variant, widths=(8, 16), block_depth=1)
  variables = models.init_variables(model, jax.random.key(0), 16)
  x = jnp.ones((2, 16, 16, 3))
  v = jnp.full((2, 1, 1, 1), 0.5)
  out = model.apply(variables, x, v)
  assert out.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero-initialised head
  kernel = np.asarray(variables["params"]["down_blocks_0"]["residual_blocks_0"]["conv1"]["kernel"])
  fan_in, fan_out = 9 * kernel.shape[2], 9 * kernel.shape[3]
  bound = math.sqrt(6 / (fan_in + fan_out)) if variant == "keras" else 1 / math.sqrt(fan_in)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.8 * bound


# BatchNorm numerics written from the originals, not from models.py:
# Keras BatchNormalization defaults (keeps 0.99 of the running value per step, eps 1e-3); R's
# nn_batch_norm2d with torch defaults (update momentum 0.1, i.e. keeps 0.9; eps 1e-5).
BN_ORIGINALS = {"keras": {"keep": 0.99, "eps": 1e-3}, "r": {"keep": 1.0 - 0.1, "eps": 1e-5}}
BN_TINY = dict(widths=(8, 16), block_depth=1)
OLD_MEAN, OLD_VAR = 5.0, 10.0  # running statistics far from any batch statistic of these inputs


def _bn_inputs():
  rng = np.random.default_rng(11)
  x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  v = rng.uniform(0.1, 0.9, (4, 1, 1, 1)).astype(np.float32)
  return x, v


def _flax_bn_calls(model, variables, x, v, train):
  """Applies ``model``; returns ({module path: (input, output)} of every nn.BatchNorm call, new batch_stats)."""

  @jax.jit  # one compilation of the tiny net: op-by-op eager dispatch compiles every op (~10 s)
  def run(variables):
    calls = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
        calls[context.module.scope.path] = (args[0], out)
      return out

    with nn.intercept_methods(interceptor):
      if train:
        _, updates = model.apply(variables, jnp.asarray(x), jnp.asarray(v), train=True, mutable=["batch_stats"])
        return calls, updates["batch_stats"]
      model.apply(variables, jnp.asarray(x), jnp.asarray(v), train=False)
      return calls, None

  calls, new_stats = run(variables)
  return {path: tuple(np.asarray(a, np.float64) for a in pair) for path, pair in calls.items()}, new_stats


def _init(model):
  """Random variables of ``model`` from NumPy (shapes by eval_shape; a jitted or eager init costs ~10 s)."""
  rng = np.random.default_rng(5)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 8))

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray((rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32))

  return jax.tree.map(fill, shapes)


def _torch_bn_calls(model, x, v):
  """Runs the torch twin; returns {module name: (input, output)} of every BatchNorm call, NHWC float64."""
  calls, hooks = {}, []
  for name, module in model.named_modules():
    if isinstance(module, torch_models.BatchNorm):
      hooks.append(module.register_forward_hook(
          lambda m, args, out, name=name: calls.__setitem__(
              name, tuple(t.detach().permute(0, 2, 3, 1).double().numpy() for t in (args[0], out)))))
  with torch.no_grad():
    model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(v))
  for hook in hooks:
    hook.remove()
  return calls


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _with_stats(batch_stats, mean, var):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.full_like(leaf, mean if path[-1].key == "mean" else var), batch_stats)


@pytest.mark.parametrize("variant", ["keras", "r"])
@pytest.mark.slow
def test_batchnorm_momentum_is_the_originals(variant):
  """One train-mode pass from known running stats: new = keep * old + (1 - keep) * batch statistic.

  Measured on every BatchNorm the U-Net of each twin really builds. The running variance takes the
  biased batch variance in both variants (Keras; for R a documented deviation, README).
  """
  keep = BN_ORIGINALS[variant]["keep"]
  x, v = _bn_inputs()

  model = models.create_model(variant, **BN_TINY)
  variables = _init(model)
  variables = dict(variables, batch_stats=_with_stats(variables["batch_stats"], OLD_MEAN, OLD_VAR))
  calls, new_stats = _flax_bn_calls(model, variables, x, v, train=True)
  num_norms = len(jax.tree.leaves(variables["batch_stats"])) // 2
  assert len(calls) == num_norms >= 3, (len(calls), num_norms)
  for path, (xin, _) in calls.items():
    stats = _leaf(new_stats, path)
    np.testing.assert_allclose(stats["mean"], keep * OLD_MEAN + (1 - keep) * xin.mean((0, 1, 2)), rtol=1e-5,
                               err_msg=f"flax {path}")
    np.testing.assert_allclose(stats["var"], keep * OLD_VAR + (1 - keep) * xin.var((0, 1, 2)), rtol=1e-5,
                               err_msg=f"flax {path}")

  twin = torch_models.create_model(variant, **BN_TINY).train()
  for module in twin.modules():
    if isinstance(module, torch_models.BatchNorm):
      module.running_mean.fill_(OLD_MEAN)
      module.running_var.fill_(OLD_VAR)
  calls = _torch_bn_calls(twin, x, v)
  assert len(calls) == num_norms
  for name, (xin, _) in calls.items():
    module = twin.get_submodule(name)
    np.testing.assert_allclose(module.running_mean.numpy(), keep * OLD_MEAN + (1 - keep) * xin.mean((0, 1, 2)),
                               rtol=1e-5, err_msg=f"torch {name}")
    np.testing.assert_allclose(module.running_var.numpy(), keep * OLD_VAR + (1 - keep) * xin.var((0, 1, 2)),
                               rtol=1e-5, err_msg=f"torch {name}")


@pytest.mark.parametrize("variant", ["keras", "r"])
def test_batchnorm_epsilon_is_the_originals(variant):
  """Eval mode with running mean 0 and running variance 0: every BatchNorm maps x to x / sqrt(eps)."""
  eps = BN_ORIGINALS[variant]["eps"]
  x, v = _bn_inputs()

  def measured_eps(calls):
    assert calls
    for name, (xin, out) in calls.items():
      assert np.all(np.isfinite(out)), name
      used = np.abs(xin) > 1e-3 * np.abs(xin).max()
      yield name, np.median((xin[used] / out[used]) ** 2)

  model = models.create_model(variant, **BN_TINY)
  variables = _init(model)
  params = jax.tree_util.tree_map_with_path(  # affine BN (r): scale 1, bias 0 so that y = x / sqrt(eps)
      lambda path, leaf: jnp.ones_like(leaf) if path[-1].key == "scale" else
      (jnp.zeros_like(leaf) if path[-2].key == "norm" else leaf), variables["params"])
  variables = dict(variables, params=params, batch_stats=_with_stats(variables["batch_stats"], 0.0, 0.0))
  calls, _ = _flax_bn_calls(model, variables, x, v, train=False)
  assert len(calls) == len(jax.tree.leaves(variables["batch_stats"])) // 2
  for name, got in measured_eps(calls):
    assert got == pytest.approx(eps, rel=1e-4), f"flax {name}"

  twin = torch_models.create_model(variant, **BN_TINY).eval()
  with torch.no_grad():
    for module in twin.modules():
      if isinstance(module, torch_models.BatchNorm):
        module.running_mean.zero_()
        module.running_var.zero_()
        if module.affine:
          module.weight.fill_(1.0)
          module.bias.zero_()
  for name, got in measured_eps(_torch_bn_calls(twin, x, v)):
    assert got == pytest.approx(eps, rel=1e-4), f"torch {name}"


def test_bad_model_config_errors():
  with pytest.raises(ValueError, match="unknown model variant"):
    models.create_model("unet3d")
  with pytest.raises(ValueError, match="widths"):
    models.create_model(widths=(32,))
  with pytest.raises(ValueError, match="embedding_dims"):
    models.create_model(embedding_dims=31)
  with pytest.raises(ValueError, match="multiple of 8"):
    models.init_variables(models.create_model(), jax.random.key(0), 60)
  with pytest.raises(ValueError, match="unknown model variant"):
    torch_models.create_model("unet3d")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state_and_tracks_float32():
  """Mixed precision (the benchmark's --precision bf16): bf16 activations, float32 params and optimiser."""
  from ddim_jax.core import step as step_lib
  kw = dict(widths=(8, 16), block_depth=1)
  model32, model16 = models.create_model(**kw), models.create_model(**kw, dtype=jnp.bfloat16)
  variables = parity_fixtures.perturbed_variables(model32, 16)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 3), dtype=np.float32))
  v = jnp.asarray(rng.uniform(0.1, 0.9, (4, 1, 1, 1)).astype(np.float32))
  out32 = np.asarray(model32.apply(variables, x, v))
  out16 = model16.apply(variables, x, v)
  assert out16.dtype == jnp.float32  # the head's output is cast back
  rel = np.abs(np.asarray(out16) - out32).max() / np.abs(out32).max()
  assert 1e-5 < rel < 0.05, rel  # bf16 really ran (not exact), and stays within bf16's ~3 digits

  step_config = step_lib.StepConfig()
  normalizer = {"mean": jnp.full(3, 0.5), "variance": jnp.full(3, 0.08)}
  images = jnp.asarray(rng.random((4, 16, 16, 3), dtype=np.float32))
  key = jax.random.key_data(jax.random.key(1))
  losses = {}
  for name, model in (("fp32", model32), ("bf16", model16)):
    state = step_lib.create_train_state(model, step_config, jax.random.key(0), 16)
    # Perturbed weights: the fresh zero-initialised head would predict 0 in both precisions.
    state = state.replace(params=jax.tree.map(jnp.asarray, variables["params"]),
                          batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]))
    state, metrics = jax.jit(lambda s, m=model: step_lib.train_step(s, images, normalizer, key, model=m,
                                                                  step_config=step_config, axis_name=None))(state)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state.params, state.ema_params)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if hasattr(leaf, "dtype")
               and jnp.issubdtype(leaf.dtype, jnp.floating))
    losses[name] = float(metrics["loss"])
  assert losses["bf16"] != losses["fp32"]
  assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses
