"""Multi-scale test descriptors: describe an image at several scales and combine.

The image is described at scales (1, 1/sqrt(2), sqrt(2)) by default, and the unit descriptors
d_s are combined with a power mean and L2-normalised (Radenovic et al., TPAMI 2018):

  d = normalise(((1 / S) sum_s d_s^p)^(1 / p)),

with p the GeM exponent learned by a landmark head without whitening (its descriptors are
non-negative), and p = 1 (a plain mean) when a whitening FC follows GeM (`multiscale_power`).

The default scales are the set of the gl18 models (the TPAMI paper's is (1, 1/sqrt(2), 1/2)).
Each scaled size is rounded and downscaling is antialiased (bilinear `jax.image.resize`), where
the reference code (cirtorch) floors the size and does not antialias, so descriptors at scales
below 1 differ slightly from the reference's. Serves instance-level retrieval.

Padded images (aspect buckets) with a validity mask are rescaled so that their real part is
exactly the rescaled unpadded image: every image's real region is resized by its own factor
round(h s) / h (what resizing the unpadded image to round(h s) rows does), with the padding
divided out of the interpolation weights; the new mask covers the rescaled real region.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable, Sequence

import chex
import flax
import jax
import jax.numpy as jnp

DEFAULT_SCALES = (1.0, 2**-0.5, 2**0.5)

# (images (B, H, W, C) float32 in [0, 1], mask (B, H, W) bool or None) -> (B, D) unit descriptors.
DescribeFn = Callable[[jax.Array, jax.Array | None], jax.Array]


def _rounded(x):
  return jnp.floor(x + 0.5)


def rescale(images: jax.Array, mask: jax.Array | None,
            scale: float) -> tuple[jax.Array, jax.Array | None]:
  """Resizes a batch by `scale` (bilinear, antialiased as `jax.image.resize`).

  Args:
    images: (B, H, W, C) uint8 in [0, 255] or float in [0, 1].
    mask: None, or (B, H, W) bool marking each image's real region, a top-left rectangle.
    scale: factor > 0.

  Returns:
    float32 (B, round(H scale), round(W scale), C) images in [0, 1], and the rescaled mask (or
    None). With a mask, an image's real region of h x w becomes round(h scale) x
    round(w scale), equal to `jax.image.resize` of the unpadded image to that size.
  """
  chex.assert_rank(images, 4)
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(
      jnp.float32)
  b, height, width, channels = x.shape
  out_h, out_w = (max(1, math.floor(n * scale + 0.5)) for n in (height, width))
  if mask is None:
    return jax.image.resize(x, (b, out_h, out_w, channels), "linear"), None
  chex.assert_shape(mask, (b, height, width))
  weights = mask.astype(jnp.float32)
  real_h, real_w = jnp.sum(weights[:, :, 0], axis=1), jnp.sum(weights[:, 0, :], axis=1)
  new_h = jnp.maximum(_rounded(real_h * scale), 1.0)
  new_w = jnp.maximum(_rounded(real_w * scale), 1.0)

  def resize_one(image, image_weights, factors):
    # Interpolating image * mask and mask with the same kernel and dividing renormalises the
    # weights over the real pixels, as a resize of the unpadded image does at its border.
    resize = lambda a: jax.image.scale_and_translate(  # pylint: disable=g-long-lambda
        a, (out_h, out_w) + a.shape[2:], (0, 1), factors, jnp.zeros(2), "linear")
    return resize(image * image_weights[..., None]), resize(image_weights)

  factors = jnp.stack([new_h / jnp.maximum(real_h, 1.0), new_w / jnp.maximum(real_w, 1.0)], 1)
  numerator, denominator = jax.vmap(resize_one)(x, weights, factors)
  new_mask = ((jnp.arange(out_h)[None, :, None] < new_h[:, None, None])
              & (jnp.arange(out_w)[None, None, :] < new_w[:, None, None]))
  resized = numerator / jnp.maximum(denominator, 1e-12)[..., None]
  return jnp.where(new_mask[..., None], resized, 0.0), new_mask


def combine_scales(descriptors: jax.Array, power: float | jax.Array = 1.0) -> jax.Array:
  """Power mean over scales, then L2 normalisation.

  Args:
    descriptors: (S, B, D) unit descriptors at S scales; non-negative when power != 1.
    power: p of the power mean (1: arithmetic mean).

  Returns:
    float32 (B, D): normalise((mean_s d_s^p)^(1/p)).
  """
  chex.assert_rank(descriptors, 3)
  d = descriptors.astype(jnp.float32)
  p = jnp.asarray(power, jnp.float32).reshape(())
  # Non-negative GeM descriptors may hold exact zeros, whose power has no gradient: clamp them.
  powered = jnp.where(p == 1.0, d, jnp.maximum(d, 1e-12) ** p)
  mean = jnp.mean(powered, axis=0)
  combined = jnp.where(p == 1.0, mean, jnp.maximum(mean, 1e-30) ** (1.0 / p))
  return combined * jax.lax.rsqrt(jnp.maximum(jnp.sum(combined**2, -1, keepdims=True), 1e-24))


def multiscale_descriptors(describe: DescribeFn, images: jax.Array,
                           mask: jax.Array | None = None, *,
                           scales: Sequence[float] = DEFAULT_SCALES,
                           power: float | jax.Array = 1.0) -> jax.Array:
  """Describes a batch at several scales and combines the descriptors (`combine_scales`).

  Args:
    describe: (images float32 [0, 1] (B, H', W', C), mask (B, H', W') or None) -> (B, D) unit
      descriptors, e.g. `lambda x, m: model.apply(variables, x, mask=m)`.
    images: (B, H, W, C) uint8 or [0, 1] float.
    mask: optional (B, H, W) bool validity mask of padded images.
    scales: scale factors; 1 describes the images as given.
    power: power-mean exponent (`multiscale_power`).

  Returns:
    float32 (B, D) unit descriptors.
  """
  if not scales:
    raise ValueError("scales must not be empty")
  per_scale = [describe(*rescale(images, mask, s)) for s in scales]
  return combine_scales(jnp.stack(per_scale), power)


def multiscale_power(model: Any, variables: Any) -> float:
  """GeM's learned p for a landmark head without whitening; 1 for every other head.

  Args:
    model: a model from `recall_jax.models.get_model`.
    variables: its variables.
  """
  if getattr(model, "head", None) == "landmark" and not getattr(model, "whiten", True) and (
      getattr(model, "with_head", False)):
    params = flax.core.unfreeze(variables)["params"]
    return float(jnp.reshape(params["landmark_head"]["gem"]["p"], ()))
  return 1.0
