"""Contrastive loss (Hadsell, Chopra, LeCun 2006) on cosine distance, as used in DML benchmarks.

With s_ij the dot-product similarity (the cosine for L2-normalised embeddings) and the cosine
distance d_ij = 1 - s_ij, every ordered pair (i, j), i != j, of the batch is a positive pair
(same label) or a negative pair (different labels), with per-pair losses

    positive: relu(d_ij - pos_margin)  = relu((1 - pos_margin) - s_ij),
    negative: relu(neg_margin - d_ij)  = relu(s_ij - (1 - neg_margin)).

The margins are distances: the default pos_margin = 0, neg_margin = 0.5 pulls positives to
similarity 1 and pushes negatives below similarity 0.5. This is pytorch-metric-learning's
`ContrastiveLoss(pos_margin=1 - pos_margin, neg_margin=1 - neg_margin,
distance=CosineSimilarity())`, whose margins are similarities.

Reduction (pytorch-metric-learning's `AvgNonZeroReducer`): the positive and the negative pair
losses are each averaged over the pairs whose loss is > 0 (a term with no such pair is 0), and the
two averages are added. Ordered pairs are used as in pytorch-metric-learning; since the loss is
symmetric this equals averaging over unordered pairs. Rows without a positive still contribute
their negative pairs. Unlike pytorch-metric-learning, a batch with at most one positive and at
most one negative ordered pair is not special-cased to zero.

Query/database form (`contrastive_database_loss`): the pairs are (query, database row) with the
batch as queries and the batch followed by a cross-batch memory as database (category-level
task).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recall_jax.losses import _common

DEFAULT_POS_MARGIN = 0.0
DEFAULT_NEG_MARGIN = 0.5


def _mean_of_nonzero(losses: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of the entries of `losses` where `mask` and the loss is > 0; 0 if there are none."""
  active = mask & (losses > 0)
  total = jnp.sum(jnp.where(active, losses, 0.0))
  return total / jnp.maximum(jnp.sum(active), 1).astype(losses.dtype)


def contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = DEFAULT_POS_MARGIN,
    neg_margin: float = DEFAULT_NEG_MARGIN,
) -> jax.Array:
  """The contrastive loss of a batch (formula and reduction in the module docstring).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product
      (the cosine when the model L2-normalises). float64 inputs (with x64 enabled) compute in
      float64, anything else in float32 at HIGHEST matmul precision.
    labels: (B,) integer class labels (array or array-like) in any order.
    pos_margin: cosine-distance margin below which a positive pair has no loss (>= 0).
    neg_margin: cosine-distance margin above which a negative pair has no loss
      (>= pos_margin).

  Returns:
    Scalar loss >= 0, dtype float32 (float64 for float64 inputs).

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings, non-integer labels, an empty
      batch, or non-finite / negative / inverted margins.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses import contrastive_loss
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> embeddings = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    >>> print(f"{contrastive_loss(embeddings, labels):.4f}")
    0.7533
    >>> value, grad = jax.jit(jax.value_and_grad(contrastive_loss))(embeddings, labels)
    >>> print(f"{value:.4f}", grad.shape)
    0.7533 (4, 2)
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  return _loss(embeddings, labels, embeddings, labels, None, pos_margin, neg_margin)


def contrastive_database_loss(
    queries: jax.Array,
    query_labels: jax.Array,
    database: jax.Array,
    database_labels: jax.Array,
    *,
    database_valid: jax.Array | None = None,
    pos_margin: float = DEFAULT_POS_MARGIN,
    neg_margin: float = DEFAULT_NEG_MARGIN,
) -> jax.Array:
  """The contrastive loss of query/database pairs (e.g. the batch against batch + memory).

  The pairs are (query q, valid database row j), j not q's own row; the reduction is the
  module docstring's. The database must start with the queries (its first B rows are the
  queries themselves); with the batch as the whole database this is `contrastive_loss`.

  Args:
    queries: (B, D) float query embeddings.
    query_labels: (B,) integer labels.
    database: (N, D) float database embeddings, N >= B, rows [0, B) being `queries`.
    database_labels: (N,) integer labels, the first B being `query_labels`.
    database_valid: (N,) bool, False on rows to ignore (a memory not yet full); None: all.
    pos_margin, neg_margin: as in `contrastive_loss`.

  Returns:
    Scalar loss >= 0, float32 (float64 for float64 inputs).

  Raises:
    ValueError: as `contrastive_loss`, and when the database does not start with the queries
      (where concrete), the dimensions differ, or the mask is not (N,) bool.
  """
  queries, query_labels, database, database_labels, database_valid = _common.check_database(
      queries, query_labels, database, database_labels, database_valid)
  return _loss(queries, query_labels, database, database_labels, database_valid, pos_margin,
               neg_margin)


def _loss(queries, query_labels, database, database_labels, database_valid, pos_margin,
          neg_margin) -> jax.Array:
  """The loss of checked arrays: queries (B, D) against a database (N, D) starting with them."""
  pos_margin = _common.finite_number("pos_margin", pos_margin)
  neg_margin = _common.finite_number("neg_margin", neg_margin)
  if pos_margin < 0:
    raise ValueError(f"pos_margin must be >= 0 (a distance), got {pos_margin}")
  if neg_margin < pos_margin:
    raise ValueError(
        f"neg_margin ({neg_margin}) must be >= pos_margin ({pos_margin})")
  sim, positive, negative = _common.database_pairs(queries, query_labels, database,
                                                   database_labels, database_valid)
  dtype = sim.dtype
  pos_losses = jax.nn.relu((1.0 - pos_margin) - sim)
  neg_losses = jax.nn.relu(sim - (1.0 - neg_margin))
  loss = _mean_of_nonzero(pos_losses, positive) + _mean_of_nonzero(neg_losses, negative)
  return loss.astype(dtype)
