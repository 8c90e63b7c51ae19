"""Retrieval metrics from exact ranks of every positive: Recall@k, precision@1, R-precision, MAP@R, MAP.

For each query the rank of every positive (same-label database item) in the full similarity
ranking is computed exactly and blockwise: rank = 1 + number of database items that rank above it,
where an item ranks above another when its similarity is higher, or equal with a lower database index
(the tie rule of `knn`). All metrics follow from the sorted positive ranks r_1 < ... < r_R of a query
with R positives:

  recall@k    = [r_1 <= k]                       (>= 1 positive among the top k; the paper's metric)
  precision@1 = [r_1 == 1]
  r_precision = #{j : r_j <= R} / R
  map@r       = sum_{j : r_j <= R} (j / r_j) / R (pytorch-metric-learning's MAP@R)
  map         = sum_j (j / r_j) / R              (average precision over the whole ranking)

each averaged over queries that have at least one positive; the others are excluded and counted.
This needs no top-k list at all, so neighbours are never materialised beyond the (block, N)
similarity matrix, and k and R are unbounded. Cost: the matmul plus one pass over the block's
similarities per positive, O(N * sum_q R_q) comparisons. Queries are grouped by R so a block only
pays for its own largest class; with a huge R (say a 5,000-image class) its queries cost about
5,000 passes over their rows, which is slow on CPU but exact and still O(block x N) memory.
"""

from collections.abc import Sequence
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from recall_jax.evaluation import knn as knn_lib
from recall_jax.evaluation import sharding

# Rows compared per step when counting on CPU: small enough that a step's rows stay in cache. On
# accelerators the whole per-device block is one fused compare-and-reduce instead.
_ROWS_PER_STEP = 8


def _ranks_local(queries, database, self_index, positives, valid, *, rows_per_step):
  sims = knn_lib.mask_self(knn_lib.similarities(queries, database), self_index)
  rows, num_items = sims.shape
  width = positives.shape[1]
  thresholds = jnp.take_along_axis(sims, positives, axis=1)
  columns = lax.iota(jnp.int32, num_items)

  def count_above(args):
    s, t, p = args  # (c, N), (c, W), (c, W)
    higher = s[:, None, :] > t[:, :, None]
    tied_before = (s[:, None, :] == t[:, :, None]) & (columns < p[:, :, None])
    return jnp.sum(higher | tied_before, axis=-1, dtype=jnp.int32)

  steps = rows // rows_per_step
  counts = lax.map(count_above, (sims.reshape(steps, rows_per_step, num_items),
                                 thresholds.reshape(steps, rows_per_step, width),
                                 positives.reshape(steps, rows_per_step, width)))
  ranks = counts.reshape(rows, width) + 1
  return jnp.where(valid, ranks, num_items + 1)


@partial(jax.jit, static_argnames=("mesh", "rows_per_step"))
def _positive_ranks_block(queries, database, self_index, positives, valid, *, mesh: Mesh,
                          rows_per_step: int):
  rows = PartitionSpec(sharding.DATA_AXIS)
  return jax.shard_map(
      partial(_ranks_local, rows_per_step=rows_per_step), mesh=mesh,
      in_specs=(rows, PartitionSpec(), rows, rows, rows), out_specs=rows)(
          queries, database, self_index, positives, valid)


def _bucket(width: int) -> int:
  """Rounds a positive-list width up to one of ~4 sizes per octave to bound recompilation."""
  step = max(4, 1 << max(0, width.bit_length() - 3))
  return sharding.round_up(width, step)


def metrics_from_ranks(ranks: np.ndarray, num_positives: np.ndarray,
                       k_values: Sequence[int]) -> dict[str, np.ndarray]:
  """Per-query metrics from positive ranks.

  Args:
    ranks: (M, W) integer 1-based ranks of each query's positives, any order; entries beyond a
      query's positives hold any value larger than every real rank.
    num_positives: (M,) number R >= 1 of positives per query (<= W).
    k_values: cut-offs for recall@k.

  Returns:
    dict of (M,) float64 arrays: 'recall@k' per k, 'precision@1', 'r_precision', 'map@r', 'map'.
  """
  chex.assert_rank(ranks, 2)
  chex.assert_shape(num_positives, (ranks.shape[0],))
  ranks = np.sort(ranks.astype(np.float64), axis=1)
  r = num_positives.astype(np.float64)[:, None]
  j = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)[None, :]
  is_positive = j <= r
  precision = np.where(is_positive, j / ranks, 0.0)
  within_r = is_positive & (ranks <= r)
  out = {f"recall@{k}": (ranks[:, 0] <= k).astype(np.float64) for k in k_values}
  out["precision@1"] = (ranks[:, 0] == 1).astype(np.float64)
  out["r_precision"] = within_r.sum(axis=1) / r[:, 0]
  out["map@r"] = np.where(within_r, precision, 0.0).sum(axis=1) / r[:, 0]
  out["map"] = precision.sum(axis=1) / r[:, 0]
  return out


def as_labels(labels, num: int, name: str) -> np.ndarray:
  """Validates (num,) integer labels and returns them as int64."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != num:
    raise ValueError(f"{name} must have shape ({num},) to match the embeddings, got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
  return labels.astype(np.int64, copy=False)


def _check_k_values(k_values: Sequence[int], available: int, leave_one_out: bool) -> tuple[int, ...]:
  k_values = tuple(k_values)
  if not k_values:
    raise ValueError("k_values must not be empty")
  for k in k_values:
    if not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k_values must be positive integers, got {k!r}")
    if k > available:
      raise ValueError(f"k={k} exceeds the database size {available}"
                       f"{' (leave-one-out excludes the query)' if leave_one_out else ''}")
  return tuple(int(k) for k in k_values)


def retrieval_metrics(embeddings, labels, *, k_values: Sequence[int], query_embeddings=None,
                      query_labels=None, block: int = 1024,
                      mesh: Mesh | None = None) -> dict[str, float | int]:
  """Exact retrieval metrics by inner-product similarity (cosine for L2-normalised embeddings).

  Args:
    embeddings: (N, D) float database embeddings.
    labels: (N,) integer database labels.
    k_values: cut-offs for recall@k, each in [1, database size] (N - 1 in leave-one-out mode).
    query_embeddings: (Q, D) float queries; None means leave-one-out: every database item is a query
      and never retrieves itself (by index).
    query_labels: (Q,) integer labels of the queries; given iff `query_embeddings` is.
    block: queries per matmul (rounded to a multiple of 8 x devices); memory ~ block x N x 4 bytes.
    mesh: 1-D mesh to split query blocks over (default: all devices).

  Returns:
    {'recall@k' for each k, 'precision@1', 'r_precision', 'map@r', 'map'}: means in [0, 1] over
    queries with at least one positive; 'num_queries': how many such queries;
    'num_queries_without_positives': how many were excluded.
  """
  database = knn_lib.as_embeddings(embeddings, "embeddings")
  db_labels = as_labels(labels, database.shape[0], "labels")
  if (query_embeddings is None) != (query_labels is None):
    raise ValueError("query_embeddings and query_labels must be given together")
  leave_one_out = query_embeddings is None
  if leave_one_out:
    queries, q_labels = database, db_labels
  else:
    queries = knn_lib.as_embeddings(query_embeddings, "query_embeddings")
    q_labels = as_labels(query_labels, queries.shape[0], "query_labels")
    if queries.shape[1] != database.shape[1]:
      raise ValueError(f"query_embeddings have dimension {queries.shape[1]} but embeddings have "
                       f"{database.shape[1]}")
  num_items = database.shape[0]
  k_values = _check_k_values(k_values, num_items - int(leave_one_out), leave_one_out)

  # Each class's database indices, ascending, as a slice [start, start + count) of `order`.
  order = np.argsort(db_labels, kind="stable").astype(np.int32)
  sorted_labels = db_labels[order]
  start = np.searchsorted(sorted_labels, q_labels, side="left")
  count = np.searchsorted(sorted_labels, q_labels, side="right") - start
  num_positives = count - int(leave_one_out)
  used = np.flatnonzero(num_positives > 0)
  if used.size == 0:
    raise ValueError("no query has a same-label item in the database; metrics are undefined")
  # Grouping queries by class size makes each block only as wide as its own largest class.
  used = used[np.argsort(count[used], kind="stable")]

  mesh = sharding.data_mesh() if mesh is None else mesh
  block = knn_lib.block_size(block, used.size, mesh.size * _ROWS_PER_STEP)
  block = sharding.round_up(block, mesh.size * _ROWS_PER_STEP)
  rows = sharding.row_sharding(mesh)
  database_device = jax.device_put(database, sharding.replicated(mesh))
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  rows_per_step = _ROWS_PER_STEP if on_cpu else block // mesh.size
  pending = []
  for s in range(0, used.size, block):
    ids = used[s:s + block]
    width = _bucket(int(count[ids].max()))
    slots = np.arange(width)
    positives = order[np.minimum(start[ids, None] + slots, num_items - 1)]
    valid = slots < count[ids, None]
    if leave_one_out:
      valid &= positives != ids[:, None]
    self_index = ids.astype(np.int32) if leave_one_out else np.full(ids.shape, -1, np.int32)
    args = (sharding.pad_rows(queries[ids], block), sharding.pad_rows(self_index, block, -1),
            sharding.pad_rows(positives, block), sharding.pad_rows(valid, block, False))
    ranks = _positive_ranks_block(
        jax.device_put(args[0], rows), database_device, *(jax.device_put(a, rows) for a in args[1:]),
        mesh=mesh, rows_per_step=rows_per_step)
    pending.append((ids, ranks))

  per_query = {}
  for ids, ranks in pending:
    values = metrics_from_ranks(np.asarray(ranks)[:ids.size], num_positives[ids], k_values)
    for name, value in values.items():
      per_query.setdefault(name, []).append(value)
  out: dict[str, float | int] = {
      name: float(np.mean(np.concatenate(parts))) for name, parts in per_query.items()}
  out["num_queries"] = int(used.size)
  out["num_queries_without_positives"] = int(q_labels.shape[0] - used.size)
  return out
