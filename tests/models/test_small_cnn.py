"""Tests for recall_jax.models.small_cnn."""

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
