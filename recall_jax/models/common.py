"""Layers shared by the backbones: input normalisation, (masked) GeM pooling, the heads.

All functions here are pure; the modules hold only parameters.

Serves both tasks.
"""

from typing import Any
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from recall_jax.numerics import l2_normalize

# ImageNet statistics of RGB pixels in [0, 1]. The official Recall@k code normalises the ViTs with
# these as well (not with AugReg's mean = std = 0.5), so every backbone here uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Dtype = Any


def preprocess_images(
    images: jax.Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
  """Scales images to [0, 1] when uint8, replicates grey images to RGB and standardises them.

  Args:
    images: (B, H, W, C) with C = 3 (RGB) or C = 1 (grey, replicated to 3 channels). uint8 images
      are in [0, 255]; floating-point images must already be in [0, 1].
    mean: per-channel mean of [0, 1] pixels, length 3.
    std: per-channel standard deviation of [0, 1] pixels, length 3.

  Returns:
    float32 (B, H, W, 3): (pixels - mean) / std.
  """
  if images.ndim != 4:
    raise ValueError(f"images must have shape (B, H, W, C), got shape {images.shape}")
  channels = images.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {channels} "
                     f"(shape {images.shape})")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"images must be uint8 in [0, 255] or floating point in [0, 1], "
                     f"got dtype {images.dtype}")
  if channels == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  mean_arr = jnp.asarray(mean, jnp.float32)
  std_arr = jnp.asarray(std, jnp.float32)
  return (x - mean_arr) / std_arr


def gem_pool(features: jax.Array, p: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Generalised-mean pooling over the spatial axes (Radenovic et al., 2018), in float32.

  Args:
    features: (B, H, W, C) feature map.
    p: scalar or shape (1,) exponent; p = 1 is average pooling, p -> inf is max pooling.
    eps: features are clamped to >= eps before the power, so the gradient w.r.t. p is finite.

  Returns:
    float32 (B, C): (mean_{h,w} clamp(x, eps)^p)^(1/p).
  """
  chex.assert_rank(features, 4)
  p = jnp.reshape(p, ()).astype(jnp.float32)
  x = jnp.maximum(features.astype(jnp.float32), eps)
  return jnp.mean(x**p, axis=(1, 2)) ** (1.0 / p)


def masked_gem_pool(features: jax.Array, mask: jax.Array, p: jax.Array,
                    eps: float = 1e-6) -> jax.Array:
  """GeM pooling over the valid cells of a padded feature map only, in float32.

  Args:
    features: (B, H, W, C) feature map of padded images.
    mask: (B, H, W) bool or {0, 1}: True where the cell belongs to the real image. Each image
      needs at least one valid cell (an all-padding image pools to eps).
    p: scalar or shape (1,) exponent.
    eps: features are clamped to >= eps before the power.

  Returns:
    float32 (B, C): (sum_{valid h,w} clamp(x, eps)^p / #valid)^(1/p); equals `gem_pool` of the
    unpadded map when the valid cells are its cells.
  """
  chex.assert_rank(features, 4)
  chex.assert_shape(mask, features.shape[:3])
  p = jnp.reshape(p, ()).astype(jnp.float32)
  weights = mask.astype(jnp.float32)[..., None]
  x = jnp.maximum(features.astype(jnp.float32), eps) ** p
  count = jnp.sum(weights, axis=(1, 2))
  mean = jnp.sum(x * weights, axis=(1, 2)) / jnp.maximum(count, 1.0)
  # An all-padding image pools to eps rather than 0, whose 1/p-th power has no gradient.
  return jnp.where(count > 0, mean, eps**p) ** (1.0 / p)


class GeM(nn.Module):
  """GeM pooling with a learnable exponent `p` (a (1,) parameter in `params`)."""

  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) [with a (B, H, W) validity mask] -> float32 (B, C)."""
    p = self.param("p", nn.initializers.constant(self.p_init), (1,), jnp.float32)
    if mask is None:
      return gem_pool(features, p, self.eps)
    return masked_gem_pool(features, mask, p, self.eps)


class EmbeddingHead(nn.Module):
  """The paper's head: LayerNorm(width, eps 1e-5) -> Linear(width -> embedding_dim) -> L2-normalise.

  Always computes in float32: it is tiny, and the embeddings feed a loss on cosine similarities
  that is sensitive to rounding.
  """

  embedding_dim: int = 512
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """(B, width) -> float32 (B, embedding_dim), unit L2 norm."""
    x = features.astype(jnp.float32)
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                     name="norm")(x)
    x = nn.Dense(self.embedding_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                 name="proj")(x)
    return l2_normalize(x)


class LandmarkHead(nn.Module):
  """The landmark-retrieval head: GeM -> L2 -> [whitening FC (D -> embedding_dim, bias) -> L2].

  (Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018.)
  The FC is initialised as the identity when `embedding_dim` equals the feature width, so an
  untrained head returns the L2-normalised GeM descriptor; `recall_jax.models.load_whitening`
  writes a learned whitening into it (`kernel = P^T`, `bias = -P m`).

  Attributes:
    embedding_dim: output size of the whitening FC (the feature width D for a D x D whitening;
      smaller for a dimension reduction).
    whiten: if False there is no FC: the head returns the L2-normalised GeM descriptor (width D).
    gem_p_init, gem_eps: GeM exponent initialisation and clamp.
    param_dtype: dtype of the parameters.
  """

  embedding_dim: int = 2048
  whiten: bool = True
  gem_p_init: float = 3.0
  gem_eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, D) [+ (B, H, W) validity mask] -> float32 (B, embedding_dim or D), unit norm."""
    x = l2_normalize(GeM(self.gem_p_init, self.gem_eps, name="gem")(features, mask))
    if not self.whiten:
      return x

    def identity_kernel(key, shape, dtype):
      del key
      return jnp.eye(*shape, dtype=dtype)

    x = nn.Dense(self.embedding_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                 kernel_init=identity_kernel, name="whitening")(x)
    return l2_normalize(x)
