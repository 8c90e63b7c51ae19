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

Cost: O(B * P * B) time, never O(B^3): each query gathers its positives into `max_positives`
static slots, and queries are processed in blocks of `query_block` rows rematerialised in the
backward pass (`jax.checkpoint`), so memory is O(query_block * P * B).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses.recall_at_k import check_embeddings
from recall_jax.losses.recall_at_k import class_groups
from recall_jax.losses.recall_at_k import clipped_sigmoid
from recall_jax.losses.recall_at_k import compute_dtype
from recall_jax.losses.recall_at_k import map_query_blocks
from recall_jax.losses.recall_at_k import max_positives_of
from recall_jax.losses.recall_at_k import positive_indices
from recall_jax.losses.recall_at_k import resolve_max_positives
from recall_jax.losses.recall_at_k import similarity

DEFAULT_TEMPERATURE = 0.01


def _per_query_ap(
    sim_rows: jax.Array,
    query_idx: jax.Array,
    query_labels: jax.Array,
    labels: jax.Array,
    pos_idx: jax.Array,
    pos_valid: jax.Array,
    temperature: float,
    include_query: bool,
) -> jax.Array:
  """Smooth AP of a block of queries.

  Args:
    sim_rows: (Q, B) similarities of the block's queries to every row.
    query_idx: (Q,) row index of each query.
    query_labels: (Q,) label of each query.
    labels: (B,) labels of every row.
    pos_idx, pos_valid: (Q, P) positive slots of each query (the query itself included when
      `include_query`).

  Returns:
    (Q,) AP_q (meaningless for queries without a positive; the caller masks them).
  """
  q, b = sim_rows.shape
  chex.assert_shape([query_idx, query_labels], (q,))
  chex.assert_equal_shape([pos_idx, pos_valid])
  s_pos = jnp.take_along_axis(sim_rows, pos_idx, axis=1)  # (Q, P)
  terms = clipped_sigmoid((sim_rows[:, None, :] - s_pos[:, :, None]) / temperature)  # (Q, P, B)
  column = jnp.arange(b)[None, None, :]
  keep = column != pos_idx[:, :, None]
  if not include_query:
    keep &= column != query_idx[:, None, None]
  # Same label as the query: with the query column kept (include_query) it counts as a positive.
  is_pos = (labels[None, :] == query_labels[:, None])[:, None, :]
  rank_all = 1.0 + jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)  # (Q, P)
  rank_pos = 1.0 + jnp.sum(jnp.where(keep & is_pos, terms, 0.0), axis=-1)  # (Q, P)
  num_pos = jnp.maximum(jnp.sum(pos_valid, axis=-1), 1).astype(rank_all.dtype)
  return jnp.sum(jnp.where(pos_valid, rank_pos / rank_all, 0.0), axis=-1) / num_pos


def smooth_ap_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    include_query: bool = False,
    max_positives: int | None = None,
    query_block: int | None = None,
) -> jax.Array:
  """The Smooth-AP loss, mean over queries of 1 - AP_q (formula in the module docstring).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product.
      float64 inputs (with x64 enabled) compute in float64, anything else in float32 at
      HIGHEST matmul precision.
    labels: (B,) integer class labels in any order; classes need not be contiguous or of
      equal size.
    temperature: sigmoid temperature (> 0) on similarity differences; the paper uses 0.01.
    include_query: False: the paper's equations (the query is not in its own retrieval set).
      True: the official code / pytorch-metric-learning (the query is one of its own
      positives and counts in every rank).
    max_positives: static number of positive slots per query, at least the largest class size
      minus one (not counting the query). Inferred when `labels` is concrete; required under
      `jit`. Under `jit`, a query with more positives makes the loss NaN (concrete labels raise).
    query_block: process queries in blocks of this many rows, rematerialising each block in the
      backward pass: memory O(query_block * P * B). None: all queries in one block.

  Returns:
    Scalar loss in [0, 1], dtype float32 (float64 for float64 inputs). Queries without a
    positive are left out of the mean; if no query has one the loss is NaN under `jit`.

  Raises:
    ValueError: on a shape mismatch, non-floating embeddings, non-integer labels, an empty
      batch, temperature <= 0, a bad `query_block`, a query with more positives than
      `max_positives`, concrete labels with no positive pair, or traced labels without
      `max_positives`.
  """
  # Kept as given: numpy labels stay concrete under jit, where jnp.asarray would trace them.
  given_labels = labels
  embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
  check_embeddings(embeddings, labels)
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
          and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
  if query_block is not None and (int(query_block) != query_block or query_block < 1):
    raise ValueError(f"query_block must be a positive integer or None, got {query_block!r}")
  dtype = compute_dtype(embeddings)
  embeddings = embeddings.astype(dtype)
  num_rows = labels.shape[0]

  concrete = not isinstance(given_labels, jax.core.Tracer)
  if concrete and max_positives_of(given_labels) == 0:
    raise ValueError("no query has a positive: every label occurs once in the batch")
  max_positives = resolve_max_positives(given_labels if concrete else labels, max_positives)
  pos_idx, pos_valid = positive_indices(labels, max_positives)
  _, _, count, _ = class_groups(labels)
  num_positives = count - 1
  # Under jit an overflow cannot raise; poison the loss rather than return a wrong value.
  overflow = jnp.any(num_positives > max_positives)
  has_positive = num_positives > 0
  num_queries = jnp.sum(has_positive)

  def block_ap(query_idx: jax.Array) -> jax.Array:
    slots, valid = pos_idx[query_idx], pos_valid[query_idx]
    if include_query:
      slots = jnp.concatenate([query_idx[:, None].astype(slots.dtype), slots], axis=1)
      valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    ap = _per_query_ap(
        similarity(embeddings[query_idx], embeddings), query_idx, labels[query_idx], labels,
        slots, valid, temperature, include_query)
    return ap.astype(dtype)

  per_query = map_query_blocks(block_ap, num_rows, query_block)
  chex.assert_shape(per_query, (num_rows,))

  loss = jnp.sum(jnp.where(has_positive, 1.0 - per_query, 0.0)) / jnp.maximum(num_queries, 1)
  return jnp.where((num_queries > 0) & ~overflow, loss, jnp.nan).astype(dtype)
