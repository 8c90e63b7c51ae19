"""Retrieval losses. A loss is called as `loss(embeddings, labels, **kwargs) -> scalar`, or, with
learned parameters of its own (ProxyAnchor's proxies, normalized softmax's class weights), as
`loss(embeddings, labels, params, **kwargs)`.

Serves both tasks. RS@k and Smooth-AP take the batch layout (`samples_per_class`, or
`max_positives`) that fixes their static sizes; contrastive and multi-similarity need none. The
pair-based losses also come in a query/database form (`*_database_loss`: the batch against the
batch plus a cross-batch memory). Each loss's facts (config section, layout, SiMix, cold-start
check, parameters, database form) are its spec in `registry`.

Importing this package imports no JAX: the loss modules are imported on first use, when one of
the names below (or `get_loss(name)`) is first asked for.
"""

import importlib as _importlib
from collections.abc import Callable as _Callable

from recall_jax.losses.registry import LOSSES, LossSpec, loss_names, loss_spec

# Public name -> the module defining it, imported when the name is first looked up.
_LAZY = {
    "recall_at_k_loss": "recall_jax.losses.recall_at_k",
    "recall_at_k_loss_from_similarity": "recall_jax.losses.recall_at_k",
    "recall_at_k_surrogate": "recall_jax.losses.recall_at_k",
    "recall_at_k_surrogate_from_similarity": "recall_jax.losses.recall_at_k",
    "contrastive_loss": "recall_jax.losses.contrastive",
    "multi_similarity_loss": "recall_jax.losses.multi_similarity",
    "multi_similarity_pairs": "recall_jax.losses.multi_similarity",
    "smooth_ap_loss": "recall_jax.losses.smooth_ap",
    "recall_at_k_database_loss": "recall_jax.losses.recall_at_k",
    "smooth_ap_database_loss": "recall_jax.losses.smooth_ap",
    "contrastive_database_loss": "recall_jax.losses.contrastive",
    "multi_similarity_database_loss": "recall_jax.losses.multi_similarity",
    "proxy_anchor_loss": "recall_jax.losses.proxy_anchor",
    "init_proxies": "recall_jax.losses.proxy_anchor",
    "normalized_softmax_loss": "recall_jax.losses.normalized_softmax",
}
LOSS_NAMES = loss_names()

__all__ = ["LOSSES", "LOSS_NAMES", "LossSpec", "get_loss", "loss_names", "loss_spec", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(_importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


def get_loss(name: str) -> _Callable:
  """The loss function registered as `name` (e.g. `config.loss.name`).

  A loss is called as `loss(embeddings (B, D), labels (B,), **kwargs) -> scalar`; one with
  learned parameters (its spec's `parameters`) takes them third.

  Raises:
    ValueError: if `name` is not one of `LOSS_NAMES`.
  """
  return loss_spec(name).load()
