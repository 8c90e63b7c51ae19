"""ResNet-50 (torchvision v1.5 layout) with frozen BatchNorm and the paper's GeM head.

torchvision's v1.5 bottleneck puts the stride in the 3x3 convolution. Module names mirror the
torchvision / timm state dict (`conv1`, `bn1`, `layer{1-4}_{j}/conv{1-3}`, `bn{1-3}`,
`downsample_conv`, `downsample_bn`), so `recall_jax.models.pretrained` maps them one to one. With
`scan` (the default), a stage's bottlenecks after the first (same shapes) run as one `nn.scan`
whose variables are stacked on a leading axis under `layer{s}` (bottleneck j at index j - 1);
bottleneck 0, which changes the shape, stays `layer{s}_0` (`recall_jax.models.layer_stack`).
Serves both tasks: category-level (embedding head) and instance-level (landmark head).

Padded images (aspect buckets, `recall_jax.data.aspect_buckets`) come with a (B, H, W) validity
mask: the trunk zeroes the padding before every convolution or pooling wider than 1x1, so the
padding acts as the zero border of an unpadded image, and GeM pools the real cells only. At
stride s the mask keeps ceil(h / s) rows, as many as the unpadded network computes, so the padded
descriptor equals the unpadded one up to rounding, for any real size.

BatchNorm is frozen, as in the paper: every forward pass (train or not) normalises with the
running statistics stored in the `batch_stats` collection, which is read and never written, so
`apply` never needs `mutable=...` and an image's output does not depend on the rest of the batch.
The affine scale and bias of each BatchNorm are ordinary trainable `params`.

Variables: `params` (convolutions, BN scale/bias, GeM `p`, head) and `batch_stats` (BN `mean` and
`var`, frozen). A trainer optimises `variables['params']` only and passes `batch_stats` through
unchanged.
"""

import functools
from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recall_jax.models import common

Dtype = Any
REMAT = ("none", "block")  # the `remat` settings

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenBatchNorm(nn.Module):
  """BatchNorm that always uses its running statistics: y = (x - mean) / sqrt(var + eps) * s + b.

  `mean` and `var` live in the `batch_stats` collection and are never updated; `scale` and `bias`
  are trainable `params`. The normalisation is computed in float32 and cast to `dtype`.
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., C) -> (..., C) in `dtype`."""
    features = x.shape[-1]
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    # Folding into one multiply-add keeps the op count (and memory traffic) of a plain affine map.
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.value.astype(jnp.float32) + self.epsilon)
    add = bias.astype(jnp.float32) - mean.value.astype(jnp.float32) * mul
    return (x.astype(jnp.float32) * mul + add).astype(self.dtype)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (4x planes), projection shortcut."""

  planes: int
  strides: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) [+ (B, H, W, 1) validity mask] -> (B, H / strides, W / strides, 4 planes)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=_conv_init)
    norm = functools.partial(FrozenBatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    s = self.strides
    y = nn.relu(norm(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
    if mask is not None:
      y = y * mask.astype(y.dtype)
    y = conv(self.planes, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(self.planes * 4, (1, 1), name="conv3")(y))
    shortcut = x
    if self.downsample:
      shortcut = conv(self.planes * 4, (1, 1), strides=(s, s), name="downsample_conv")(x)
      shortcut = norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class _ScannedBottleneck(Bottleneck):
  """A bottleneck returning the (carry, output) pair of `nn.scan`."""

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, None]:
    return super().__call__(x, mask), None


class ResNetTrunk(nn.Module):
  """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and four stages of bottlenecks."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  base_width: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # or 'block': each bottleneck recomputed in the backward pass
  scan: bool = True  # scan each stage's bottlenecks 1..n-1 (stacked variables)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """float32 (B, H, W, 3) standardised images -> (B, H/32, W/32, 32 base_width) in `dtype`.

    `mask` (B, H, W, 1), if given, is 1 on real pixels and 0 on padding.
    """
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
    block_cls, scanned_cls = Bottleneck, _ScannedBottleneck
    if self.remat == "block":
      block_cls = nn.remat(Bottleneck)
      # The scan loop already keeps XLA from merging the recomputation into the forward pass.
      scanned_cls = nn.remat(_ScannedBottleneck, prevent_cse=False)
    # The mask at stride s keeps the cells whose top-left input pixel is real.
    def masked(y, stride):
      return y if mask is None else y * mask[:, ::stride, ::stride].astype(y.dtype)

    x = masked(x, 1)
    x = nn.Conv(self.base_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_conv_init, name="conv1")(x.astype(self.dtype))
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(x))
    # After the ReLU a zeroed cell never wins the max, as the pool's -inf padding would not.
    x = nn.max_pool(masked(x, 2), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stride = 4
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self.base_width * 2**stage
      strides = 2 if stage > 0 else 1
      # A bottleneck masks its input-resolution map (after conv1).
      block_mask = None if mask is None else mask[:, ::stride, ::stride]
      x = block_cls(planes, strides, downsample=True, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"layer{stage + 1}_0")(x, block_mask)
      stride *= strides
      block_mask = None if mask is None else mask[:, ::stride, ::stride]
      if self.scan and num_blocks > 1:
        repeated = nn.scan(scanned_cls, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, in_axes=nn.broadcast,
                           length=num_blocks - 1)
        x, _ = repeated(planes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"layer{stage + 1}")(x, block_mask)
        continue
      for block in range(1, num_blocks):
        x = block_cls(planes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"layer{stage + 1}_{block}")(x, block_mask)
    return x


class ResNet(nn.Module):
  """ResNet embedding model: images -> feature map -> head.

  Heads: `head='embedding'` (the paper's GeM -> LayerNorm -> Linear -> L2-normalise) or
  `head='landmark'` (`common.LandmarkHead`: GeM -> L2 -> [whitening FC -> L2], for landmark
  retrieval; its output has `embedding_dim` entries with `whiten=True`, 32 base_width without).

  Attributes:
    stage_sizes: bottlenecks per stage ((3, 4, 6, 3) for ResNet-50).
    base_width: channels of the stem (64 for ResNet-50); features have 32 * base_width channels.
    image_size: nominal input size (used by `init_variables`); any size works at apply time.
    embedding_dim: output size of the head.
    with_head: if False, `__call__` returns global-average-pooled features (B, 32 base_width), the
      torchvision pooled features; the GeM `p` then does not exist.
    head: 'embedding' or 'landmark' (used when `with_head`).
    whiten: landmark head only: whether it ends with the whitening FC.
    gem_p_init, gem_eps: GeM exponent initialisation (3) and clamp (1e-6).
    dtype: compute dtype of the trunk (e.g. jnp.bfloat16 on GPU); pooling, head and outputs are
      float32.
    param_dtype: dtype of the parameters.
    remat: 'none' (default) or 'block': rematerialise each bottleneck in the backward pass
      (`nn.remat`): the same outputs and gradients, less activation memory, one more forward.
    scan: scan each stage's repeated bottlenecks with stacked variables (default); False unrolls
      them with per-layer names (`layer{s}_{j}`), the torchvision layout.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  base_width: int = 64
  image_size: int = 224
  embedding_dim: int = 512
  with_head: bool = True
  head: str = "embedding"
  whiten: bool = True
  gem_p_init: float = 3.0
  gem_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = True

  def setup(self):
    self.backbone = ResNetTrunk(tuple(self.stage_sizes), self.base_width, self.dtype,
                                self.param_dtype, self.remat, self.scan)
    if self.head not in ("embedding", "landmark"):
      raise ValueError(f"head must be 'embedding' or 'landmark', got {self.head!r}")
    if self.with_head and self.head == "embedding":
      self.gem = common.GeM(self.gem_p_init, self.gem_eps)
      self.embedding_head = common.EmbeddingHead(self.embedding_dim, self.param_dtype)
    elif self.with_head:
      self.landmark_head = common.LandmarkHead(self.embedding_dim, self.whiten, self.gem_p_init,
                                               self.gem_eps, self.param_dtype)

  def features(self, images: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) uint8 or [0, 1] float -> float32 (B, H/32, W/32, 32 base_width) feature map.

    `train` has no effect (BatchNorm is frozen; there is no dropout); it is accepted so every
    model has the same call signature. `mask` (B, H, W) marks the real pixels of padded images.
    """
    del train
    pixel_mask = None if mask is None else mask[..., None]
    return self.backbone(common.preprocess_images(images), pixel_mask).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    """Images [+ (B, H, W) bool validity mask] -> float32 unit-norm (B, embedding_dim) embeddings.

    Without a head: (B, 32 base_width) average-pooled features (of the real cells with a mask).
    """
    fmap = self.features(images, train, mask)
    cell_mask = None if mask is None else mask[:, ::32, ::32]
    if not self.with_head:
      if cell_mask is None:
        return jnp.mean(fmap, axis=(1, 2))
      weights = cell_mask.astype(jnp.float32)[..., None]
      return jnp.sum(fmap * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1)
    if self.head == "landmark":
      return self.landmark_head(fmap, cell_mask)
    return self.embedding_head(self.gem(fmap, cell_mask))
