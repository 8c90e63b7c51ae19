"""A small CNN for 28-64 px images trained from scratch (the Omniglot demo).

Each of the blocks is `convs_per_block` x [3x3 conv -> GroupNorm -> ReLU] followed by a 2x2
max-pool; then global average pooling (or flattening) -> LayerNorm -> Linear(embedding_dim) ->
L2-normalise. Flattening keeps where in the image each feature fired; for characters, whose
identity is largely the layout of their strokes, that is worth the larger head (28 px: a 2 x 2 x
128 map, 512 features either way after the head).
GroupNorm (not BatchNorm) keeps every image's embedding independent of the rest of the batch,
which the exact mega-batch training relies on, and leaves no state besides `params`.

Serves both tasks.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recall_jax.models import common
from recall_jax.models import cpu_layers

Dtype = Any


OPS = ("auto", "standard", "cpu")


def resolve_ops(ops: str) -> str:
  """'auto' -> 'cpu' on the CPU backend, 'standard' elsewhere; other settings as given."""
  if ops not in OPS:
    raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
  if ops == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "standard"
  return ops


class FusedGroupNorm(nn.Module):
  """`nn.GroupNorm(num_groups, epsilon)` computed by `cpu_layers.group_norm`; same parameters."""

  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return cpu_layers.group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                 self.num_groups, self.epsilon).astype(self.dtype)


class SmallCNNTrunk(nn.Module):
  """Conv blocks on standardised images -> (B, h, w, channels[-1]) feature map.

  `ops`: 'standard' (flax's GroupNorm and max-pool), 'cpu' (`cpu_layers`' forms of the same
  functions, faster on XLA:CPU) or 'auto' (by backend).
  """

  channels: Sequence[int] = (32, 64, 128, 128)
  convs_per_block: int = 1
  num_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ops: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cpu_ops = resolve_ops(self.ops) == "cpu"
    x = x.astype(self.dtype)
    for i, c in enumerate(self.channels):
      for j in range(self.convs_per_block):
        x = nn.Conv(c, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"block{i}_conv{j}")(x)
        norm = FusedGroupNorm if cpu_ops else nn.GroupNorm
        x = norm(num_groups=min(self.num_groups, c), epsilon=1e-5, dtype=self.dtype,
                 param_dtype=self.param_dtype, name=f"block{i}_norm{j}")(x)
        x = nn.relu(x)
      # Ceil-mode pooling keeps at least one pixel, so 28 px inputs survive four blocks.
      if cpu_ops:
        x = cpu_layers.max_pool_2x2(x)
      else:
        pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, pad_h), (0, pad_w)))
    return x


class SmallCNN(nn.Module):
  """Small CNN embedding model.

  Attributes:
    channels: output channels of the blocks (one 2x max-pool per block).
    convs_per_block: 3x3 convolutions per block.
    num_groups: GroupNorm groups (capped at the channel count).
    pooling: 'avg' (global average pooling: any input size at apply time) or 'flatten' (the
      final map flattened: the input size must be the one the model was initialised with).
    image_size: nominal input size (used by `init_variables`).
    embedding_dim: output size of the head.
    with_head: if False, `__call__` returns the pooled features: (B, channels[-1]) averaged, or
      (B, h * w * channels[-1]) flattened.
    dtype: compute dtype of the convolutions; the head and outputs are float32.
    param_dtype: dtype of the parameters.
    ops: 'auto' (the default: 'cpu' on the CPU backend, 'standard' elsewhere), 'standard'
      (flax's GroupNorm and max-pool) or 'cpu' (`cpu_layers`: the same functions written as
      operations XLA:CPU runs faster). The parameters and the function are the
      same either way (up to float rounding), so checkpoints move freely between them.
  """

  channels: Sequence[int] = (32, 64, 128, 128)
  convs_per_block: int = 1
  num_groups: int = 8
  pooling: str = "avg"
  image_size: int = 28
  embedding_dim: int = 512
  with_head: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ops: str = "auto"

  def setup(self):
    if not self.channels or self.convs_per_block < 1:
      raise ValueError(f"need at least one block and one conv per block, got channels="
                       f"{self.channels}, convs_per_block={self.convs_per_block}")
    if self.pooling not in ("avg", "flatten"):
      raise ValueError(f"pooling must be 'avg' or 'flatten', got {self.pooling!r}")
    resolve_ops(self.ops)  # validates
    self.backbone = SmallCNNTrunk(tuple(self.channels), self.convs_per_block, self.num_groups,
                                  self.dtype, self.param_dtype, self.ops)
    if self.with_head:
      self.embedding_head = common.EmbeddingHead(self.embedding_dim, self.param_dtype)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, C) uint8 or [0, 1] float, C in {1, 3} -> float32 (B, h, w, channels[-1])."""
    del train  # No dropout or batch statistics.
    return self.backbone(common.preprocess_images(images)).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Images -> float32 (B, embedding_dim) unit-norm embeddings, or the pooled features."""
    features = self.features(images, train)
    if self.pooling == "avg":
      pooled = jnp.mean(features, axis=(1, 2))
    else:
      pooled = features.reshape(features.shape[0], -1)
    if not self.with_head:
      return pooled
    return self.embedding_head(pooled)
