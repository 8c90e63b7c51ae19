"""Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020): average precision with sigmoid ranks.

Every row of the batch is a query. For query q let P_q be its positives (same label, other rows)
and N_q its negatives (other labels). Writing s_qj for the dot-product similarity and
G(x) = sigmoid(clip(x / temperature, -50, 50)) (the official code's clipped sigmoid), the rank
of positive p among the positives and among the whole retrieval set are relaxed as

    R_pos(q, p) = 1 + sum_{j in P_q, j != p} G(s_qj - s_qp),
    R_all(q, p) = 1 + sum_{j in P_q ∪ N_q, j != p} G(s_qj - s_qp),

and AP_q = (1 / |P_q|) sum_{p in P_q} R_pos(q, p) / R_all(q, p). The loss is the mean over queries
with at least one positive of 1 - AP_q. Queries without a positive in the batch have no AP and
are left out of the mean.

Which terms are included (`include_query`):
  * False (default): the query is not part of its own retrieval set, as in the paper's
    equations: it is in neither P_q nor N_q, so it appears in no rank.
  * True: what the official code (and pytorch-metric-learning's `SmoothAPLoss`) computes: the
    query is also one of its own positives, P_q ∪ {q}, and appears in every rank. The official
    code only masks the term comparing an item with itself (j = p). Since s_qq is normally the
    largest entry of its row, this adds an AP term close to 1 and pushes every other rank up
    by about one.
  In both modes the j = p term is excluded (it would add the constant G(0) = 1/2).

Cost: O(B * P * B) time, never O(B^3) when the caller gives the batch layout: each query gathers
its positives into P static slots, and queries are processed in blocks of `query_block` rows
rematerialised in the backward pass (`jax.checkpoint`), so memory is O(query_block * P * B);
without a `query_block` the loss picks the largest block whose temporaries fit
`memory_budget_bytes`. Static sizes, validation and the traced behaviour are those of
`recall_at_k_loss`: concrete labels are checked (ValueError), traced ones give NaN instead.

Query/database form (`smooth_ap_database_loss`): the batch's rows are the queries and the
retrieval set is the batch followed by more rows, e.g. a cross-batch memory of earlier
embeddings (category-level task).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses import _common
from recall_jax.numerics import compute_dtype
from recall_jax.numerics import similarity

DEFAULT_TEMPERATURE = 0.01
DEFAULT_MEMORY_BUDGET_BYTES = _common.DEFAULT_MEMORY_BUDGET_BYTES


def _per_query_ap(
    sim_rows: jax.Array,
    query_idx: jax.Array,
    query_labels: jax.Array,
    labels: jax.Array,
    pos_idx: jax.Array,
    pos_valid: jax.Array,
    temperature: float,
    include_query: bool,
    column_valid: jax.Array | None,
) -> jax.Array:
  """Smooth AP of a block of queries.

  Args:
    sim_rows: (Q, N) similarities of the block's queries to every row.
    query_idx: (Q,) row index of each query.
    query_labels: (Q,) label of each query.
    labels: (N,) labels of every row.
    pos_idx, pos_valid: (Q, P) positive slots of each query (the query itself included when
      `include_query`).
    column_valid: (N,) bool, the rows in every query's retrieval set (None: all).

  Returns:
    (Q,) AP_q (meaningless for queries without a positive; the caller masks them).
  """
  q, b = sim_rows.shape
  chex.assert_shape([query_idx, query_labels], (q,))
  chex.assert_equal_shape([pos_idx, pos_valid])
  s_pos = jnp.take_along_axis(sim_rows, pos_idx, axis=1)  # (Q, P)
  terms = _common.clipped_sigmoid(
      (sim_rows[:, None, :] - s_pos[:, :, None]) / temperature)  # (Q, P, B)
  column = jnp.arange(b)[None, None, :]
  keep = column != pos_idx[:, :, None]
  if not include_query:
    keep &= column != query_idx[:, None, None]
  if column_valid is not None:
    keep &= column_valid[None, None, :]
  # Same label as the query: with the query column kept (include_query) it counts as a positive.
  is_pos = (labels[None, :] == query_labels[:, None])[:, None, :]
  rank_all = 1.0 + jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)  # (Q, P)
  rank_pos = 1.0 + jnp.sum(jnp.where(keep & is_pos, terms, 0.0), axis=-1)  # (Q, P)
  num_pos = jnp.maximum(jnp.sum(pos_valid, axis=-1), 1).astype(rank_all.dtype)
  return jnp.sum(jnp.where(pos_valid, rank_pos / rank_all, 0.0), axis=-1) / num_pos


@functools.partial(jax.jit, static_argnames=("num_queries", "temperature", "include_query",
                                             "slots", "query_block"))
def _loss(queries: jax.Array, database: jax.Array, labels: jax.Array, valid: jax.Array | None, *,
          num_queries: int, temperature: float, include_query: bool, slots: int,
          query_block: int | None) -> jax.Array:
  """Smooth-AP of queries (B, D) against a database (N, D) whose first B rows are the queries;
  labels and valid are the database's."""
  dtype = queries.dtype
  pos_idx, pos_valid, num_positives = (
      a[:num_queries] for a in _common.positive_indices(labels, slots, valid))

  def block_loss(query_idx: jax.Array) -> jax.Array:
    slot_idx, slot_valid = pos_idx[query_idx], pos_valid[query_idx]
    if include_query:
      slot_idx = jnp.concatenate([query_idx[:, None].astype(slot_idx.dtype), slot_idx], axis=1)
      slot_valid = jnp.concatenate([jnp.ones_like(slot_valid[:, :1]), slot_valid], axis=1)
    ap = _per_query_ap(
        similarity(queries[query_idx], database), query_idx, labels[query_idx], labels,
        slot_idx, slot_valid, temperature, include_query, valid)
    return (1.0 - ap).astype(dtype)

  per_query = _common.map_query_blocks(block_loss, num_queries, query_block)
  chex.assert_shape(per_query, (num_queries,))
  return _common.mean_over_queries(per_query, num_positives, slots)


def _prepare(database, labels, *, temperature, include_query, samples_per_class, max_positives,
             query_block, memory_budget_bytes, num_queries=None, valid=None) -> dict:
  """Validated static arguments of `_loss`; `labels` and `valid` are the database's, whose
  first `num_queries` rows are the queries (None: all)."""
  temperature = _common.positive_number("temperature", temperature)
  query_block = _common.check_query_block(query_block)
  slots = _common.positive_slots(labels, samples_per_class=samples_per_class,
                                 max_positives=max_positives, num_queries=num_queries,
                                 valid=valid)
  num_queries = labels.shape[0] if num_queries is None else num_queries
  # The query's own slot (include_query) is one more (query, slot, row) term per query.
  query_block = _common.query_block_for(num_queries, slots + int(bool(include_query)),
                                        jnp.dtype(compute_dtype(database)).itemsize,
                                        memory_budget_bytes, query_block,
                                        num_columns=labels.shape[0])
  return dict(temperature=temperature, include_query=bool(include_query), slots=slots,
              query_block=query_block, num_queries=num_queries)


def smooth_ap_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    include_query: bool = False,
    samples_per_class: int | None = None,
    max_positives: int | None = None,
    query_block: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """The Smooth-AP loss, mean over queries of 1 - AP_q (formula in the module docstring).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product.
      float64 inputs (with x64 enabled) compute in float64, anything else in float32 at
      HIGHEST matmul precision.
    labels: (B,) integer class labels (array or array-like) in any order; classes need not be
      contiguous or of equal size.
    temperature: sigmoid temperature (finite, > 0) on similarity differences; the paper uses
      0.01.
    include_query: False: the paper's equations (the query is not in its own retrieval set).
      True: the official code / pytorch-metric-learning (the query is one of its own
      positives and counts in every rank).
    samples_per_class: the batch layout, m: no class has more than m rows. Gives each query
      m - 1 positive slots (not counting the query).
    max_positives: the static number of positive slots per query, instead of
      `samples_per_class`. With neither, concrete labels give the largest class minus one and
      traced labels B - 1 slots (the same value at far more work, with a warning).
    query_block: process queries in blocks of this many rows, rematerialising each block in the
      backward pass: memory O(query_block * P * B). None: the largest block whose temporaries
      fit `memory_budget_bytes`.
    memory_budget_bytes: budget for the loss's temporaries when `query_block` is None.

  Returns:
    Scalar loss in [0, 1], dtype float32 (float64 for float64 inputs). Queries without a
    positive are left out of the mean. NaN when the labels are traced and some query has more
    positives than its slots, or no query has a positive.

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings, non-integer labels, an empty
      batch, a non-finite or non-positive temperature, a bad layout or block argument, or,
      for concrete labels, a query with more positives than its slots or a batch without any
      positive pair.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses import smooth_ap_loss
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1 * jnp.eye(3)[jnp.array([1, 2, 0, 2, 0, 1])]
    >>> print(f"{smooth_ap_loss(embeddings, labels, temperature=0.1, samples_per_class=2):.4f}")
    0.0006
    >>> step = jax.jit(jax.value_and_grad(
    ...     lambda e, y: smooth_ap_loss(e, y, temperature=0.1, samples_per_class=2)))
    >>> value, grad = step(embeddings, labels)
    >>> print(f"{value:.4f}", grad.shape)
    0.0006 (6, 3)
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  static = _prepare(embeddings, labels, temperature=temperature, include_query=include_query,
                    samples_per_class=samples_per_class, max_positives=max_positives,
                    query_block=query_block, memory_budget_bytes=memory_budget_bytes)
  embeddings = jnp.asarray(embeddings, compute_dtype(embeddings))
  return _loss(embeddings, embeddings, jnp.asarray(labels), None, **static)


def smooth_ap_database_loss(
    queries: jax.Array,
    query_labels: jax.Array,
    database: jax.Array,
    database_labels: jax.Array,
    *,
    database_valid: jax.Array | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    include_query: bool = False,
    max_positives: int | None = None,
    query_block: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """Smooth-AP of a batch of queries ranked against a larger database (e.g. batch + memory).

  The formula is the module docstring's with the valid database rows as every query's
  retrieval set. The database must START with the queries: its first B rows are the queries
  themselves (`cross_batch_memory.database` builds it so), which is how a query's own row is
  found; with the batch as the whole database this is `smooth_ap_loss` exactly.

  Args:
    queries: (B, D) float query embeddings (the batch), used as given.
    query_labels: (B,) integer labels of the queries.
    database: (N, D) float database embeddings, N >= B, rows [0, B) being `queries`.
    database_labels: (N,) integer labels, the first B being `query_labels`.
    database_valid: (N,) bool, False on rows to ignore (a memory not yet full); None: all rows.
      Labels of valid rows must be below the labels dtype's largest value.
    temperature, include_query, query_block, memory_budget_bytes: as in `smooth_ap_loss`.
    max_positives: the static number of positive slots per query (not counting the query):
      the most valid database rows of a query's class, less one. None: from concrete labels,
      or N - 1 slots for traced labels (with a warning).

  Returns:
    Scalar loss in [0, 1], float32 (float64 for float64 inputs); NaN when traced labels give a
    query more positives than its slots, or no query has a positive.

  Raises:
    ValueError: as `smooth_ap_loss`, and when the database does not start with the queries
      (where concrete), the dimensions differ, or the mask is not (N,) bool.

  Examples:
    >>> import jax.numpy as jnp
    >>> from recall_jax.losses.smooth_ap import smooth_ap_database_loss
    >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
    >>> embeddings = jnp.eye(3)[labels] + 0.1 * jnp.eye(3)[jnp.array([1, 2, 0, 2, 0, 1])]
    >>> database = jnp.concatenate([embeddings, jnp.eye(3)[jnp.array([0, 1])]])
    >>> database_labels = jnp.concatenate([labels, jnp.array([1, 0])])
    >>> loss = smooth_ap_database_loss(embeddings, labels, database, database_labels,
    ...                                temperature=0.1)
    >>> print(f"{loss:.4f}")
    0.3216
  """
  queries, query_labels, database, database_labels, database_valid = _common.check_database(
      queries, query_labels, database, database_labels, database_valid)
  static = _prepare(database, database_labels, temperature=temperature,
                    include_query=include_query, samples_per_class=None,
                    max_positives=max_positives, query_block=query_block,
                    memory_budget_bytes=memory_budget_bytes, num_queries=queries.shape[0],
                    valid=database_valid)
  dtype = jnp.promote_types(compute_dtype(queries), compute_dtype(database))
  valid = None if database_valid is None else jnp.asarray(database_valid)
  return _loss(jnp.asarray(queries, dtype), jnp.asarray(database, dtype),
               jnp.asarray(database_labels), valid, **static)
