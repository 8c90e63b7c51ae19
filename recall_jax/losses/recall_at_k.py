"""The Recall@k surrogate loss (RS@k) of Patel, Tolias and Matas (CVPR 2022).

Every row of the batch is a query; every other row is the database. For query q with positives
P_q (same label, excluding q) the rank of positive p is relaxed with a sigmoid of temperature
`tau2` on similarity differences,

    r_qp = 1 + sum_{j != p} sigmoid((s_qj - s_qp) / tau2),

and recall at k is relaxed with a sigmoid of temperature `tau1` on `k - r_qp`,

    R_qk = min(sum_{p in P_q} sigmoid((k - r_qp) / tau1), k) / min(k, |P_q|).

The loss is the mean over queries with at least one positive of `1 - mean_k R_qk`. Queries
without a positive in the batch carry no recall signal and are left out of the mean.

Rank convention (`count_query_in_rank`):
  * True (default, what the official code does and what produced the paper's numbers): the sum
    over j includes j = q. The query's self-similarity is the largest in its row, so every
    positive's rank grows by about one.
  * False: j = q is excluded, which is the rank as the paper's text defines it.

Both sigmoid arguments are clipped to [-50, 50] before the sigmoid, as in the official code.

Query/database form (`recall_at_k_database_loss`): the batch's rows are the queries and the
database is the batch followed by more rows, e.g. a cross-batch memory of earlier embeddings
(category-level task); positives and ranks then run over the valid database rows.

Cost: O(B * P * B) time, where P is the number of positive slots per query, never O(B^3) when
the caller gives the batch layout: each query gathers its positives into P static slots
(`samples_per_class - 1`, or `max_positives`). Queries are processed in blocks of `query_block`
rows whose intermediates are rematerialised in the backward pass, so memory is
O(query_block * P * B); without a `query_block` the loss picks the largest block whose
temporaries fit `memory_budget_bytes`.

The same call means the same inside and outside `jit`: static sizes come from shapes and
arguments, never from label values. Checks that need label values (a query with more positives
than slots, a batch without any positive pair) raise ValueError where labels are concrete; with
traced labels the loss is NaN instead, so a training loop's non-finite check stops.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses import _common
from recall_jax.numerics import compute_dtype
from recall_jax.numerics import similarity

DEFAULT_K_VALUES = (1, 2, 4, 8, 16)
DEFAULT_MEMORY_BUDGET_BYTES = _common.DEFAULT_MEMORY_BUDGET_BYTES


def _per_query_loss(
    sim_rows: jax.Array,
    query_idx: jax.Array,
    pos_idx: jax.Array,
    pos_valid: jax.Array,
    num_positives: jax.Array,
    k_values: tuple[int, ...],
    tau1: float,
    tau2: float,
    count_query_in_rank: bool,
    column_valid: jax.Array | None,
) -> jax.Array:
  """`1 - mean_k R_qk` for a block of queries.

  Args:
    sim_rows: (Q, N) similarities of the block's queries to every row.
    query_idx: (Q,) row index of each query (its own column in `sim_rows`).
    pos_idx, pos_valid: (Q, P) positive slots of each query.
    num_positives: (Q,) |P_q|.
    column_valid: (N,) bool, the rows that count in ranks (None: all).

  Returns:
    (Q,) per-query loss (meaningless where num_positives == 0; the caller masks it).
  """
  q, n = sim_rows.shape
  chex.assert_shape([pos_idx, pos_valid], (q, None))
  s_pos = jnp.take_along_axis(sim_rows, pos_idx, axis=1)  # (Q, P)
  terms = _common.clipped_sigmoid((sim_rows[:, None, :] - s_pos[:, :, None]) / tau2)  # (Q, P, N)
  column = jnp.arange(n)[None, None, :]
  keep = column != pos_idx[:, :, None]
  if not count_query_in_rank:
    keep &= column != query_idx[:, None, None]
  if column_valid is not None:
    keep &= column_valid[None, None, :]
  rank = 1.0 + jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)  # (Q, P)

  # All k at once on a leading (K,) axis: one set of kernels instead of one per k (compile time).
  k = jnp.asarray(k_values, jnp.int32)[:, None]  # (K, 1)
  k_real = k.astype(rank.dtype)[:, :, None]  # (K, 1, 1)
  hits = jnp.sum(jnp.where(pos_valid, _common.clipped_sigmoid((k_real - rank) / tau1), 0.0),
                 axis=-1)  # (K, Q)
  denom = jnp.maximum(jnp.minimum(k, num_positives), 1).astype(rank.dtype)  # (K, Q)
  return 1.0 - jnp.mean(jnp.minimum(hits, k_real[:, :, 0]) / denom, axis=0)


@functools.partial(
    jax.jit,
    static_argnames=("num_queries", "from_similarity", "k_values", "tau1", "tau2",
                     "count_query_in_rank", "slots", "query_block"))
def _loss(
    x: jax.Array,
    database: jax.Array | None,
    labels: jax.Array,
    valid: jax.Array | None,
    *,
    num_queries: int,
    from_similarity: bool,
    k_values: tuple[int, ...],
    tau1: float,
    tau2: float,
    count_query_in_rank: bool,
    slots: int,
    query_block: int | None,
) -> jax.Array:
  """RS@k of queries x (B, D) against a database (N, D) whose first B rows are the queries, or
  of a similarity matrix x (B, N) when from_similarity; labels and valid are the database's."""
  dtype = x.dtype
  if from_similarity:
    row_fn = lambda idx: x[idx]
  else:
    row_fn = lambda idx: similarity(x[idx], database)
  pos_idx, pos_valid, num_positives = (
      a[:num_queries] for a in _common.positive_indices(labels, slots, valid))

  def block_loss(query_idx):
    loss = _per_query_loss(
        row_fn(query_idx), query_idx, pos_idx[query_idx], pos_valid[query_idx],
        num_positives[query_idx], k_values, tau1, tau2, count_query_in_rank, valid)
    return loss.astype(dtype)

  per_query = _common.map_query_blocks(block_loss, num_queries, query_block)
  return _common.mean_over_queries(per_query, num_positives, slots)


def _prepare(x, labels, *, k_values, tau1, tau2, samples_per_class, max_positives, query_block,
             memory_budget_bytes, num_queries=None, valid=None) -> dict:
  """Validated static arguments of `_loss` (x and labels already shape-checked); `labels` and
  `valid` are the database's, whose first `num_queries` rows are the queries (None: all)."""
  num_rows = labels.shape[0]
  k_values = _common.check_k_values(k_values, num_rows, DEFAULT_K_VALUES)
  tau1 = _common.positive_number("tau1", tau1)
  tau2 = _common.positive_number("tau2", tau2)
  query_block = _common.check_query_block(query_block)
  slots = _common.positive_slots(labels, samples_per_class=samples_per_class,
                                 max_positives=max_positives, num_queries=num_queries,
                                 valid=valid)
  num_queries = num_rows if num_queries is None else num_queries
  query_block = _common.query_block_for(num_queries, slots, jnp.dtype(compute_dtype(x)).itemsize,
                                        memory_budget_bytes, query_block, num_columns=num_rows)
  return dict(k_values=k_values, tau1=tau1, tau2=tau2, slots=slots, query_block=query_block,
              num_queries=num_queries)


def recall_at_k_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    k_values: Sequence[int] | None = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    count_query_in_rank: bool = True,
    samples_per_class: int | None = None,
    max_positives: int | None = None,
    query_block: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """The RS@k loss of a batch of embeddings (formula in the module docstring).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product
      (the model L2-normalises; SiMix rows are deliberately not renormalised). float64 inputs
      (with x64 enabled) compute in float64, anything else in float32 at HIGHEST precision.
    labels: (B,) integer class labels (array or array-like) in any order; classes need not be
      contiguous or of equal size.
    k_values: the k of Recall@k to average over, positive integers below B - 1 (Recall@k of a
      query is 1 for any ranking once k reaches its B - 1 database rows). None: the default
      (1, 2, 4, 8, 16).
    tau1: temperature (finite, > 0) of the sigmoid on `k - rank`.
    tau2: temperature (finite, > 0) of the sigmoid on similarity differences.
    count_query_in_rank: whether the query's own row counts in the rank of its positives
      (True: official code and published numbers; False: the paper's text).
    samples_per_class: the batch layout, m: no class has more than m rows (for a SiMix batch,
      count the virtual rows: `simix.samples_per_class_after_simix(m)`). Gives each query
      m - 1 positive slots.
    max_positives: the static number of positive slots per query, instead of
      `samples_per_class`. With neither, labels that are concrete give the largest class minus
      one and traced labels B - 1 slots (the same value at far more work, with a warning).
    query_block: process queries in blocks of this many rows, rematerialising each block in the
      backward pass: memory O(query_block * P * B). None: the largest block whose temporaries
      fit `memory_budget_bytes` (one block for small batches).
    memory_budget_bytes: budget for the loss's temporaries when `query_block` is None.

  Returns:
    Scalar loss in [0, 1], dtype float32 (float64 for float64 inputs). Queries with no positive
    in the batch are left out of the mean. NaN when the labels are traced and some query has
    more positives than its slots, or no query has a positive.

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings, non-integer labels, an empty
      batch, a k that is not a positive integer below B - 1, a non-finite or non-positive tau,
      a bad layout or block argument, or, for concrete labels, a query with more positives than
      its slots or a batch without any positive pair.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses import recall_at_k_loss
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1 * jnp.eye(3)[jnp.array([1, 2, 0, 2, 0, 1])]
    >>> loss = recall_at_k_loss(embeddings, labels, k_values=(1, 2), samples_per_class=2)
    >>> print(f"{loss:.4f}")
    0.5541
    >>> # Inside jit the labels are traced; the layout fixes the static sizes.
    >>> step = jax.jit(jax.value_and_grad(
    ...     lambda e, y: recall_at_k_loss(e, y, k_values=(1, 2), samples_per_class=2)))
    >>> value, grad = step(embeddings, labels)
    >>> print(f"{value:.4f}", grad.shape)
    0.5541 (6, 3)
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  static = _prepare(embeddings, labels, k_values=k_values, tau1=tau1, tau2=tau2,
                    samples_per_class=samples_per_class, max_positives=max_positives,
                    query_block=query_block, memory_budget_bytes=memory_budget_bytes)
  embeddings = jnp.asarray(embeddings, compute_dtype(embeddings))
  return _loss(embeddings, embeddings, jnp.asarray(labels), None, from_similarity=False,
               count_query_in_rank=bool(count_query_in_rank), **static)


def recall_at_k_loss_from_similarity(
    similarities: jax.Array,
    labels: jax.Array,
    *,
    k_values: Sequence[int] | None = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    count_query_in_rank: bool = True,
    samples_per_class: int | None = None,
    max_positives: int | None = None,
    query_block: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """RS@k from a precomputed (B, B) similarity matrix (e.g. SiMix in similarity form).

  Same arguments, result and errors as `recall_at_k_loss`, with `similarities[i, j]` in place
  of `e_i . e_j`. The matrix must be symmetric for the two to agree; it is used row-wise as
  given.

  Examples:
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses import recall_at_k_loss_from_similarity
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1 * jnp.eye(3)[jnp.array([1, 2, 0, 2, 0, 1])]
    >>> loss = recall_at_k_loss_from_similarity(
    ...     embeddings @ embeddings.T, labels, k_values=(1, 2), samples_per_class=2)
    >>> print(f"{loss:.4f}")
    0.5541
  """
  similarities, labels = _common.check_similarity_batch(similarities, labels)
  static = _prepare(similarities, labels, k_values=k_values, tau1=tau1, tau2=tau2,
                    samples_per_class=samples_per_class, max_positives=max_positives,
                    query_block=query_block, memory_budget_bytes=memory_budget_bytes)
  return _loss(jnp.asarray(similarities, compute_dtype(similarities)), None, jnp.asarray(labels),
               None, from_similarity=True, count_query_in_rank=bool(count_query_in_rank),
               **static)


def recall_at_k_database_loss(
    queries: jax.Array,
    query_labels: jax.Array,
    database: jax.Array,
    database_labels: jax.Array,
    *,
    database_valid: jax.Array | None = None,
    k_values: Sequence[int] | None = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    count_query_in_rank: bool = True,
    max_positives: int | None = None,
    query_block: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """RS@k of a batch of queries ranked against a larger database (e.g. batch + memory).

  The formula is the module docstring's with the database in place of the batch: for query q,
  P_q is the valid database rows of its label other than its own row, and ranks sum over the
  valid database rows. The database must START with the queries: its first B rows are the
  queries themselves (`cross_batch_memory.database` builds it so), which is how a query's own
  row is found; with the batch as the whole database this is `recall_at_k_loss` exactly.

  Args:
    queries: (B, D) float query embeddings (the batch), used as given.
    query_labels: (B,) integer labels of the queries.
    database: (N, D) float database embeddings, N >= B, rows [0, B) being `queries`. Gradients
      flow through it as given (the memory's rows are constants when built by
      `cross_batch_memory.database`).
    database_labels: (N,) integer labels, the first B being `query_labels`.
    database_valid: (N,) bool, False on rows to ignore (a memory not yet full); None: all rows.
      Labels of valid rows must be below the labels dtype's largest value.
    k_values, tau1, tau2, count_query_in_rank, query_block, memory_budget_bytes: as in
      `recall_at_k_loss`, with N in place of B (each k below N - 1).
    max_positives: the static number of positive slots per query: the most valid database
      rows of a query's class, less one. A memory holds rows of the batch's classes from
      earlier steps, so the batch layout no longer bounds this. None: from concrete labels, or
      N - 1 slots for traced labels (with a warning).

  Returns:
    Scalar loss in [0, 1], float32 (float64 for float64 inputs); NaN when traced labels give a
    query more positives than its slots, or no query has a positive.

  Raises:
    ValueError: as `recall_at_k_loss`, and when the database does not start with the queries
      (where concrete), the dimensions differ, or the mask is not (N,) bool.

  Examples:
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses.recall_at_k import recall_at_k_database_loss
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1 * jnp.eye(3)[jnp.array([1, 2, 0, 2, 0, 1])]
    >>> memory = jnp.eye(3)[jnp.array([0, 1])]
    >>> database = jnp.concatenate([embeddings, memory])
    >>> database_labels = jnp.concatenate([labels, jnp.array([0, 1])])
    >>> loss = recall_at_k_database_loss(embeddings, labels, database, database_labels,
    ...                                  k_values=(1, 2))
    >>> print(f"{loss:.4f}")
    0.5532
  """
  queries, query_labels, database, database_labels, database_valid = _common.check_database(
      queries, query_labels, database, database_labels, database_valid)
  static = _prepare(database, database_labels, k_values=k_values, tau1=tau1, tau2=tau2,
                    samples_per_class=None, max_positives=max_positives,
                    query_block=query_block, memory_budget_bytes=memory_budget_bytes,
                    num_queries=queries.shape[0], valid=database_valid)
  dtype = jnp.promote_types(compute_dtype(queries), compute_dtype(database))
  valid = None if database_valid is None else jnp.asarray(database_valid)
  return _loss(jnp.asarray(queries, dtype), jnp.asarray(database, dtype),
               jnp.asarray(database_labels), valid, from_similarity=False,
               count_query_in_rank=bool(count_query_in_rank), **static)


# The name the project has always exported; the same function.
recall_at_k_surrogate = recall_at_k_loss
recall_at_k_surrogate_from_similarity = recall_at_k_loss_from_similarity
