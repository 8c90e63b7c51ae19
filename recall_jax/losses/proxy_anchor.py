"""The Proxy-Anchor loss (Kim, Kim, Cho, Kwak, CVPR 2020), a loss with learned parameters.

Category-level task. Each class c has a learned proxy p_c; with s_ic the cosine similarity of
embedding i and proxy c (both L2-normalised here, as the paper and pytorch-metric-learning do),
X_c^+ the batch rows of class c and P^+ the proxies with at least one row in the batch,

    L = 1/|P^+| sum_{c in P^+} log(1 + sum_{i in X_c^+} exp(-alpha (s_ic - margin)))
      + 1/C     sum_{c}        log(1 + sum_{i not in X_c^+} exp(alpha (s_ic + margin))).

Every proxy is an anchor of the negative term, so every class's proxy receives a gradient each
step; this is pytorch-metric-learning's `ProxyAnchorLoss` (no miner, no regulariser) and the
authors' code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from recall_jax.losses import _common

DEFAULT_MARGIN = 0.1
DEFAULT_ALPHA = 32.0


def init_proxies(key: jax.Array, num_classes: int, dim: int,
                 dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Proxies initialised as the authors' code does: Kaiming normal, fan-out mode.

  `torch.nn.init.kaiming_normal_(proxies, mode='fan_out')` on a (C, D) tensor draws from
  N(0, 2 / C) (fan-out is the first axis in torch's convention). Only the directions matter to
  the loss, which normalises the proxies; the scale sets how fast the optimiser turns them.

  Args:
    key: PRNG key.
    num_classes: C, one proxy per class (>= 1).
    dim: D, the embedding size (>= 1).
    dtype: float dtype of the result.

  Returns:
    (C, D) proxies of `dtype`.
  """
  num_classes = _common.positive_int("num_classes", num_classes)
  dim = _common.positive_int("dim", dim)
  std = math.sqrt(2.0 / num_classes)
  return (std * jax.random.normal(key, (num_classes, dim), jnp.float32)).astype(dtype)


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    margin: float = DEFAULT_MARGIN,
    alpha: float = DEFAULT_ALPHA,
) -> jax.Array:
  """The Proxy-Anchor loss of a batch (formula in the module docstring).

  Args:
    embeddings: (B, D) float embeddings; L2-normalised here (all-zero rows stay zero).
    labels: (B,) integer class labels in [0, C).
    proxies: (C, D) float learned proxies, one per class; L2-normalised here. The gradient
      with respect to them is what trains them (`init_proxies` gives their initial value).
    margin: the similarity margin delta (finite).
    alpha: the scale (> 0).

  Returns:
    Scalar loss >= 0, float32 (float64 when the embeddings or proxies are float64). NaN when
    the labels are traced and one lies outside [0, C).

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings or proxies, non-integer labels,
      an empty batch, a bad margin or alpha, or concrete labels outside [0, C).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses.proxy_anchor import init_proxies, proxy_anchor_loss
    >>> labels = jnp.array([0, 0, 1, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1
    >>> proxies = jnp.eye(3)
    >>> print(f"{proxy_anchor_loss(embeddings, labels, proxies):.4f}")
    7.0497
    >>> grads = jax.grad(proxy_anchor_loss, argnums=(0, 2))(embeddings, labels, proxies)
    >>> [g.shape for g in grads]
    [(4, 3), (3, 3)]
  """
  margin = _common.finite_number("margin", margin)
  alpha = _common.positive_number("alpha", alpha)
  labels, cos = _common.cosine_to_classes(embeddings, labels, proxies, "proxies")
  num_classes = proxies.shape[0]
  is_own = labels[:, None] == jnp.arange(num_classes)[None, :]
  pos_term = _common.log1p_sum_exp(alpha * (margin - cos), is_own, axis=0)  # (C,)
  neg_term = _common.log1p_sum_exp(alpha * (cos + margin), ~is_own, axis=0)  # (C,)
  num_with_positives = jnp.maximum(jnp.sum(jnp.any(is_own, axis=0)), 1).astype(cos.dtype)
  loss = jnp.sum(pos_term) / num_with_positives + jnp.mean(neg_term)
  return _common.nan_unless_labels_below(loss.astype(cos.dtype), labels, num_classes)
