"""Backbones by name (`get_model`) and variable initialisation (`init_variables`)."""

from typing import Any
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from recall_jax import errors
from recall_jax.models import resnet
from recall_jax.models import small_cnn
from recall_jax.models import vit

# name -> (constructor, default keyword arguments). Keyword arguments of `get_model` override them.
_VIT = dict(dropout_rate=0.0)
_MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "vit_ti16": (vit.ViT, dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768)),
    "vit_s16": (vit.ViT, dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536)),
    "vit_b16": (vit.ViT, dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)),
    "vit_b32": (vit.ViT, dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072)),
    "vit_l16": (vit.ViT, dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096)),
    # For tests: the ViT code paths at a size that runs in milliseconds on a CPU.
    "vit_tiny_test": (vit.ViT, dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
                                    image_size=32, embedding_dim=16)),
    "resnet50": (resnet.ResNet, dict(stage_sizes=(3, 4, 6, 3), base_width=64)),
    "resnet101": (resnet.ResNet, dict(stage_sizes=(3, 4, 23, 3), base_width=64)),
    # Landmark retrieval (Radenovic et al.): GeM -> L2 -> 2048 x 2048 whitening FC -> L2.
    "resnet101_landmark": (resnet.ResNet, dict(stage_sizes=(3, 4, 23, 3), base_width=64,
                                               head="landmark", embedding_dim=2048)),
    # One bottleneck per stage and 8 stem channels: 256 output channels.
    "resnet_tiny_test": (resnet.ResNet, dict(stage_sizes=(1, 1, 1, 1), base_width=8,
                                             image_size=32, embedding_dim=16)),
    "resnet_tiny_landmark_test": (resnet.ResNet, dict(stage_sizes=(1, 1, 1, 1), base_width=8,
                                                      image_size=32, head="landmark",
                                                      embedding_dim=256)),
    "small_cnn": (small_cnn.SmallCNN, dict(channels=(32, 64, 128, 128), convs_per_block=1)),
    # The demo's: the final 2 x 2 map (at 28 px) flattened, so the layout of the strokes
    # survives pooling.
    "small_cnn_flat": (small_cnn.SmallCNN, dict(channels=(32, 64, 128, 128), convs_per_block=1,
                                                pooling="flatten")),
}


def available_models() -> list[str]:
  """The names `get_model` accepts."""
  return sorted(_MODELS)


def model_family(name: str) -> str:
  """'vit', 'resnet' or 'small_cnn': the checkpoint layout family of a registered model."""
  constructor, _ = _lookup(name)
  return {vit.ViT: "vit", resnet.ResNet: "resnet", small_cnn.SmallCNN: "small_cnn"}[constructor]


def _lookup(name: str):
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
  return _MODELS[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `available_models()`: 'vit_ti16', 'vit_s16', 'vit_b16', 'vit_b32', 'vit_l16',
      'resnet50', 'resnet101', 'resnet101_landmark' (landmark head), 'small_cnn' and the test
      sizes 'vit_tiny_test', 'resnet_tiny_test', 'resnet_tiny_landmark_test'.
    **kwargs: module attributes overriding the defaults, e.g. `embedding_dim=512`, `with_head=True`,
      `dtype=jnp.bfloat16` (compute), `param_dtype=jnp.float32`, `image_size=224`, for ResNets
      `head='landmark'` and `whiten`, for ViTs and ResNets `remat` ('none' | 'block', and 'dots' for
      ViTs), `scan` (False: unrolled per-layer blocks), for ViTs `dropout_rate`,
      `attention_implementation`, `attention_pad_to`, and for the small CNNs `ops` ('auto',
      'standard', 'cpu').

  Returns:
    A linen Module; `model.apply(variables, images, train=False, rngs=...)` maps uint8 or [0, 1]
    float images (B, H, W, 1 or 3) to float32 (B, embedding_dim) L2-normalised embeddings.
  """
  constructor, defaults = _lookup(name)
  config = {**defaults, **kwargs}
  if constructor is small_cnn.SmallCNN and config.get("remat") == "none":
    del config["remat"]  # Its few convolutions have nothing worth rematerialising.
  remats = vit.REMAT if constructor is vit.ViT else resnet.REMAT
  if config.get("remat", "none") not in remats:
    raise errors.ConfigError(f"remat must be one of {', '.join(remats)} for model {name!r}, got "
                             f"{config['remat']!r}")
  try:
    return constructor(**config)
  except TypeError as e:
    raise ValueError(f"bad keyword arguments for model {name!r}: {e}") from e


def init_variables(model: nn.Module, rng: jax.Array, image_size: int | tuple[int, int],
                   channels: int = 3) -> dict[str, Any]:
  """Initialises a model's variables with a (1, H, W, channels) dummy batch.

  Args:
    model: a module from `get_model`.
    rng: PRNG key for parameter initialisation.
    image_size: H = W, or (H, W). For ViTs it must equal `model.image_size`.
    channels: 1 or 3.

  Returns:
    {'params': ...} plus {'batch_stats': ...} for ResNets, as plain nested dicts.
  """
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  dummy = jnp.zeros((1, *image_size, channels), jnp.float32)
  params_rng, dropout_rng = jax.random.split(rng)
  init = jax.jit(lambda r, d: model.init({"params": r, "dropout": d}, dummy, train=False))
  if isinstance(rng, jax.core.Tracer):  # Called under jit / eval_shape: no separate compile.
    return flax.core.unfreeze(init(params_rng, dropout_rng))
  options = {}
  if jax.default_backend() == "cpu":
    # XLA:CPU spends most of an init's compile time optimising one threefry kernel per parameter
    # (about 1 s each); the init runs once, so an unoptimised build is 5-10x faster end to end.
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  variables = init.lower(params_rng, dropout_rng).compile(compiler_options=options)(
      params_rng, dropout_rng)
  return flax.core.unfreeze(variables)
