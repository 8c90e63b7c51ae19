"""Tests for recall_jax.evaluation.multiscale against NumPy references and unpadded images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models
from recall_jax.evaluation import multiscale


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("power", [1.0, 3.0, 2.2])
def test_combine_scales_matches_numpy(power):
  d = unit(np.random.default_rng(0).uniform(0, 1, size=(3, 4, 5)))
  got = np.asarray(multiscale.combine_scales(jnp.asarray(d, jnp.float32), power))
  want = unit(np.mean(d**power, axis=0)**(1 / power))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_combine_scales_plain_mean_allows_negative_descriptors():
  d = unit(np.random.default_rng(1).normal(size=(3, 4, 5)))
  np.testing.assert_allclose(np.asarray(multiscale.combine_scales(jnp.asarray(d), 1.0)),
                             unit(d.mean(axis=0)), atol=1e-6)


def padded_batch(sizes, canvas, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(len(sizes), canvas, canvas, 3), dtype=np.uint8)
  mask = np.zeros((len(sizes), canvas, canvas), bool)
  for i, (h, w) in enumerate(sizes):
    mask[i, :h, :w] = True
  return images, mask


@pytest.mark.parametrize("scale", [2**-0.5, 2**0.5])
def test_rescale_of_padded_real_region_equals_resize_of_unpadded(scale):
  sizes = [(64, 40), (33, 64)]
  images, mask = padded_batch(sizes, 64, 2)
  got, new_mask = multiscale.rescale(jnp.asarray(images), jnp.asarray(mask), scale)
  got, new_mask = np.asarray(got), np.asarray(new_mask)
  side = math.floor(64 * scale + 0.5)
  assert got.shape == (2, side, side, 3) and new_mask.shape == (2, side, side)
  for i, (h, w) in enumerate(sizes):
    out = (math.floor(h * scale + 0.5), math.floor(w * scale + 0.5))
    want = np.asarray(jax.image.resize(images[i, :h, :w].astype(np.float32) / 255,
                                       out + (3,), "linear"))
    assert new_mask[i].sum() == out[0] * out[1] and new_mask[i, :out[0], :out[1]].all()
    np.testing.assert_allclose(got[i, :out[0], :out[1]], want, atol=1e-5)
  with pytest.raises(ValueError, match="positive"):
    multiscale.rescale(jnp.asarray(images), None, 0.0)


@pytest.fixture(scope="module")
def landmark_model():
  model = models.get_model("resnet_tiny_landmark_test", whiten=False)
  variables = models.init_variables(model, jax.random.key(0), 32)
  variables["params"]["landmark_head"]["gem"]["p"] = jnp.array([2.5])
  return model, variables


def test_multiscale_matches_numpy_combination_and_is_padding_invariant(landmark_model):
  model, variables = landmark_model
  power = multiscale.multiscale_power(model, variables)
  assert power == pytest.approx(2.5)
  describe = jax.jit(lambda x, m: model.apply(variables, x, mask=m))
  sizes = [(64, 45), (64, 64)]  # The same unpadded shapes at each scale: one compile each.
  images, mask = padded_batch(sizes, 64, 3)
  got = np.asarray(multiscale.multiscale_descriptors(describe, jnp.asarray(images),
                                                     jnp.asarray(mask), power=power))
  apply = jax.jit(model.apply)
  for i, (h, w) in enumerate(sizes[:1]):
    real = images[i:i + 1, :h, :w].astype(np.float32) / 255
    per_scale = []
    for s in multiscale.DEFAULT_SCALES:
      out = (math.floor(h * s + 0.5), math.floor(w * s + 0.5))
      resized = jax.image.resize(real, (1,) + out + (3,), "linear")
      per_scale.append(np.asarray(apply(variables, resized), np.float64)[0])
    want = unit(np.mean(np.array(per_scale)**2.5, axis=0)**(1 / 2.5))
    np.testing.assert_allclose(got[i], want, atol=1e-4)
  single = np.asarray(multiscale.multiscale_descriptors(describe, jnp.asarray(images),
                                                        jnp.asarray(mask), scales=(1.0,),
                                                        power=power))
  np.testing.assert_allclose(single, np.asarray(describe(jnp.asarray(images) / 255, mask)),
                             atol=1e-6)
  assert np.abs(single - got).max() > 1e-4


def test_multiscale_power_is_one_with_whitening_or_embedding_head(landmark_model):
  _, variables = landmark_model
  whitened = models.get_model("resnet_tiny_landmark_test")
  assert multiscale.multiscale_power(whitened, variables) == 1.0
  assert multiscale.multiscale_power(models.get_model("resnet_tiny_test"), variables) == 1.0
  assert multiscale.multiscale_power(models.get_model("vit_tiny_test"), {}) == 1.0
