"""Vision Transformer (Dosovitskiy et al., 2021) with the Recall@k paper's embedding head.

Pre-LN encoder blocks (LayerNorm eps 1e-6, exact-erf GELU MLP as in timm), a class token and a
learned position embedding. The parameter tree of `ViT.backbone` mirrors the AugReg / vit_jax
`.npz` checkpoints (`embedding`, `cls`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1
/query`, ...), with the blocks stacked on a leading layer axis under `nn.scan`
(`Transformer/encoderblock/...`, as big_vision's scanned ViTs); see `recall_jax.models.pretrained`.
Serves both tasks (category-level retrieval; instance-level where a ViT is chosen).

Attention goes through `jax.nn.dot_product_attention`. `attention_implementation=None` or `'xla'`
works everywhere. cuDNN flash attention (`'cudnn'`, GPU only, bf16/fp16) rejects the 197 tokens of
a 224 px ViT-*/16, so with `'cudnn'` set `attention_pad_to` (e.g. 200 or 256): the token sequence is
zero-padded once after the position embedding and the padded keys are masked out through
`key_value_seq_lengths`; padded tokens are dropped before the final norm. The output does not
depend on the padding (tested with the XLA implementation).

Variables: only `params` (plus the 'dropout' rng when `dropout_rate > 0` and `train=True`).
"""

import functools
from typing import Any, Literal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from recall_jax.models import common

Dtype = Any
AttentionImplementation = Literal["xla", "cudnn"] | None
# The `remat` settings -> the `jax.checkpoint` policy of each encoder block. 'dots' keeps the
# blocks' weight matmul outputs (no batch dimensions: not attention's) and recomputes the rest.
REMAT_POLICIES = {"none": None, "block": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT = tuple(REMAT_POLICIES)

# Exact GELU, as timm and PyTorch's nn.GELU; flax's default is the tanh approximation.
_gelu = functools.partial(nn.gelu, approximate=False)


class AddPositionEmbedding(nn.Module):
  """Adds a learned (1, T, D) position embedding, T = 1 + number of patches."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D) in x's dtype."""
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], self.param_dtype)
    return x + pos.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(D) -> dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, name="Dense_0")(x)
    y = _gelu(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = dense(x.shape[-1], name="Dense_1")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class MultiHeadAttention(nn.Module):
  """Self-attention with separate query/key/value/out projections (the AugReg layout).

  Attributes:
    num_heads: number of heads; the width must be divisible by it.
    implementation: passed to `jax.nn.dot_product_attention` (None/'xla' or 'cudnn').
  """

  num_heads: int
  implementation: AttentionImplementation = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv_lengths: jax.Array | None) -> jax.Array:
    """(B, T, D) -> (B, T, D). kv_lengths: int32 (B,) number of real (unpadded) tokens, or None."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    proj = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), axis=-1,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.xavier_uniform())
    q = proj(name="query")(x)  # (B, T, heads, head_dim)
    k = proj(name="key")(x)
    v = proj(name="value")(x)
    y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                     implementation=self.implementation)
    return nn.DenseGeneral(features=width, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_implementation: AttentionImplementation = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv_lengths: jax.Array | None, train: bool
               ) -> tuple[jax.Array, None]:
    """(B, T, D) -> ((B, T, D), None): the (carry, output) pair of `nn.scan`."""
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    y = norm(name="LayerNorm_0")(x)
    y = MultiHeadAttention(self.num_heads, self.attention_implementation, self.dtype,
                           self.param_dtype, name="MultiHeadDotProductAttention_1")(y, kv_lengths)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + y
    y = norm(name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                 name="MlpBlock_3")(y, train)
    return x + y, None


class Encoder(nn.Module):
  """Position embedding, `depth` encoder blocks and the final LayerNorm (eps 1e-6).

  With `scan` (the default) the blocks are one `nn.scan` over a module whose parameters are
  stacked on a leading layer axis (`encoderblock/...`, shape (depth, ...)); without it they are
  unrolled as `encoderblock_{i}` (the per-layer layout of the checkpoints). Both compute the same
  function; the scanned one compiles one block instead of `depth`, and only under a loop does
  XLA's buffer assignment free a rematerialised block's activations.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_implementation: AttentionImplementation = None
  attention_pad_to: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, T, D) tokens -> (B, T, D) normalised tokens, in float32."""
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
    block = EncoderBlock
    if self.remat != "none":
      # Rematerialised blocks keep only their inputs (and with 'dots' their weight matmuls) for
      # the backward pass and recompute the rest: activation memory of one block instead of all
      # of them, for one more forward. `train` is argument 3 counting the module. Under scan the
      # loop already keeps XLA from merging the recomputation into the forward pass.
      block = nn.remat(block, static_argnums=(3,), prevent_cse=not self.scan,
                       policy=REMAT_POLICIES[self.remat])
    x = AddPositionEmbedding(self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    batch, num_tokens, _ = x.shape
    kv_lengths = None
    if self.attention_pad_to is not None:
      if self.attention_pad_to < num_tokens:
        raise ValueError(f"attention_pad_to={self.attention_pad_to} is smaller than the "
                         f"{num_tokens} tokens")
      x = jnp.pad(x, ((0, 0), (0, self.attention_pad_to - num_tokens), (0, 0)))
      kv_lengths = jnp.full((batch,), num_tokens, jnp.int32)
    config = (self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_implementation,
              self.dtype, self.param_dtype)
    if self.scan:
      block = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      x, _ = block(*config, name="encoderblock")(x, kv_lengths, train)
    else:
      for i in range(self.depth):
        x, _ = block(*config, name=f"encoderblock_{i}")(x, kv_lengths, train)
    x = x[:, :num_tokens]
    return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT trunk on preprocessed images: patch embedding, class token, encoder.

  Its parameter names follow the AugReg `.npz` checkpoints.
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_implementation: AttentionImplementation = None
  attention_pad_to: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """float32 (B, H, W, 3) standardised images -> float32 (B, 1 + HW/patch^2, width) tokens."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(x.astype(self.dtype))
    batch, h, w, c = x.shape
    x = jnp.reshape(x, (batch, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, c)), x], axis=1)
    return Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout_rate,
                   self.attention_implementation, self.attention_pad_to, self.dtype,
                   self.param_dtype, self.remat, self.scan, name="Transformer")(x, train)


class ViT(nn.Module):
  """ViT embedding model: images -> class token -> [LayerNorm -> Linear -> L2-normalise].

  Attributes:
    patch_size, width, depth, num_heads, mlp_dim: the architecture (e.g. B/16: 16, 768, 12, 12,
      3072).
    image_size: input height = width in pixels; must be divisible by `patch_size`. The position
      embedding has 1 + (image_size / patch_size)^2 entries; `load_pretrained` resamples a
      checkpoint's to it.
    embedding_dim: output size of the head.
    with_head: if False, `__call__` returns the class token after the encoder norm.
    dropout_rate: dropout after the position embedding, the attention and in the MLPs (train=True
      only; needs the 'dropout' rng).
    attention_implementation, attention_pad_to: see the module docstring.
    dtype: compute dtype of the trunk (e.g. jnp.bfloat16 on GPU); norms, head and outputs are
      float32.
    param_dtype: dtype of the parameters.
    remat: 'none' (default), 'block' or 'dots': rematerialise each encoder block in the backward
      pass (`nn.remat`), keeping only the blocks' inputs ('block') or also their weight matmul
      outputs ('dots'); the same outputs and gradients for about one more forward pass.
    scan: run the encoder blocks as one `nn.scan` with parameters stacked on a leading layer axis
      (default); False unrolls them with per-layer parameters (`encoderblock_{i}`), which compiles
      `depth` times the code (`recall_jax.models.layer_stack` converts between the layouts).
  """

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  embedding_dim: int = 512
  with_head: bool = True
  dropout_rate: float = 0.0
  attention_implementation: AttentionImplementation = None
  attention_pad_to: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = True

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                       f"{self.patch_size}")
    self.backbone = VisionTransformer(
        self.patch_size, self.width, self.depth, self.num_heads, self.mlp_dim,
        self.dropout_rate, self.attention_implementation, self.attention_pad_to, self.dtype,
        self.param_dtype, self.remat, self.scan)
    if self.with_head:
      self.embedding_head = common.EmbeddingHead(self.embedding_dim, self.param_dtype)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, image_size, image_size, C) uint8 or [0, 1] float -> float32 (B, T, width) tokens.

    Token 0 is the class token; all tokens are after the encoder's final LayerNorm (timm's
    `forward_features`).
    """
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"expected images of shape (B, {self.image_size}, {self.image_size}, C) "
                       f"(set image_size to change it), got {images.shape}")
    return self.backbone(common.preprocess_images(images), train)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Images -> float32 (B, embedding_dim) unit-norm embeddings, or (B, width) if no head."""
    tokens = self.features(images, train)
    chex.assert_rank(tokens, 3)
    cls = tokens[:, 0]
    if not self.with_head:
      return cls
    return self.embedding_head(cls)
