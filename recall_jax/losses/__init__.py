"""Retrieval losses. Every loss is called as `loss(embeddings, labels, **kwargs) -> scalar`.

RS@k and Smooth-AP take the batch layout (`samples_per_class`, or `max_positives`) that fixes
their static sizes; contrastive and multi-similarity need none.
"""

from recall_jax.losses.recall_at_k import recall_at_k_loss
from recall_jax.losses.recall_at_k import recall_at_k_loss_from_similarity
from recall_jax.losses.recall_at_k import recall_at_k_surrogate
from recall_jax.losses.recall_at_k import recall_at_k_surrogate_from_similarity
from recall_jax.losses.contrastive import contrastive_loss
from recall_jax.losses.multi_similarity import multi_similarity_loss
from recall_jax.losses.multi_similarity import multi_similarity_pairs
from recall_jax.losses.smooth_ap import smooth_ap_loss

import importlib as _importlib
from collections.abc import Callable as _Callable

# name -> (module, function); modules are imported on first use.
_LOSSES = {
    "recall_at_k": ("recall_jax.losses.recall_at_k", "recall_at_k_loss"),
    "smooth_ap": ("recall_jax.losses.smooth_ap", "smooth_ap_loss"),
    "contrastive": ("recall_jax.losses.contrastive", "contrastive_loss"),
    "multi_similarity": ("recall_jax.losses.multi_similarity", "multi_similarity_loss"),
}
LOSS_NAMES = tuple(_LOSSES)


def get_loss(name: str) -> _Callable:
  """The loss function registered as `name` (e.g. `config.loss.name`).

  Every loss is called as `loss(embeddings (B, D), labels (B,), **kwargs) -> scalar`.

  Raises:
    ValueError: if `name` is not one of `LOSS_NAMES`.
  """
  if name not in _LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
  module, function = _LOSSES[name]
  return getattr(_importlib.import_module(module), function)
