"""Data-dependent initialisation of the embedding head (`common.EmbeddingHead`) for training from
scratch.

Serves the category-level task (metric learning, Recall@k).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _is_head_norm(module: nn.Module, method_name: str) -> bool:
  del method_name
  return module.name == "norm" and getattr(module.parent, "name", None) == "embedding_head"


def center_embedding_head(model: nn.Module, variables: dict[str, Any],
                          images: jax.Array) -> dict[str, Any]:
  """Centres the input of the head's projection on a batch: shifts the head LayerNorm's bias.

  A network trained from scratch maps every image close to one common direction, so RS@k ranks
  every positive around B/2, far beyond k, where the sigmoid on `k - rank` is flat: the gradient
  is zero and training never starts. Setting the bias of the head's LayerNorm to minus the batch
  mean of its output removes the common direction without making the model batch-dependent
  afterwards.

  Args:
    model: a model with the paper's head (`embedding_head/norm` is its LayerNorm).
    variables: the model's variables; not modified.
    images: (N, H, W, C) a batch of training images.

  Returns:
    New variables with `params/embedding_head/norm/bias` shifted.
  """
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=_is_head_norm))
  _, captured = apply(variables, images)
  (normed,) = captured["intermediates"]["embedding_head"]["norm"]["__call__"]
  head = dict(variables["params"]["embedding_head"])
  head["norm"] = {**head["norm"], "bias": head["norm"]["bias"] - jnp.mean(normed, axis=0)}
  return {**variables, "params": {**variables["params"], "embedding_head": head}}
