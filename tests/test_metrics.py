"""KID (ddim_jax/quality/metrics.py) and the InceptionV3 feature extractor (ddim_jax/quality/inception.py).

The KID estimator is checked against a double loop in float64; the Flax InceptionV3 against the
torch twin (ddim_torch_ref/inception.py) on random weights saved to a .pth file, for both weight
flavours. The real weight files are not needed (nor available offline).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from ddim_jax.quality import inception, inception_weights, metrics
from ddim_torch_ref import inception as ref_inception
from inception_helpers import random_torch_inception


def _numpy_kid(real: np.ndarray, generated: np.ndarray) -> float:
  """The unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, spelled out pair by pair in float64."""
  real, generated = real.astype(np.float64), generated.astype(np.float64)
  d = real.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1.0) ** 3  # noqa: E731
  m, n = len(real), len(generated)
  rr = sum(k(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  gg = sum(k(generated[i], generated[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  rg = sum(k(real[i], generated[j]) for i in range(m) for j in range(n)) / (m * n)
  return rr + gg - 2.0 * rg


def _features(rng: np.random.Generator, n: int, d: int = 256, scale: float = 1.0) -> np.ndarray:
  # Non-negative, like pooled post-ReLU Inception features.
  return (np.abs(rng.normal(size=(n, d))) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# KID estimator


def test_polynomial_kernel_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = _features(rng, 5), _features(rng, 7)
  want = (a.astype(np.float64) @ b.T.astype(np.float64) / a.shape[1] + 1.0) ** 3
  got = np.asarray(metrics.polynomial_kernel(a, b))
  assert got.shape == (5, 7)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("m,n", [(16, 16), (9, 13)])
def test_kid_batch_matches_float64_double_loop(m, n):
  rng = np.random.default_rng(m * n)
  real, generated = _features(rng, m), _features(rng, n, scale=1.1)
  want = _numpy_kid(real, generated)
  got = float(metrics.kid_batch(real, generated))
  # float32 kernels are ~4.5 here; 1e-5 absolute is ~20 ulps of one entry.
  assert abs(got - want) <= 1e-5, (got, want)
  assert abs(want) > 1e-3  # the sets differ: the comparison is not one of two zeros


def test_kid_averages_batches_with_equal_weight():
  rng = np.random.default_rng(1)
  batches = [(_features(rng, 8), _features(rng, 8, scale=1.0 + 0.2 * i)) for i in range(3)]
  per_batch = [_numpy_kid(r, g) for r, g in batches]
  accumulator = metrics.KIDAccumulator()
  for r, g in batches:
    accumulator.update(r, g)
  assert accumulator.count == 3
  np.testing.assert_allclose(accumulator.result(), np.mean(per_batch), atol=1e-5)
  # Not the pooled estimate over all 24 images, which weights the batches differently.
  pooled = _numpy_kid(np.concatenate([r for r, _ in batches]), np.concatenate([g for _, g in batches]))
  assert abs(pooled - np.mean(per_batch)) > 1e-3

  # kid(): images -> features through feature_fn, batches of 8, the partial last batch dropped.
  real = np.concatenate([r for r, _ in batches] + [_features(rng, 5)])
  generated = np.concatenate([g for _, g in batches] + [_features(rng, 5, scale=3.0)])
  as_images = lambda f: f.reshape(-1, 16, 16, 1)  # noqa: E731
  feature_fn = lambda images: jnp.reshape(images, (images.shape[0], -1))  # noqa: E731
  value = metrics.kid(as_images(real), as_images(generated), feature_fn, batch_size=8)
  np.testing.assert_allclose(value, np.mean(per_batch), atol=1e-5)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
  rng = np.random.default_rng(2)
  real = _features(rng, 256)
  same = _features(rng, 256)  # another sample of the same distribution
  shifted = _features(rng, 256, scale=1.1)
  identity = lambda x: x  # noqa: E731
  kid_same = metrics.kid(real, same, identity, batch_size=64)
  kid_shifted = metrics.kid(real, shifted, identity, batch_size=64)
  assert kid_shifted > 0.1, kid_shifted
  assert abs(kid_same) < 0.05 * kid_shifted, (kid_same, kid_shifted)


def test_kid_rejects_unusable_batches():
  with pytest.raises(ValueError, match="B >= 2"):
    metrics.kid_batch(np.ones((1, 4), np.float32), np.ones((3, 4), np.float32))
  with pytest.raises(ValueError, match="full batch"):
    metrics.kid(np.zeros((3, 4)), np.zeros((3, 4)), lambda x: x, batch_size=4)
  with pytest.raises(ValueError, match="before any update"):
    metrics.KIDAccumulator().result()


# ----------------------------------------------------------------------------------------------
# InceptionV3: preprocessing and pools


@pytest.mark.parametrize("size_in,size_out", [(64, 75), (128, 75), (75, 75)])
def test_preprocess_matches_torch_bilinear_resize(size_in, size_out):
  images = np.random.default_rng(3).random((2, size_in, size_in, 3), dtype=np.float32)
  got = np.asarray(inception.preprocess(images, size_out))
  nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
  want = nn.functional.interpolate(nchw, size=(size_out, size_out), mode="bilinear", align_corners=False)
  want = (want * 2 - 1).permute(0, 2, 3, 1).numpy()
  assert got.shape == (2, size_out, size_out, 3)
  np.testing.assert_allclose(got, want, atol=5e-6)  # ~1e-6 resize rounding, times 2


def test_preprocess_repeats_gray_and_rejects_small_sizes():
  gray = np.random.default_rng(4).random((1, 80, 80, 1), dtype=np.float32)
  out = np.asarray(inception.preprocess(gray, 80))
  np.testing.assert_allclose(out, np.repeat(gray * 2 - 1, 3, axis=-1), atol=1e-7)
  with pytest.raises(ValueError, match=">= 75"):
    inception.preprocess(gray, 64)


def test_pool_branches_match_torch_and_differ_from_each_other():
  x = np.random.default_rng(5).normal(size=(2, 5, 6, 3)).astype(np.float32)
  outputs = {}
  for kind in ("avg", "avg_exclude_pad", "max"):
    got = np.asarray(inception._pool_branch(jnp.asarray(x), kind))  # pylint: disable=protected-access
    want = ref_inception.pool_branch(torch.from_numpy(x).permute(0, 3, 1, 2), kind).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=kind)
    outputs[kind] = got
  # Padding enters only at the border: the avg variants agree inside and differ on the edge.
  np.testing.assert_allclose(outputs["avg"][:, 1:-1, 1:-1], outputs["avg_exclude_pad"][:, 1:-1, 1:-1], atol=1e-6)
  assert np.abs(outputs["avg"] - outputs["avg_exclude_pad"]).max() > 0.1
  assert np.abs(outputs["max"] - outputs["avg_exclude_pad"]).max() > 0.1


# ----------------------------------------------------------------------------------------------
# InceptionV3: Flax vs torch on random weights


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
  """flavour -> (torch model, path of its saved state dict), built once per module."""
  cache = {}

  def get(flavour):
    if flavour not in cache:
      model = random_torch_inception(flavour, seed=len(cache) + 10)
      path = tmp_path_factory.mktemp("inception") / f"random_{flavour}.pth"
      torch.save(model.state_dict(), path)
      cache[flavour] = (model, str(path))
    return cache[flavour]

  return get


def _torch_features(model, images_nhwc: np.ndarray, image_size: int) -> np.ndarray:
  with torch.no_grad():
    return model.features(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2), image_size).double().numpy()


def _report(name: str, got: np.ndarray, want: np.ndarray) -> float:
  diff = float(np.abs(got - want).max())
  scale = float(np.abs(want).max())
  print(f"{name}: max|diff| {diff:.3g}, max|feature| {scale:.3g}, relative {diff / scale:.3g}")
  return diff / scale


@pytest.mark.parametrize("flavour", ["torchvision", "fid"])
@pytest.mark.slow
def test_flax_features_match_torch_at_75(flavour, random_weights):
  torch_model, path = random_weights(flavour)
  state_dict = torch.load(path, weights_only=True)
  assert state_dict["fc.weight"].shape[0] == inception_weights.NUM_CLASSES[flavour]
  assert any(k.startswith("AuxLogits.") for k in state_dict) == (flavour == "torchvision")

  model, variables = inception_weights.load_inception_weights(path)  # flavour detected from fc
  assert model.flavour == flavour
  images = np.random.default_rng(6).random((2, 64, 64, 3), dtype=np.float32)  # 64 px, as trained
  got = np.asarray(inception.feature_extractor(model, variables, 75)(images))
  want = _torch_features(torch_model, images, 75)
  assert got.shape == (2, inception.FEATURE_DIM)
  assert np.abs(want).max() > 1.0 and want.std() > 0.1  # features are not degenerate
  # float32: both frameworks sit ~5e-5 from a float64 run of the same net (measured); 1e-4 relative.
  assert _report(f"{flavour} float32", got, want) <= 1e-4

  # float64 on both sides removes rounding: what is left is any difference in the architecture.
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    got64 = np.asarray(inception.feature_extractor(model, variables64, 75)(images.astype(np.float64)))
  with torch.no_grad():
    want64 = torch_model.double().features(torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2), 75)
  torch_model.float()
  assert got64.dtype == np.float64
  assert _report(f"{flavour} float64", got64, want64.numpy()) <= 1e-9

  # The torch twin loads the same file strictly (torchvision keys incl. AuxLogits / fc).
  reloaded = ref_inception.load(path)
  np.testing.assert_array_equal(_torch_features(reloaded, images, 75), want)


@pytest.mark.slow
def test_fid_flavour_matches_torch_at_299(random_weights):
  # 299 px: 8x8 maps in Mixed_7b/7c, so fid's Mixed_7c max pool differs from an average pool there
  # (at 75 px those maps are 1x1, where max and padding-excluded average coincide).
  torch_model, path = random_weights("fid")
  model, variables = inception_weights.load_inception_weights(path, flavour="fid")
  images = np.random.default_rng(7).random((1, 64, 64, 3), dtype=np.float32)
  got = np.asarray(inception.feature_extractor(model, variables, inception.R_IMAGE_SIZE)(images))
  want = _torch_features(torch_model, images, inception.R_IMAGE_SIZE)
  assert _report("fid float32 299", got, want) <= 1e-4


def test_flavours_are_different_networks(random_weights):
  torch_model, path = random_weights("fid")
  state_dict = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.startswith("fc.")}
  as_torchvision = ref_inception.InceptionV3("torchvision", aux_logits=False).eval()
  as_torchvision.load_state_dict(state_dict, strict=False)
  images = np.random.default_rng(8).random((2, 64, 64, 3), dtype=np.float32)
  fid_features = _torch_features(torch_model, images, 75)
  tv_features = _torch_features(as_torchvision, images, 75)
  assert np.abs(fid_features - tv_features).max() > 1e-2 * np.abs(fid_features).max()


def test_loader_is_strict(random_weights):
  _, path = random_weights("torchvision")
  state_dict = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
  _, variables = inception_weights.variables_from_state_dict(state_dict)
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  assert kernel.shape == (1, 7, 128, 128)  # OIHW (128, 128, 1, 7) -> HWIO
  oihw = state_dict["Mixed_6b.branch7x7_2.conv.weight"]
  np.testing.assert_array_equal(np.asarray(kernel), oihw.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"]),
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])

  missing = {k: v for k, v in state_dict.items() if k != "Mixed_5b.branch1x1.bn.running_mean"}
  with pytest.raises(ValueError, match="missing"):
    inception_weights.variables_from_state_dict(missing)
  with pytest.raises(ValueError, match="unexpected"):
    inception_weights.variables_from_state_dict({**state_dict, "Mixed_8a.conv.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="1000 .* 1008"):
    inception_weights.variables_from_state_dict({**state_dict, "fc.weight": np.zeros((10, 2048))})


def test_missing_weights_error_names_both_files(tmp_path, monkeypatch):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
  for path in (str(tmp_path / "nowhere.pth"), None):
    with pytest.raises(FileNotFoundError) as error:
      inception_weights.load_inception_weights(path)
    message = str(error.value)
    for needle in ("inception_v3_google-0cc3c7bd.pth", "pt_inception-2015-12-05-6726825d.pth",
                   inception_weights.TORCHVISION_WEIGHTS_URL, inception_weights.FID_WEIGHTS_URL, "--inception-weights"):
      assert needle in message, (needle, message)


# ------------------------------------------------------------------------------------------------
# FID


def _pytorch_fid_reference(real: np.ndarray, generated: np.ndarray) -> float:
  """pytorch-fid's calculate_activation_statistics + calculate_frechet_distance, in float64 with
  scipy's sqrtm of the covariance product (its eps offset only for a non-finite product)."""
  from scipy import linalg
  mu1, mu2 = real.mean(axis=0), generated.mean(axis=0)
  sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * 1e-6
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n1,n2,d", [(40, 40, 16), (12, 9, 16), (6, 8, 64)])
def test_fid_matches_pytorch_fid_in_float64(n1, n2, d):
  """Both routes of fid_from_features (covariances when there are more images than dimensions, the
  cross-Gram SVD otherwise) against pytorch-fid's formula with scipy's sqrtm."""
  rng = np.random.default_rng(n1 + d)
  mixing = rng.standard_normal((d, d))
  real = rng.standard_normal((n1, d)) @ mixing
  generated = rng.standard_normal((n2, d)) @ (mixing * 1.3) + 0.5
  want = _pytorch_fid_reference(real, generated)
  assert want > 1.0
  # 1e-7: with fewer images than dimensions the product of the covariances has d - n eigenvalues
  # that are 0 in exact arithmetic; sqrtm (and eigh) turn their ~1e-16 round-off into ~1e-8 each
  # (measured: 1.3e-8 and 2.5e-8 relative at n < d, 4e-12 at n > d); the cross-Gram route has none.
  assert metrics.fid_from_features(real, generated) == pytest.approx(want, rel=1e-7)
  assert metrics.fid_from_features(real, real) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(real, rowvar=False)))
  mu, cov = metrics.feature_statistics(real)
  np.testing.assert_allclose(cov, np.cov(real, rowvar=False), rtol=1e-12)
  np.testing.assert_allclose(mu, real.mean(axis=0), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm on 10 images x 2048 features
def test_fid_of_the_flax_inception_features_matches_the_torch_twins(random_weights):
  """FID computed on the Flax InceptionV3's features and on the torch twin's (the same weights file,
  the same images) agree: the port's feature differences (~1e-4 relative, above) move FID by less."""
  torch_model, path = random_weights("fid")
  model, variables = inception_weights.load_inception_weights(path)
  rng = np.random.default_rng(8)
  real = rng.random((10, 64, 64, 3), dtype=np.float32)
  generated = np.clip(real + rng.normal(0.0, 0.2, real.shape), 0.0, 1.0).astype(np.float32)
  features = inception.feature_extractor(model, variables, 75)
  got = metrics.fid_from_features(np.asarray(features(real)), np.asarray(features(generated)))
  want = metrics.fid_from_features(_torch_features(torch_model, real, 75), _torch_features(torch_model, generated, 75))
  assert want > 0 and got == pytest.approx(want, rel=1e-3)
  assert got == pytest.approx(_pytorch_fid_reference(_torch_features(torch_model, real, 75),
                                                     _torch_features(torch_model, generated, 75)), rel=1e-3)
