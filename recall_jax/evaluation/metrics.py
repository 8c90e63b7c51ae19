"""Retrieval metrics from exact ranks of every positive: Recall@k, precision@1, R-precision, MAP@R,
MAP.

For each query the rank of every positive (same-label database item) in the full similarity
ranking is computed exactly and blockwise: rank = 1 + number of database items that rank above it,
where an item ranks above another when its similarity is higher, or equal with a lower database
index (the tie rule of `knn`). All metrics follow from the sorted positive ranks r_1 < ... < r_R of
a query with R positives:

  recall@k    = [r_1 <= k]                       (>= 1 positive among the top k; the paper's metric)
  precision@1 = [r_1 == 1]
  r_precision = #{j : r_j <= R} / R
  map@r       = sum_{j : r_j <= R} (j / r_j) / R (pytorch-metric-learning's MAP@R)
  map         = sum_j (j / r_j) / R              (average precision over the whole ranking)

each averaged over queries that have at least one positive; the others are excluded and counted.
This needs no top-k list at all, so neighbours are never materialised and k and R are unbounded.

Two exact paths give the same ranks:
  * leave-one-out on one device (`symmetric_ranks`): S = E E^T is symmetric, so classes are packed
    whole into (tile x tile) blocks and each block is computed once for both its rows and its
    columns: N^2 D / 2 multiply-adds, memory O(tile^2 + N x W);
  * otherwise query blocks: each block of queries against the whole database, Q N D multiply-adds
    (N^2 D in leave-one-out), memory O(block x N), rows split over the devices of a mesh.
Counting costs one pass over a query's similarities per positive in both, O(N * sum_q R_q)
comparisons. Queries are grouped by R so a block only pays for its own largest class; with a huge R
(say a 5,000-image class) its queries cost about 5,000 passes over their rows, which is slow on CPU
but exact.

Serves both tasks.
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
from recall_jax import parallel
from recall_jax.evaluation import symmetric_ranks

# Rows compared per step when counting on CPU: small enough that a step's rows stay in cache. On
# accelerators the whole per-device block is one fused compare-and-reduce instead.
_ROWS_PER_STEP = 8


def _ranks_local(queries, database, self_index, positives, valid, *, rows_per_step):
  sims = knn_lib.mask_self(knn_lib.similarities(queries, database), self_index)
  num_items = sims.shape[1]
  thresholds = jnp.take_along_axis(sims, positives, axis=1)
  counts = symmetric_ranks.count_above_by_row(sims, thresholds, positives,
                                              lax.iota(jnp.int32, num_items), rows_per_step)
  return jnp.where(valid, counts + 1, num_items + 1)


@partial(jax.jit, static_argnames=("mesh", "rows_per_step"))
def positive_ranks_block(queries, database, self_index, positives, valid, *, mesh: Mesh,
                         rows_per_step: int):
  """1-based ranks of listed database items among all items, for a block of queries.

  Args:
    queries: (Q, D) float32 query rows, Q a multiple of the mesh size.
    database: (N, D) float32 database rows (replicated).
    self_index: (Q,) int32 database index of each query (excluded from its ranking), or -1.
    positives: (Q, W) int32 database indices whose ranks are wanted.
    valid: (Q, W) bool, False for padding slots.
    mesh: the 1-D device mesh; queries are split across it.
    rows_per_step: queries compared with the database at once (the block on accelerators, a
      few rows on a CPU, where the minor-axis reductions then stay in cache); the ranks do not
      depend on it.

  Returns:
    (Q, W) int32: 1 + the number of items (the query excluded) with a higher similarity, or an
    equal one at a lower index; N + 1 in invalid slots.
  """
  rows = PartitionSpec(parallel.DATA_AXIS)
  return jax.shard_map(
      partial(_ranks_local, rows_per_step=rows_per_step), mesh=mesh,
      in_specs=(rows, PartitionSpec(), rows, rows, rows), out_specs=rows)(
          queries, database, self_index, positives, valid)


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


def _check_k_values(k_values: Sequence[int], available: int,
                    leave_one_out: bool) -> tuple[int, ...]:
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


def _query_block_ranks(queries, database, used, order, start, count, *, leave_one_out: bool,
                       block: int, mesh: Mesh) -> list[tuple[np.ndarray, jax.Array]]:
  """Ranks of the positives of queries `used`, in blocks of queries against the whole database.

  Returns per block (ids, ranks): ids (M,) query indices, ranks (>= M, W) int32 device array (rows
  beyond M are padding), slots beyond a query's positives hold N + 1.
  """
  num_items = database.shape[0]
  block = knn_lib.block_size(block, used.size, mesh.size * _ROWS_PER_STEP)
  block = parallel.round_up(block, mesh.size * _ROWS_PER_STEP)
  rows = parallel.row_sharding(mesh)
  database_device = jax.device_put(database, parallel.replicated(mesh))
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  rows_per_step = _ROWS_PER_STEP if on_cpu else block // mesh.size
  pending = []
  for s in range(0, used.size, block):
    ids = used[s:s + block]
    width = symmetric_ranks.bucket_width(int(count[ids].max()))
    slots = np.arange(width)
    positives = order[np.minimum(start[ids, None] + slots, num_items - 1)]
    valid = slots < count[ids, None]
    if leave_one_out:
      valid &= positives != ids[:, None]
    self_index = ids.astype(np.int32) if leave_one_out else np.full(ids.shape, -1, np.int32)
    args = (parallel.pad_rows(queries[ids], block), parallel.pad_rows(self_index, block, -1),
            parallel.pad_rows(positives, block), parallel.pad_rows(valid, block, False))
    ranks = positive_ranks_block(
        jax.device_put(args[0], rows), database_device,
        *(jax.device_put(a, rows) for a in args[1:]), mesh=mesh, rows_per_step=rows_per_step)
    pending.append((ids, ranks))
  return pending


def symmetric_tile(block: int, num_items: int, largest_class: int) -> tuple[int, bool]:
  """Tile size of the symmetric path, and whether its memory is within the query-block path's.

  A tile holds whole classes, so it grows to the largest class; that is only worth it while
  tile^2 <= block x N (the query-block path's similarity buffer).
  """
  base = parallel.round_up(min(block, num_items), 8)
  tile = max(base, parallel.round_up(largest_class, 8))
  return tile, tile == base or tile * tile <= base * num_items


def retrieval_metrics(embeddings, labels, *, k_values: Sequence[int], query_embeddings=None,
                      query_labels=None, block: int = 1024, mesh: Mesh | None = None,
                      symmetric: bool | None = None) -> dict[str, float | int]:
  """Exact retrieval metrics by inner-product similarity (cosine for L2-normalised embeddings).

  Leave-one-out on a single device computes each similarity once for both of its items (tiles of
  whole classes, `symmetric_ranks`): half the matmul of the query-block path that every other case
  uses. Both give the same ranks (exactly the same wherever float32 inner products are exact, as in
  the tests; otherwise up to rounding of near-ties in the last bit, like any change of matmul).

  Args:
    embeddings: (N, D) float database embeddings.
    labels: (N,) integer database labels.
    k_values: cut-offs for recall@k, each in [1, database size] (N - 1 in leave-one-out mode).
    query_embeddings: (Q, D) float queries; None means leave-one-out: every database item is a query
      and never retrieves itself (by index).
    query_labels: (Q,) integer labels of the queries; given iff `query_embeddings` is.
    block: query-block path: queries per matmul (rounded to a multiple of 8 x devices), memory
      ~ block x N x 4 bytes. Symmetric path: rows and columns of a square tile (rounded up to a
      multiple of 8, and up to the largest class, which must fit one tile), memory ~ tile^2 x 4
      bytes.
    mesh: 1-D mesh to split query blocks over (default: all devices).
    symmetric: True forces the symmetric path (needs leave-one-out and a one-device mesh), False the
      query-block path; None (default) picks the symmetric path in leave-one-out on one device,
      unless a class is so large that its tile would take more memory than block x N.

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
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")

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

  mesh = parallel.data_mesh() if mesh is None else mesh
  tile, tile_fits = symmetric_tile(block, num_items, int(count.max()))
  if symmetric is None:
    symmetric = leave_one_out and mesh.size == 1 and tile_fits
  elif symmetric and not (leave_one_out and mesh.size == 1):
    raise ValueError("symmetric=True needs leave-one-out (no query_embeddings) and a one-device "
                     f"mesh, got {'leave-one-out' if leave_one_out else 'separate queries'} on "
                     f"{mesh.size} devices")
  if symmetric:
    blocks = symmetric_ranks.leave_one_out_ranks(database, db_labels, tile=tile,
                                                 device=mesh.devices.flat[0])
  else:
    blocks = _query_block_ranks(queries, database, used, order, start, count,
                                leave_one_out=leave_one_out, block=block, mesh=mesh)

  # Per-query values are laid out in the order of `used` whatever the path, so the means below sum
  # the same numbers in the same order.
  position = np.empty(q_labels.shape[0], np.int64)
  position[used] = np.arange(used.size)
  per_query: dict[str, np.ndarray] = {}
  for ids, ranks in blocks:
    values = metrics_from_ranks(np.asarray(ranks)[:ids.size], num_positives[ids], k_values)
    for name, value in values.items():
      per_query.setdefault(name, np.empty(used.size))[position[ids]] = value
  out: dict[str, float | int] = {name: float(np.mean(value)) for name, value in per_query.items()}
  out["num_queries"] = int(used.size)
  out["num_queries_without_positives"] = int(q_labels.shape[0] - used.size)
  return out
