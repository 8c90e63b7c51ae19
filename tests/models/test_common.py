"""Tests for recall_jax.models.common: preprocessing, L2 normalisation, GeM, the head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.models import common


def test_preprocess_uint8_equals_float_and_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
  want = (images.astype(np.float64) / 255 - np.array(common.IMAGENET_MEAN)) / np.array(
      common.IMAGENET_STD)
  got_u8 = np.asarray(common.preprocess_images(jnp.asarray(images)))
  got_f = np.asarray(common.preprocess_images(jnp.asarray(images, jnp.float32) / 255))
  assert got_u8.dtype == np.float32
  np.testing.assert_allclose(got_u8, want, atol=1e-5)
  np.testing.assert_allclose(got_f, want, atol=1e-5)


def test_preprocess_grey_is_replicated_to_rgb():
  grey = np.random.default_rng(1).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
  got = common.preprocess_images(jnp.asarray(grey))
  want = common.preprocess_images(jnp.asarray(np.repeat(grey, 3, axis=-1)))
  assert got.shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape,dtype,match", [
    ((2, 4, 4, 2), np.uint8, "1 \\(grey\\) or 3 \\(RGB\\) channels"),
    ((4, 4, 3), np.uint8, "shape \\(B, H, W, C\\)"),
    ((1, 4, 4, 3), np.int32, "uint8 in \\[0, 255\\] or floating point"),
])
def test_preprocess_rejects_bad_input(shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    common.preprocess_images(jnp.zeros(shape, dtype))


def test_l2_normalize_matches_numpy_and_handles_zero():
  x = np.random.default_rng(2).normal(size=(4, 7)).astype(np.float32)
  x[1] = 0.0
  got = np.asarray(common.l2_normalize(jnp.asarray(x)))
  norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  want = x / np.maximum(norms, 1e-12)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got[[0, 2, 3]], axis=1), 1.0, atol=1e-6)
  assert np.all(got[1] == 0) and np.all(np.isfinite(got))


def test_gem_pool_matches_numpy_and_limits(x64):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 4, 5))  # Negative values exercise the clamp.
  p = 2.5
  got = np.asarray(common.gem_pool(jnp.asarray(x, jnp.float32), jnp.asarray([p])))
  want = np.mean(np.maximum(x, 1e-6) ** p, axis=(1, 2)) ** (1 / p)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  pos = np.abs(x) + 0.1
  avg = np.asarray(common.gem_pool(jnp.asarray(pos), jnp.asarray([1.0])))
  np.testing.assert_allclose(avg, pos.mean(axis=(1, 2)), rtol=1e-6)
  # A large p approaches the spatial maximum (within 12^(1/30) for 12 positions).
  big = np.asarray(common.gem_pool(jnp.asarray(pos), jnp.asarray([30.0])))
  np.testing.assert_allclose(big, pos.max(axis=(1, 2)), rtol=0.1)


def test_gem_module_p_is_a_trainable_param_with_finite_gradient():
  gem = common.GeM()
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 3, 4)), jnp.float32)
  variables = gem.init(jax.random.key(0), x)
  np.testing.assert_array_equal(np.asarray(variables["params"]["p"]), [3.0])
  grad = jax.grad(lambda v: jnp.sum(gem.apply(v, x)))(variables)["params"]["p"]
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad[0])) > 0


def test_embedding_head_is_float32_unit_norm():
  head = common.EmbeddingHead(embedding_dim=6)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 10)), jnp.bfloat16)
  variables = head.init(jax.random.key(0), x)
  out = head.apply(variables, x)
  assert out.shape == (3, 6) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-6)
  assert variables["params"]["norm"]["scale"].shape == (10,)


def test_masked_gem_pool_matches_numpy_on_valid_cells():
  rng = np.random.default_rng(8)
  features = rng.normal(size=(3, 4, 5, 6))
  mask = np.zeros((3, 4, 5), bool)
  mask[0] = True
  mask[1, :2, :3] = True
  mask[2, 1, 4] = True
  got = np.asarray(common.masked_gem_pool(jnp.asarray(features), jnp.asarray(mask), 3.0))
  for b in range(3):
    cells = np.maximum(features[b][mask[b]], 1e-6)
    np.testing.assert_allclose(got[b], np.mean(cells**3, axis=0)**(1 / 3), rtol=1e-6)  # float32
  np.testing.assert_allclose(got[0], np.asarray(common.gem_pool(jnp.asarray(features[:1]), 3.0))[0],
                             rtol=1e-6)


def test_masked_gem_pool_empty_mask_is_finite_and_bad_shapes_raise():
  features = jnp.ones((2, 2, 2, 3))
  mask = jnp.array([[[True, False], [False, False]], [[False, False], [False, False]]])
  p = jnp.array([3.0])
  value, grad = jax.value_and_grad(
      lambda q: common.masked_gem_pool(features, mask, q).sum())(p)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(np.asarray(common.masked_gem_pool(features, mask, p))[1], 1e-6,
                             rtol=1e-4)
  with pytest.raises(AssertionError):
    common.masked_gem_pool(features, mask[:, :1], p)
