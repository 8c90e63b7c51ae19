"""The small CNN's GroupNorm and max-pooling in forms that XLA:CPU runs faster.

Same functions as `flax.linen.GroupNorm` and `flax.linen.max_pool` (up to float rounding), written
as operations XLA's CPU backend vectorises well: per-channel sums and tiny matmuls instead of a
reduction over a (B, H, W, G, C / G) view, and a reshape + max instead of a pooling window (whose
gradient is a slow select-and-scatter there). Accelerators keep flax's layers
(`SmallCNN(ops='auto')`).

Measured (`benchmarks/train_step_cpu.py`, demo step, B = 1,000 in chunks of 125): convolutions as
patch extraction + matmul with a custom VJP were tried as well and were slower than XLA's own
convolutions on this backend, so the convolutions stay `nn.Conv`.

Serves both tasks.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling, stride 2, ceil mode (odd sizes padded with -inf at the end), as a reshape.

  The same values as `flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding=((0, H % 2),
  (0, W % 2)))`. The gradient goes to the window's maxima (shared equally between exact ties,
  where `max_pool`'s gives it to one of them); after a ReLU the only ties in practice are zeros,
  whose gradient the ReLU stops either way.

  Args:
    x: (B, H, W, C) float.

  Returns:
    (B, ceil(H / 2), ceil(W / 2), C).
  """
  chex.assert_rank(x, 4)
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
  h2, w2 = -(-h // 2), -(-w // 2)
  return jnp.max(x.reshape(b, h2, 2, w2, 2, c), axis=(2, 4))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float = 1e-5) -> jax.Array:
  """GroupNorm with per-channel sums over the pixels and tiny group matmuls, for XLA:CPU.

  The same function as `flax.linen.GroupNorm(num_groups, epsilon)` (which also takes the variance
  as E[x^2] - E[x]^2): statistics over the pixels and the channels of each group. XLA:CPU reduces
  flax's (B, H, W, G, C / G) view slowly (its innermost reduced axis is C / G elements long); here
  each channel is summed over the pixels (a reduction along a non-minor axis, vectorised across the
  channels), the channels are gathered into groups by a (C, G) one-hot matmul, and the
  normalisation is one fused multiply-add with per-image, per-channel coefficients.

  Args:
    x: (B, H, W, C) float.
    scale, bias: (C,).
    num_groups: G, dividing C.
    epsilon: added to the variance.

  Returns:
    (B, H, W, C) in `x`'s dtype.
  """
  chex.assert_rank(x, 4)
  b, h, w, c = x.shape
  if c % num_groups:
    raise ValueError(f"{c} channels do not split into {num_groups} groups")
  xf = x.reshape(b, h * w, c).astype(jnp.promote_types(x.dtype, jnp.float32))
  one_hot = (jnp.arange(c)[:, None] // (c // num_groups) == jnp.arange(num_groups)[None, :]
             ).astype(xf.dtype)  # (C, G)
  count = h * w * (c // num_groups)
  mean = jnp.sum(xf, axis=1) @ one_hot / count  # (B, G)
  mean_sq = jnp.sum(jnp.square(xf), axis=1) @ one_hot / count
  rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + epsilon)
  gain = (rstd @ one_hot.T) * scale  # (B, C)
  offset = bias - (mean * rstd) @ one_hot.T * scale
  return (xf * gain[:, None, :] + offset[:, None, :]).reshape(x.shape).astype(x.dtype)
