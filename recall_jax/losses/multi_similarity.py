"""Multi-similarity loss with its pair mining (Wang, Han, Huang, Dong, Scott, CVPR 2019).

Follows pytorch-metric-learning's `MultiSimilarityMiner(epsilon)` followed by
`MultiSimilarityLoss(alpha, beta, base)`, with the dot product of the embeddings as given in place
of their `CosineSimilarity` (identical for L2-normalised embeddings).

Mining, for each anchor i with positives P_i (same label, j != i) and negatives N_i:

    hard positives: p in P_i with s_ip - epsilon < max_{n in N_i} s_in,
    hard negatives: n in N_i with s_in + epsilon > min_{p in P_i} s_ip.

An anchor without negatives mines no positive and one without positives mines no negative. If the
batch has no positive pair or no negative pair at all, nothing is mined and the loss is 0. Mining
is a selection: no gradient flows through it.

Loss, for each anchor i with mined sets P~_i and N~_i (an empty sum contributes log 1 = 0):

    L_i = 1/alpha * log(1 + sum_{p in P~_i} exp(-alpha (s_ip - base)))
        + 1/beta  * log(1 + sum_{n in N~_i} exp( beta (s_in - base))),

and the loss is the mean of L_i over all B anchors (pytorch-metric-learning's `MeanReducer`),
anchors with nothing mined counting as 0.

Differences from the authors' code (MalongTech/research-ms-loss), kept to match
pytorch-metric-learning: the authors skip an anchor unless both its mined sets are non-empty, and
pick positives as same-label similarities below 1 - 1e-5 rather than by row index. Unlike
pytorch-metric-learning, a batch that mines at most one positive and at most one negative pair is
not special-cased to zero.

Query/database form (`multi_similarity_database_loss`): the batch's rows are the anchors and
their candidates are the batch followed by a cross-batch memory (category-level task).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses import _common

DEFAULT_ALPHA = 2.0
DEFAULT_BETA = 50.0
DEFAULT_BASE = 0.5
DEFAULT_EPSILON = 0.1


def multi_similarity_pairs(
    similarities: jax.Array, labels: jax.Array, *, epsilon: float = DEFAULT_EPSILON
) -> tuple[jax.Array, jax.Array]:
  """The multi-similarity miner's hard pairs.

  Args:
    similarities: (B, B) float similarities of anchors (rows) to the batch (columns).
    labels: (B,) integer labels.
    epsilon: mining margin (>= 0).

  Returns:
    pos_mask, neg_mask: (B, B) bool, True where (anchor, column) is a mined positive /
    negative pair.
  """
  num_rows = labels.shape[0]
  chex.assert_shape(similarities, (num_rows, num_rows))
  return _mine(similarities, *_common.pair_masks(labels, labels, None), epsilon=epsilon)


def _mine(similarities: jax.Array, positive: jax.Array, negative: jax.Array, *,
          epsilon: float) -> tuple[jax.Array, jax.Array]:
  """The hard pairs among (B, N) `positive` / `negative` pairs of queries and a database."""
  chex.assert_equal_shape([similarities, positive, negative])
  sim = jax.lax.stop_gradient(similarities)
  hardest_pos = jnp.min(jnp.where(positive, sim, jnp.inf), axis=1, keepdims=True)
  hardest_neg = jnp.max(jnp.where(negative, sim, -jnp.inf), axis=1, keepdims=True)
  pos_mask = positive & (sim - epsilon < hardest_neg)
  neg_mask = negative & (sim + epsilon > hardest_pos)
  anything = jnp.any(positive) & jnp.any(negative)
  return pos_mask & anything, neg_mask & anything


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    base: float = DEFAULT_BASE,
    epsilon: float = DEFAULT_EPSILON,
) -> jax.Array:
  """The multi-similarity loss of a batch, with mining (formulas in the module docstring).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product.
      float64 inputs (with x64 enabled) compute in float64, anything else in float32 at
      HIGHEST matmul precision.
    labels: (B,) integer class labels (array or array-like) in any order.
    alpha: positive-pair scale (> 0).
    beta: negative-pair scale (> 0).
    base: similarity offset (finite).
    epsilon: mining margin (>= 0).

  Returns:
    Scalar loss >= 0, dtype float32 (float64 for float64 inputs).

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings, non-integer labels, an empty
      batch, or bad hyper-parameters.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses import multi_similarity_loss
    >>> labels = jnp.array([0, 0, 1, 1])
    >>> embeddings = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    >>> print(f"{multi_similarity_loss(embeddings, labels):.4f}")
    0.6791
    >>> value, grad = jax.jit(jax.value_and_grad(multi_similarity_loss))(embeddings, labels)
    >>> grad.shape
    (4, 2)
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  return _loss(embeddings, labels, embeddings, labels, None, alpha=alpha, beta=beta, base=base,
               epsilon=epsilon)


def multi_similarity_database_loss(
    queries: jax.Array,
    query_labels: jax.Array,
    database: jax.Array,
    database_labels: jax.Array,
    *,
    database_valid: jax.Array | None = None,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    base: float = DEFAULT_BASE,
    epsilon: float = DEFAULT_EPSILON,
) -> jax.Array:
  """The multi-similarity loss of query anchors against a database (e.g. batch + memory).

  Mining and loss are the module docstring's with the valid database rows (other than the
  anchor's own) as each anchor's candidates; the mean runs over the B queries. The database
  must start with the queries (its first B rows are the queries themselves); with the batch as
  the whole database this is `multi_similarity_loss`.

  Args:
    queries: (B, D) float query embeddings.
    query_labels: (B,) integer labels.
    database: (N, D) float database embeddings, N >= B, rows [0, B) being `queries`.
    database_labels: (N,) integer labels, the first B being `query_labels`.
    database_valid: (N,) bool, False on rows to ignore (a memory not yet full); None: all.
    alpha, beta, base, epsilon: as in `multi_similarity_loss`.

  Returns:
    Scalar loss >= 0, float32 (float64 for float64 inputs).

  Raises:
    ValueError: as `multi_similarity_loss`, and when the database does not start with the
      queries (where concrete), the dimensions differ, or the mask is not (N,) bool.
  """
  queries, query_labels, database, database_labels, database_valid = _common.check_database(
      queries, query_labels, database, database_labels, database_valid)
  return _loss(queries, query_labels, database, database_labels, database_valid, alpha=alpha,
               beta=beta, base=base, epsilon=epsilon)


def _loss(queries, query_labels, database, database_labels, database_valid, *, alpha, beta,
          base, epsilon) -> jax.Array:
  """The loss of checked arrays: queries (B, D) against a database (N, D) starting with them."""
  alpha = _common.positive_number("alpha", alpha)
  beta = _common.positive_number("beta", beta)
  base = _common.finite_number("base", base)
  epsilon = _common.finite_number("epsilon", epsilon)
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon}")
  sim, positive, negative = _common.database_pairs(queries, query_labels, database,
                                                   database_labels, database_valid)
  dtype = sim.dtype
  pos_mask, neg_mask = _mine(sim, positive, negative, epsilon=epsilon)
  pos_loss = _common.log1p_sum_exp(-alpha * (sim - base), pos_mask) / alpha
  neg_loss = _common.log1p_sum_exp(beta * (sim - base), neg_mask) / beta
  chex.assert_shape([pos_loss, neg_loss], (query_labels.shape[0],))
  return jnp.mean(pos_loss + neg_loss).astype(dtype)
