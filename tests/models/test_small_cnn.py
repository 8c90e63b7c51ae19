"""Tests for recall_jax.models.small_cnn."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models


def test_small_cnn_init_and_embeddings():
  size, channels = 28, 1
  model = models.get_model("small_cnn", embedding_dim=32, image_size=size)
  variables = models.init_variables(model, jax.random.key(0), size, channels=channels)
  assert list(variables) == ["params"]  # No batch statistics or other state.
  images = np.random.default_rng(size).integers(0, 256, (4, size, size, channels), np.uint8)
  apply = jax.jit(model.apply)
  out = np.asarray(apply(variables, images))
  assert out.shape == (4, 32) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
  assert np.abs(out[0] - out[1]).max() > 1e-3
  # GroupNorm: an image's embedding does not depend on the rest of the batch.
  chunks = np.concatenate([np.asarray(apply(variables, images[i:i + 2])) for i in (0, 2)])
  np.testing.assert_allclose(chunks, out, atol=1e-5)
  for size in (28, 64):  # Ceil-mode pooling: 28 -> 14 -> 7 -> 4 -> 2; 64 -> 4.
    fmap = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables,
                          jnp.zeros((1, size, size, 3)))
    assert fmap.shape == (1, -(-size // 16), -(-size // 16), 128)


def test_small_cnn_options_and_errors():
  model = models.get_model("small_cnn", channels=(8, 16), convs_per_block=2, with_head=False)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 32))
  assert set(variables["params"]["backbone"]) == {
      f"block{i}_{kind}{j}" for i in range(2) for j in range(2) for kind in ("conv", "norm")}
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))), variables)
  assert out.shape == (2, 16)
  with pytest.raises(ValueError, match="at least one block"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model("small_cnn", channels=()), jax.random.key(0), 28))
  with pytest.raises(ValueError, match="no pretrained checkpoints"):
    models.load_pretrained("small_cnn", variables, "x.npz")


def test_small_cnn_flatten_pooling_keeps_the_layout():
  model = models.get_model("small_cnn_flat", embedding_dim=16, image_size=28)
  variables = models.init_variables(model, jax.random.key(0), 28, channels=1)
  # LayerNorm over the flattened 2 x 2 x 128 map (ceil-mode pooling of 28 px).
  assert variables["params"]["embedding_head"]["norm"]["scale"].shape == (512,)
  features = models.get_model("small_cnn_flat", with_head=False)
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), np.uint8)
  fmap = np.asarray(model.apply(variables, images, method="features"))
  pooled = np.asarray(features.apply({"params": variables["params"]}, images))
  np.testing.assert_array_equal(pooled, fmap.reshape(3, -1))  # row-major (h, w, c) order
  out = np.asarray(model.apply(variables, images))
  assert out.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="pooling must be"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model("small_cnn", pooling="max"), jax.random.key(0), 28))


def test_small_cnn_cpu_ops_give_the_standard_function_and_gradient():
  kwargs = dict(embedding_dim=16, image_size=28)
  standard = models.get_model("small_cnn_flat", ops="standard", **kwargs)
  cpu = models.get_model("small_cnn_flat", ops="cpu", **kwargs)
  variables = models.init_variables(standard, jax.random.key(0), 28, channels=1)
  # Same parameter tree and initial values, so checkpoints move between the two.
  chex.assert_trees_all_equal(models.init_variables(cpu, jax.random.key(0), 28, channels=1),
                              variables)
  images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), np.uint8)
  targets = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)

  def loss(model, params):
    return jnp.sum(model.apply({"params": params}, images) * targets)

  for model in (standard, cpu):
    assert model.apply(variables, images).shape == (6, 16)
  chex.assert_trees_all_close(cpu.apply(variables, images), standard.apply(variables, images),
                              atol=1e-5)
  grads = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(variables["params"])
           for m in (standard, cpu)]
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="ops must be one of"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model("small_cnn", ops="gpu"), jax.random.key(0), 28))
