"""Tests for recall_jax.models.cpu_layers: the same functions as flax's layers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.models import cpu_layers


def _group_norm_float64(x, scale, bias, groups, eps):
  b, h, w, c = x.shape
  xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape,groups", [((3, 7, 7, 16), 8), ((2, 4, 5, 6), 3), ((2, 2, 2, 4), 1)])
def test_group_norm_matches_float64_and_flax(shape, groups):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
  scale = rng.standard_normal(shape[-1]).astype(np.float32)
  bias = rng.standard_normal(shape[-1]).astype(np.float32)
  dy = rng.standard_normal(shape).astype(np.float32)
  ours = lambda x, s, b: cpu_layers.group_norm(x, s, b, groups, 1e-5)
  flax_gn = lambda x, s, b: nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply(
      {"params": {"scale": s, "bias": b}}, x)
  out = jax.jit(ours)(x, scale, bias)
  np.testing.assert_allclose(out, _group_norm_float64(x, scale, bias, groups, 1e-5),
                             rtol=1e-5, atol=1e-5)
  grads = jax.vjp(ours, x, scale, bias)[1](dy)
  expected = jax.vjp(flax_gn, x, scale, bias)[1](dy)
  chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-4)


def test_group_norm_rejects_groups_that_do_not_divide():
  with pytest.raises(ValueError, match="do not split"):
    cpu_layers.group_norm(jnp.zeros((1, 2, 2, 6)), jnp.ones(6), jnp.zeros(6), 4)


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (4, 5), (1, 1)])
def test_max_pool_matches_flax_values_and_grads(size):
  # Continuous random values: no ties, where the two gradients split differently.
  x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
  dy = np.random.default_rng(2).standard_normal((2, -(-size[0] // 2), -(-size[1] // 2), 3))
  pad = ((0, size[0] % 2), (0, size[1] % 2))
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad)
  np.testing.assert_array_equal(cpu_layers.max_pool_2x2(x), flax_pool(x))
  ours = jax.vjp(cpu_layers.max_pool_2x2, x)[1](dy.astype(np.float32))
  np.testing.assert_array_equal(ours[0], jax.vjp(flax_pool, x)[1](dy.astype(np.float32))[0])
  # Independent reference: each window's maximum receives its output's cotangent.
  expected = np.zeros_like(x)
  for i in range(dy.shape[1]):
    for j in range(dy.shape[2]):
      window = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
      flat = window.reshape(2, -1, 3).argmax(axis=1)
      for n in range(2):
        for c in range(3):
          di, dj = divmod(flat[n, c], window.shape[2])
          expected[n, 2 * i + di, 2 * j + dj, c] = dy[n, i, j, c]
  np.testing.assert_allclose(ours[0], expected, rtol=1e-6)
