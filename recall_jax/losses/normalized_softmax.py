"""The normalized softmax loss (Zhai and Wu, BMVC 2019), a loss with learned parameters.

Category-level task. A classification loss on cosine logits: each class c has a learned weight
w_c, and with e_i and w_c L2-normalised and a temperature T,

    L = mean_i -log( exp(e_i . w_{y_i} / T) / sum_c exp(e_i . w_c / T) ).

This is pytorch-metric-learning's `NormalizedSoftmaxLoss` (no miner, no regulariser), whose
weights are the transpose (D, C) of the (C, D) weights here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recall_jax.losses import _common

DEFAULT_TEMPERATURE = 0.05


def normalized_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
) -> jax.Array:
  """The normalized softmax loss of a batch (formula in the module docstring).

  Args:
    embeddings: (B, D) float embeddings; L2-normalised here (all-zero rows stay zero).
    labels: (B,) integer class labels in [0, C).
    weights: (C, D) float learned class weights, L2-normalised here (initialise them with
      `proxy_anchor.init_proxies`: only their directions matter).
    temperature: T (> 0); the paper uses 0.05.

  Returns:
    Scalar loss >= 0, float32 (float64 when the embeddings or weights are float64). NaN when
    the labels are traced and one lies outside [0, C).

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings or weights, non-integer labels,
      an empty batch, a bad temperature, or concrete labels outside [0, C).

  Examples:
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses.normalized_softmax import normalized_softmax_loss
    >>> labels = jnp.array([0, 1, 2])
    >>> print(f"{normalized_softmax_loss(jnp.eye(3), labels, jnp.eye(3), temperature=0.5):.4f}")
    0.2395
  """
  temperature = _common.positive_number("temperature", temperature)
  labels, logits = _common.cosine_to_classes(embeddings, labels, weights, "weights")
  logits = logits / temperature  # (B, C)
  num_classes = weights.shape[0]
  own = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - own)
  return _common.nan_unless_labels_below(loss.astype(logits.dtype), labels, num_classes)
