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

Cost: O(B * P * N) time, where P is the largest number of positives of any query and N the
number of rows, never O(N^3): each query gathers its positives into `max_positives` static
slots, and queries are processed in blocks of `query_block` rows whose intermediates are
rematerialised in the backward pass, so memory is O(query_block * P * N).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K_VALUES = (1, 2, 4, 8, 16)
_CLIP = 50.0


def clipped_sigmoid(x: jax.Array) -> jax.Array:
  """`sigmoid(clip(x, -50, 50))`, the official code's sigmoid."""
  return jax.nn.sigmoid(jnp.clip(x, -_CLIP, _CLIP))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """float64 for float64 inputs, float32 otherwise (bf16/fp16 embeddings are upcast)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Dot-product similarities `a @ b.T` at full precision, shape (len(a), len(b)).

  With tau2 = 0.01 a similarity error is amplified 100x inside the sigmoid, so float32 inputs
  use `precision=HIGHEST` (TPU/GPU default matmul precision would truncate to bf16/tf32).
  """
  dtype = jnp.promote_types(compute_dtype(a), compute_dtype(b))
  return jnp.matmul(a.astype(dtype), b.astype(dtype).T, precision=jax.lax.Precision.HIGHEST)


def check_labels(labels, num_rows: int | None = None) -> None:
  """Raises ValueError unless `labels` is a non-empty 1-D integer array of `num_rows` entries."""
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (B,), got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.shape[0] == 0:
    raise ValueError("empty batch: labels has no entries")
  if num_rows is not None and labels.shape[0] != num_rows:
    raise ValueError(
        f"shape mismatch: {num_rows} embedding rows but {labels.shape[0]} labels")


def check_embeddings(embeddings, labels) -> None:
  """Raises ValueError unless embeddings is a (B, D) float array and labels (B,) integers."""
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must have shape (B, D), got shape {embeddings.shape}")
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
  check_labels(labels, embeddings.shape[0])


def check_k_and_taus(k_values: Sequence[int], tau1: float, tau2: float) -> tuple[int, ...]:
  k_values = tuple(k_values)
  if not k_values:
    raise ValueError("k_values must not be empty")
  for k in k_values:
    if int(k) != k or k <= 0:
      raise ValueError(f"every k must be a positive integer, got k_values={k_values}")
  if not tau1 > 0:
    raise ValueError(f"tau1 must be > 0, got {tau1}")
  if not tau2 > 0:
    raise ValueError(f"tau2 must be > 0, got {tau2}")
  return tuple(int(k) for k in k_values)


def max_positives_of(labels) -> int:
  """The largest number of positives (same label, not itself) of any row; needs concrete labels."""
  _, counts = np.unique(np.asarray(labels), return_counts=True)
  return int(counts.max()) - 1


def resolve_max_positives(labels, max_positives: int | None) -> int:
  """Validates or infers the static number of positive slots per query.

  Raises ValueError when labels are concrete and some query has more positives than
  `max_positives`, or when labels are traced and `max_positives` is not given.
  """
  if _is_concrete(labels):
    needed = max_positives_of(labels)
    if max_positives is None:
      return max(needed, 1)
    if needed > max_positives:
      raise ValueError(
          f"a query has {needed} positives but max_positives={max_positives}; raise "
          "max_positives (e.g. samples per class - 1, or more with SiMix)")
  elif max_positives is None:
    raise ValueError(
        "labels are traced (inside jit/grad), so the number of positives per query cannot be "
        "inferred: pass max_positives (e.g. samples per class - 1)")
  if int(max_positives) != max_positives or max_positives < 1:
    raise ValueError(f"max_positives must be a positive integer, got {max_positives}")
  return int(max_positives)


def class_groups(labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Groups rows by label without a (B, B) matrix.

  Args:
    labels: (B,) integers, any order.

  Returns:
    order: (B,) row indices sorted by label, stable (rows of a class keep their order).
    start: (B,) for each row, the position in `order` where its class begins.
    count: (B,) for each row, the number of rows of its class (itself included).
    position: (B,) for each row, its position within its class (0-based, by row index).
  """
  order = jnp.argsort(labels, stable=True)
  sorted_labels = labels[order]
  start = jnp.searchsorted(sorted_labels, labels, side="left")
  end = jnp.searchsorted(sorted_labels, labels, side="right")
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(labels.shape[0], dtype=order.dtype))
  return order, start, end - start, inverse - start


def positive_indices(labels: jax.Array, max_positives: int) -> tuple[jax.Array, jax.Array]:
  """Each row's positives (same label, other row), in row order, padded to static slots.

  Args:
    labels: (B,) integers.
    max_positives: P, the static number of slots.

  Returns:
    indices: (B, P) int32 row indices of the positives; padding slots point at row 0.
    valid: (B, P) bool, False on padding slots.
    A row with more than P positives keeps its first P; callers check counts separately.
  """
  order, start, count, position = class_groups(labels)
  slot = jnp.arange(max_positives)[None, :]
  # Skip the row itself: slots before its own position map to the same position, after it +1.
  within = slot + (slot >= position[:, None])
  valid = within < count[:, None]
  flat = jnp.where(valid, start[:, None] + within, 0)
  return order[flat].astype(jnp.int32), valid


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
) -> jax.Array:
  """`1 - mean_k R_qk` for a block of queries.

  Args:
    sim_rows: (Q, N) similarities of the block's queries to every row.
    query_idx: (Q,) row index of each query (its own column in `sim_rows`).
    pos_idx, pos_valid: (Q, P) positive slots of each query.
    num_positives: (Q,) |P_q|.

  Returns:
    (Q,) per-query loss (meaningless where num_positives == 0; the caller masks it).
  """
  q, n = sim_rows.shape
  chex.assert_shape(pos_idx, (q, None))
  s_pos = jnp.take_along_axis(sim_rows, pos_idx, axis=1)  # (Q, P)
  terms = clipped_sigmoid((sim_rows[:, None, :] - s_pos[:, :, None]) / tau2)  # (Q, P, N)
  column = jnp.arange(n)[None, None, :]
  keep = column != pos_idx[:, :, None]
  if not count_query_in_rank:
    keep &= column != query_idx[:, None, None]
  rank = 1.0 + jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)  # (Q, P)

  recalls = []
  for k in k_values:
    hits = jnp.sum(jnp.where(pos_valid, clipped_sigmoid((k - rank) / tau1), 0.0), axis=-1)
    denom = jnp.maximum(jnp.minimum(k, num_positives), 1).astype(rank.dtype)
    recalls.append(jnp.minimum(hits, k) / denom)
  return 1.0 - jnp.mean(jnp.stack(recalls, axis=0), axis=0)


def _validate(
    labels, k_values, tau1, tau2, max_positives, query_block
) -> tuple[tuple[int, ...], int]:
  """Checks hyper-parameters (and concrete labels) before anything is traced."""
  k_values = check_k_and_taus(k_values, tau1, tau2)
  max_positives = resolve_max_positives(labels, max_positives)
  if query_block is not None and (int(query_block) != query_block or query_block < 1):
    raise ValueError(f"query_block must be a positive integer or None, got {query_block}")
  if _is_concrete(labels) and max_positives_of(labels) == 0:
    raise ValueError("no query has a positive: every label occurs once in the batch")
  return k_values, max_positives


def map_query_blocks(block_fn, num_rows: int, query_block: int | None) -> jax.Array:
  """`block_fn(query_indices (Q,)) -> (Q,)` over all rows, `query_block` queries at a time.

  Each block is rematerialised in the backward pass (`jax.checkpoint`), so memory holds one
  block's intermediates; the last block is padded with row 0 and the padding dropped.

  Returns:
    (num_rows,) per-query values in row order.
  """
  if query_block is None or query_block >= num_rows:
    return block_fn(jnp.arange(num_rows))
  num_blocks = -(-num_rows // query_block)
  padded = jnp.arange(num_blocks * query_block) % num_rows
  per_query = jax.lax.map(jax.checkpoint(block_fn), padded.reshape(num_blocks, query_block))
  return per_query.reshape(-1)[:num_rows]


@functools.partial(
    jax.jit,
    static_argnames=("from_similarity", "k_values", "tau1", "tau2", "count_query_in_rank",
                     "max_positives", "query_block"))
def _surrogate(
    x: jax.Array,
    labels: jax.Array,
    *,
    from_similarity: bool,
    k_values: tuple[int, ...],
    tau1: float,
    tau2: float,
    count_query_in_rank: bool,
    max_positives: int,
    query_block: int | None,
) -> jax.Array:
  """RS@k of embeddings x (B, D), or of a similarity matrix x (B, B) when from_similarity."""
  dtype = x.dtype
  num_rows = labels.shape[0]
  if from_similarity:
    row_fn = lambda idx: x[idx]
  else:
    row_fn = lambda idx: similarity(x[idx], x)

  pos_idx, pos_valid = positive_indices(labels, max_positives)
  _, _, count, _ = class_groups(labels)
  num_positives = count - 1
  # Under jit a query with more positives than slots cannot raise; poison the loss instead
  # of returning a silently wrong value (concrete labels were checked before tracing).
  overflow = jnp.any(num_positives > max_positives)

  def block_loss(query_idx):
    loss = _per_query_loss(
        row_fn(query_idx), query_idx, pos_idx[query_idx], pos_valid[query_idx],
        num_positives[query_idx], k_values, tau1, tau2, count_query_in_rank)
    return loss.astype(dtype)

  per_query = map_query_blocks(block_loss, num_rows, query_block)

  has_positive = num_positives > 0
  num_queries = jnp.sum(has_positive)
  loss = jnp.sum(jnp.where(has_positive, per_query, 0.0)) / jnp.maximum(num_queries, 1)
  # No positive pair at all (possible only with traced labels) or slot overflow: NaN, so the
  # trainer's non-finite check stops the run rather than training on a wrong value.
  return jnp.where((num_queries > 0) & ~overflow, loss, jnp.nan).astype(dtype)


def recall_at_k_surrogate(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    count_query_in_rank: bool = True,
    max_positives: int | None = None,
    query_block: int | None = None,
) -> jax.Array:
  """The RS@k loss of a batch of embeddings (see the module docstring for the formula).

  Args:
    embeddings: (B, D) float embeddings, used as given: similarity is the plain dot product
      (the model L2-normalises; SiMix rows are deliberately not renormalised). float64 inputs
      (with x64 enabled) compute in float64, anything else in float32 at HIGHEST precision.
    labels: (B,) integer class labels in any order; classes need not be contiguous or of equal
      size.
    k_values: the k of Recall@k to average over; positive integers.
    tau1: temperature (> 0) of the sigmoid on `k - rank`.
    tau2: temperature (> 0) of the sigmoid on similarity differences.
    count_query_in_rank: whether the query's own row counts in the rank of its positives
      (True: official code and published numbers; False: the paper's text).
    max_positives: static number of positive slots per query, at least the largest class size
      minus one. Inferred when `labels` is concrete; required under `jit`. Under `jit`, a query
      with more positives makes the loss NaN (concrete labels raise ValueError).
    query_block: process queries in blocks of this many rows, rematerialising each block in the
      backward pass: memory O(query_block * P * B) instead of O(B * P * B). None: one block.

  Returns:
    Scalar loss in [0, 1], dtype float32 (float64 for float64 inputs). Queries with no positive
    in the batch are left out of the mean.

  Raises:
    ValueError: on a shape mismatch, non-integer labels, an empty batch, k <= 0, tau <= 0, or a
      query with more positives than `max_positives`.
  """
  check_embeddings(embeddings, labels)
  k_values, max_positives = _validate(labels, k_values, tau1, tau2, max_positives, query_block)
  return _surrogate(
      embeddings.astype(compute_dtype(embeddings)), jnp.asarray(labels), from_similarity=False,
      k_values=k_values, tau1=float(tau1), tau2=float(tau2),
      count_query_in_rank=bool(count_query_in_rank), max_positives=max_positives,
      query_block=query_block)


def recall_at_k_surrogate_from_similarity(
    similarities: jax.Array,
    labels: jax.Array,
    *,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    count_query_in_rank: bool = True,
    max_positives: int | None = None,
    query_block: int | None = None,
) -> jax.Array:
  """RS@k from a precomputed (B, B) similarity matrix (e.g. SiMix in similarity form).

  Same arguments and result as `recall_at_k_surrogate`, with `similarities[i, j]` in place of
  `e_i . e_j`. The matrix must be symmetric for the two to agree; it is used row-wise as given.
  """
  if similarities.ndim != 2 or similarities.shape[0] != similarities.shape[1]:
    raise ValueError(f"similarities must have shape (B, B), got shape {similarities.shape}")
  if not jnp.issubdtype(similarities.dtype, jnp.floating):
    raise ValueError(f"similarities must be floating point, got dtype {similarities.dtype}")
  check_labels(labels, similarities.shape[0])
  k_values, max_positives = _validate(labels, k_values, tau1, tau2, max_positives, query_block)
  return _surrogate(
      similarities.astype(compute_dtype(similarities)), jnp.asarray(labels), from_similarity=True,
      k_values=k_values, tau1=float(tau1), tau2=float(tau2),
      count_query_in_rank=bool(count_query_in_rank), max_positives=max_positives,
      query_block=query_block)
