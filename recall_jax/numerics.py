"""Numerical helpers shared by the models, the losses and the evaluation.

One definition each of: unit-norm rows (`l2_normalize`), full-precision dot-product similarities
(`similarity`) and the test for values known at trace time (`is_concrete`).

Serves both tasks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_concrete(x: Any) -> bool:
  """Whether `x` has a value now (NumPy, Python or a committed jax.Array), not a tracer's."""
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """float64 for float64 inputs, float32 otherwise (bf16/fp16 are upcast)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||_2, eps)` along the last axis, in float32 (as `torch.nn.functional.normalize`).

  All-zero rows stay zero.

  Args:
    x: (..., D) array of any float dtype.
    eps: lower bound of the norm that divides.

  Returns:
    (..., D) float32 rows of unit L2 norm (or zero).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Dot-product similarities `a @ b.T` at full precision.

  Float32 (and narrower) inputs are multiplied in float32 at `precision=HIGHEST`, because TPU and
  GPU default matmul precision rounds to bf16/tf32 and a loss temperature of 0.01 amplifies such
  errors 100x; float64 inputs stay float64.

  Args:
    a: (M, D) float array.
    b: (N, D) float array.

  Returns:
    (M, N) similarities, float32 (float64 when either input is float64).
  """
  dtype = jnp.promote_types(compute_dtype(a), compute_dtype(b))
  return jnp.matmul(jnp.asarray(a, dtype), jnp.asarray(b, dtype).T,
                    precision=jax.lax.Precision.HIGHEST)
