"""The revisited Oxford / Paris protocol (Radenovic et al., CVPR 2018): Easy, Medium and Hard.

Each query's ground truth lists database indices `easy`, `hard` and `junk`. A protocol splits them
into positives and ignored items; everything else is negative:

  protocol   positives      ignored
  easy       easy           junk + hard
  medium     easy + hard    junk
  hard       hard           junk + easy

Ignored items are removed from the ranking, so a positive at 0-based rank r with i ignored items
above it is at rank r - i. With the j-th positive (0-based) at rank r_j of R positives:

  AP     = (1 / R) sum_j (p_left + p_right) / 2,  p_left = j / r_j (1 when r_j = 0),
                                                  p_right = (j + 1) / (r_j + 1)
  mP@k   = #{j : r_j + 1 <= k'} / k',  k' = min(k, r_{R-1} + 1)

averaged over the queries that have at least one positive under the protocol (the others are left
out of that protocol's means; a protocol without any such query is NaN).

Ranking is by cosine similarity in float32 (`Precision.HIGHEST`), equal similarities ranking the
lower database index first (the tie rule of `knn`). The exact 0-based rank of every listed item
(easy, hard or junk) of a query is all the protocols need, and it is found without sorting or
holding the ranking: the database is read in blocks of rows (a memory-mapped file is never loaded
whole) and two passes run over them.

  1. The blocks holding listed items give each listed item's similarity to its query, and so the
     order of a query's W listed items in its ranking.
  2. For every database item j, a binary search over that order finds how many listed items rank
     above j (log2 W steps instead of the W comparisons of `retrieval_metrics`' counting, which
     matters here: a query lists hundreds of items). A histogram of these counts per query gives
     each listed item's rank: the listed item at position i in the order has exactly the items with
     at most i listed items above them ranked above it, itself excepted.

Both passes take similarities from the same compiled block computation, so the comparisons in pass
2 are against the very float32 values of pass 1. Memory is O(block x D + Q x block + Q x W); cost
is one matmul of the database (plus the blocks holding listed items again) and Q x N x log2(W)
gather-and-compare steps.

Serves the instance-level task (landmark retrieval).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from recall_jax.evaluation import extraction
from recall_jax import parallel as sharding
from recall_jax.evaluation import symmetric_ranks
# Imported by name: the package rebinds `recall_jax.evaluation.knn` to the function of that name.
from recall_jax.evaluation.knn import as_embeddings, similarities

PROTOCOLS = ("easy", "medium", "hard")
# Roles of a listed item, and which roles are positive / ignored under each protocol.
_EASY, _HARD, _JUNK = 0, 1, 2
_ROLES = {
    "easy": ((_EASY,), (_JUNK, _HARD)),
    "medium": ((_EASY, _HARD), (_JUNK,)),
    "hard": ((_HARD,), (_JUNK, _EASY)),
}
# Query rows are padded to a multiple of this times the device count.
_ROW_MULTIPLE = 8
# Database index of an empty slot in a query's list: after every real index.
_EMPTY = np.iinfo(np.int32).max
# Default database block: about this many bytes of float32 rows.
_BLOCK_BYTES = 64 << 20
# Blocks dispatched ahead of the one the host waits for; bounds the device buffers in flight.
_IN_FLIGHT = 2


def _similarities_local(queries, block, num_valid):
  sims = similarities(queries, extraction.l2_normalize(block))
  columns = lax.broadcasted_iota(jnp.int32, sims.shape, 1)
  finite = jnp.all(jnp.isfinite(block))
  # Padding rows of the last block never rank above anything.
  return jnp.where(columns < num_valid, sims, -jnp.inf), finite[None]


@partial(jax.jit, static_argnames=("mesh",))
def _block_similarities(queries, block, num_valid, *, mesh: Mesh):
  """(Qp, D) normalised queries x (B, D) raw rows -> (Qp, B) cosines, padding columns -inf; and
  whether the block's rows are all finite, one flag per device."""
  rows = PartitionSpec(sharding.DATA_AXIS)
  return jax.shard_map(_similarities_local, mesh=mesh,
                       in_specs=(rows, PartitionSpec(), PartitionSpec()),
                       out_specs=(rows, rows))(queries, block, num_valid)


def _rank_positions(sims, sorted_thresholds, sorted_items, columns, *, tie_rule: bool):
  """For each database column j: how many listed items rank above it.

  Listed items are sorted by the ranking itself (similarity descending, index ascending), so
  "listed item w ranks above column j" (t_w > s_j, or equal with w < j) holds for a prefix of them,
  and a binary search over that order finds its length in log2(W) gather-and-compare steps instead
  of comparing against all W thresholds.

  Args:
    sims: (B, C) float32 similarities of the columns; padding columns at -inf.
    sorted_thresholds: (B, W) float32 similarities of the listed items in ranking order; empty
      slots last, at -inf.
    sorted_items: (B, W) int32 their database indices; empty slots hold the largest int32.
    columns: (C,) int32 database index of each column.
    tie_rule: apply the index tie rule; without it the search compares similarities only (3-10x
      faster on CPU), which is exact unless a column's similarity equals a listed item's.

  Returns:
    positions: (B, C) int32 in [0, W].
    tied: (1,) bool, True when `tie_rule` is False and some column's similarity equals a listed
      item's, so that the positions may be wrong and the block must be searched with the rule.
  """
  rows, num_columns = sims.shape
  width = sorted_thresholds.shape[1]
  chex.assert_shape([sorted_thresholds, sorted_items], (rows, width))
  chex.assert_shape(columns, (num_columns,))
  # One flat gather per step is several times faster on CPU than a batched take_along_axis.
  flat_thresholds, flat_items = sorted_thresholds.reshape(-1), sorted_items.reshape(-1)
  row_start = (lax.iota(jnp.int32, rows) * width)[:, None]

  def search(ranks_above):
    def step(_, bounds):
      low, high = bounds
      middle = jnp.minimum((low + high) // 2, width - 1)
      above = ranks_above(row_start + middle)
      searching = low < high
      return (jnp.where(searching & above, middle + 1, low),
              jnp.where(searching & ~above, middle, high))

    # Derived from `sims` so that, inside shard_map, the loop carry varies over the mesh as it does.
    bounds = (jnp.zeros_like(sims, jnp.int32), jnp.full_like(sims, width, jnp.int32))
    return lax.fori_loop(0, width.bit_length(), step, bounds)[0]

  if tie_rule:
    positions = search(lambda at: (flat_thresholds[at] > sims)
                       | ((flat_thresholds[at] == sims) & (flat_items[at] < columns[None, :])))
    return positions, jnp.zeros((1,), bool)
  positions = search(lambda at: flat_thresholds[at] > sims)
  # The first listed item not above the column ties with it unless it is the column itself (a
  # listed item's own column always "ties") and the next one does not tie as well.
  first = row_start + jnp.minimum(positions, width - 1)
  second = row_start + jnp.minimum(positions + 1, width - 1)
  itself = (flat_items[first] == columns[None, :]) & ~(
      (positions + 1 < width) & (flat_thresholds[second] == sims))
  tied = ((positions < width) & (flat_thresholds[first] == sims) & (sims > -jnp.inf)
          & ~itself)
  return positions, jnp.any(tied)[None]


def _histogram_local(histogram, sims, sorted_thresholds, sorted_items, start, *, tie_rule):
  columns = start + lax.iota(jnp.int32, sims.shape[1])
  positions, tied = _rank_positions(sims, sorted_thresholds, sorted_items, columns,
                                    tie_rule=tie_rule)
  return jax.vmap(lambda h, p: h.at[p].add(1))(histogram, positions), tied


@partial(jax.jit, static_argnames=("mesh", "tie_rule"))
def _add_block_histogram(histogram, sims, sorted_thresholds, sorted_items, start, *, mesh: Mesh,
                         tie_rule: bool):
  """histogram[q, i] += #{block columns with exactly i listed items of query q above them}; and
  per device whether the search without the tie rule met a tie (see `_rank_positions`)."""
  rows = PartitionSpec(sharding.DATA_AXIS)
  return jax.shard_map(partial(_histogram_local, tie_rule=tie_rule), mesh=mesh,
                       in_specs=(rows, rows, rows, rows, PartitionSpec()),
                       out_specs=(rows, rows))(
                           histogram, sims, sorted_thresholds, sorted_items, start)


def scores_from_ranks(positive_ranks, ignored_ranks, *,
                      kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """AP and mP@k of one query from the full-ranking positions of its positives and ignored items.

  Args:
    positive_ranks: (R,) distinct 0-based ranks of the positives in the ranking that still holds
      the ignored items, any order; R >= 1.
    ignored_ranks: (I,) 0-based ranks of the ignored items in the same ranking, any order.
    kappas: cut-offs k of mP@k.

  Returns:
    {'ap': ..., 'mp@k' for each k} as floats in [0, 1].

  Raises:
    ValueError: no positives, or a rank listed twice.
  """
  positives = np.sort(np.asarray(positive_ranks, np.int64).ravel())
  ignored = np.sort(np.asarray(ignored_ranks, np.int64).ravel())
  if positives.size == 0:
    raise ValueError("scores_from_ranks needs at least one positive")
  if np.unique(np.concatenate([positives, ignored])).size != positives.size + ignored.size:
    raise ValueError("a rank is listed twice among the positives and ignored items")
  # Each positive moves up by the number of ignored items above it.
  ranks = (positives - np.searchsorted(ignored, positives, side="left")).astype(np.float64)
  j = np.arange(ranks.size, dtype=np.float64)
  left = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1.0))
  right = (j + 1) / (ranks + 1)
  out = {"ap": float(np.mean((left + right) / 2))}
  last = ranks[-1] + 1
  for k in kappas:
    cut = min(float(k), last)
    out[f"mp@{k}"] = float(np.count_nonzero(ranks + 1 <= cut) / cut)
  return out


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
  kappas = tuple(kappas)
  if not kappas:
    raise ValueError("kappas must not be empty")
  for k in kappas:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"kappas must be positive integers, got {k!r}")
  return tuple(int(k) for k in kappas)


class _RowConcatenation:
  """Several (n_i, D) arrays read as one (sum n_i, D) array, one row slice at a time."""

  def __init__(self, parts: Sequence[Any]):
    self.parts = list(parts)
    self.offsets = np.cumsum([0] + [p.shape[0] for p in self.parts])
    self.shape = (int(self.offsets[-1]), self.parts[0].shape[1])
    self.dtype = np.result_type(*(p.dtype for p in self.parts))

  def __getitem__(self, rows: slice) -> np.ndarray:
    start, stop, _ = rows.indices(self.shape[0])
    pieces = []
    for part, offset in zip(self.parts, self.offsets):
      lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
      if lo < hi:
        pieces.append(np.asarray(part[lo:hi], dtype=np.float32))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _open_part(database, name: str) -> Any:
  if isinstance(database, (str, os.PathLike)):
    database = np.load(database, mmap_mode="r")
  if not hasattr(database, "shape") or not hasattr(database, "dtype"):
    database = np.asarray(database)
  if len(database.shape) != 2 or database.shape[0] == 0 or database.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty 2-D (num, dim) array, got shape "
                     f"{tuple(database.shape)}")
  if not np.issubdtype(database.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got dtype {database.dtype}")
  return database


def _open_database(database) -> Any:
  """An (N, D) floating array-like; `.npy` paths opened memory-mapped; a list or tuple of them
  concatenated by rows. Nothing is read yet."""
  if not isinstance(database, (list, tuple)):
    return _open_part(database, "database_embeddings")
  if not database:
    raise ValueError("database_embeddings must not be an empty list")
  parts = [_open_part(d, f"database_embeddings[{i}]") for i, d in enumerate(database)]
  dims = {p.shape[1] for p in parts}
  if len(dims) != 1:
    raise ValueError(f"database_embeddings parts have different dimensions {sorted(dims)}")
  return _RowConcatenation(parts)


def _listed_items(gnd: Sequence[Mapping[str, Any]], num_queries: int,
                  num_items: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per query: the database indices of its easy, hard and junk items and their roles."""
  if len(gnd) != num_queries:
    raise ValueError(f"gnd has {len(gnd)} entries for {num_queries} queries")
  items, roles = [], []
  for q, entry in enumerate(gnd):
    lists = []
    for role, key in ((_EASY, "easy"), (_HARD, "hard"), (_JUNK, "junk")):
      if key not in entry:
        raise ValueError(f"gnd[{q}] has no {key!r} list (keys: {sorted(entry)})")
      values = np.asarray(entry[key]).ravel()
      if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"gnd[{q}][{key!r}] must hold integer indices, got dtype {values.dtype}")
      values = values.astype(np.int64)
      if values.size and (values.min() < 0 or values.max() >= num_items):
        raise ValueError(f"gnd[{q}][{key!r}] holds an index outside [0, {num_items}) "
                         f"(min {values.min()}, max {values.max()})")
      lists.append((np.full(values.shape, role, np.int8), values))
    query_items = np.concatenate([v for _, v in lists])
    if np.unique(query_items).size != query_items.size:
      raise ValueError(f"gnd[{q}]: an index is listed twice across 'easy', 'hard' and 'junk'")
    items.append(query_items)
    roles.append(np.concatenate([r for r, _ in lists]))
  return items, roles


def _device_block(database, start: int, block: int) -> tuple[np.ndarray, int]:
  """Rows [start, start + block) as float32, zero-padded to `block` rows; and the real count."""
  rows = np.asarray(database[start:start + block], dtype=np.float32)
  return sharding.pad_rows(rows, block), rows.shape[0]


def revisited_metrics(query_embeddings, database_embeddings, gnd: Sequence[Mapping[str, Any]], *,
                      kappas: Sequence[int] = (1, 5, 10), block: int | None = None,
                      mesh: Mesh | None = None) -> dict[str, float]:
  """mAP and mP@k of the Easy, Medium and Hard protocols, exactly and in bounded memory.

  Args:
    query_embeddings: (Q, D) float queries (not part of the database).
    database_embeddings: (N, D) float database: an array, a `np.memmap` / `np.load(...,
      mmap_mode='r')` array, the path of a `.npy` file (opened memory-mapped), or a list of these
      concatenated by rows (e.g. the benchmark's images, then the R1M distractors). Read in blocks
      of rows, never whole.
    gnd: Q mappings with 0-based database index lists 'easy', 'hard' and 'junk' (as the official
      ground-truth files hold them; other keys such as 'bbx' are ignored). The lists of a query must
      be disjoint.
    kappas: cut-offs k of mP@k.
    block: database rows per step (default: about 64 MiB of float32 rows); memory ~ 3 blocks.
    mesh: 1-D mesh to split the queries over (default: all devices).

  Returns:
    {'<protocol>/map', '<protocol>/mp@k' for each k} for protocol in easy, medium, hard: means in
    [0, 1] over the queries with at least one positive under the protocol, NaN when none has.

  Raises:
    ValueError: bad shapes or dtypes, non-finite embeddings, malformed `gnd`, bad kappas or block.
  """
  kappas = _check_kappas(kappas)
  queries = as_embeddings(query_embeddings, "query_embeddings")
  database = _open_database(database_embeddings)
  num_items, dim = (int(s) for s in database.shape)
  if queries.shape[1] != dim:
    raise ValueError(f"query_embeddings have dimension {queries.shape[1]} but the database has "
                     f"{dim}")
  items, roles = _listed_items(gnd, queries.shape[0], num_items)
  if block is None:
    block = max(1024, _BLOCK_BYTES // (4 * dim))
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  block = min(block, num_items)

  ranks = _listed_ranks(queries, database, items, block=block,
                        mesh=sharding.data_mesh() if mesh is None else mesh)

  per_protocol: dict[str, list[dict[str, float]]] = {p: [] for p in PROTOCOLS}
  for rank, role in zip(ranks, roles):
    for protocol, (positive_roles, ignored_roles) in _ROLES.items():
      positive = np.isin(role, positive_roles)
      if positive.any():
        per_protocol[protocol].append(scores_from_ranks(
            rank[positive], rank[np.isin(role, ignored_roles)], kappas=kappas))
  out = {}
  for protocol, scores in per_protocol.items():
    for name, key in [("map", "ap")] + [(f"mp@{k}", f"mp@{k}") for k in kappas]:
      out[f"{protocol}/{name}"] = (float(np.mean([s[key] for s in scores])) if scores
                                   else math.nan)
  return out


def _listed_ranks(queries: np.ndarray, database, items: list[np.ndarray], *, block: int,
                  mesh: Mesh) -> list[np.ndarray]:
  """0-based rank of every listed item of every query in its full cosine ranking."""
  num_queries = queries.shape[0]
  num_items = int(database.shape[0])
  longest = max(i.size for i in items)
  if longest == 0:
    return [np.zeros(0, np.int64) for _ in items]
  width = symmetric_ranks.bucket_width(longest)
  padded = sharding.round_up(num_queries, mesh.size * _ROW_MULTIPLE)
  valid = np.zeros((padded, width), bool)
  listed = np.zeros((padded, width), np.int32)
  for q, query_items in enumerate(items):
    valid[q, :query_items.size] = True
    listed[q, :query_items.size] = query_items

  rows = sharding.row_sharding(mesh)
  replicated = sharding.replicated(mesh)
  query_rows = jax.device_put(
      np.asarray(extraction.l2_normalize(sharding.pad_rows(queries, padded))), rows)

  def block_similarities(start):
    host_block, num_valid = _device_block(database, start, block)
    return _block_similarities(query_rows, jax.device_put(host_block, replicated),
                               jnp.int32(num_valid), mesh=mesh)

  # Pass 1: the similarity of each listed item, from the block computation that pass 2 repeats.
  thresholds = np.full((padded, width), -np.inf, np.float32)
  finite_flags = []
  for start in np.unique(listed[valid] // block * block):
    start = int(start)
    sims, finite = block_similarities(start)
    finite_flags.append(finite)
    here = valid & (listed >= start) & (listed < start + block)
    q_index, w_index = np.nonzero(here)
    thresholds[q_index, w_index] = np.asarray(sims)[q_index, listed[q_index, w_index] - start]

  # Listed items in ranking order (similarity descending, index ascending), empty slots last.
  order = np.lexsort((np.where(valid, listed, _EMPTY), -np.where(valid, thresholds, -np.inf)))
  sorted_thresholds = np.take_along_axis(np.where(valid, thresholds, -np.inf), order, axis=1)
  sorted_items = np.take_along_axis(np.where(valid, listed, _EMPTY), order, axis=1)

  # Pass 2: per query, histogram of how many listed items rank above each database item. The
  # listed item at ranking position i has exactly the items with at most i listed items above them
  # ranked above it, itself excepted: its rank is cumsum(histogram)[i] - 1.
  sorted_thresholds = jax.device_put(sorted_thresholds.astype(np.float32), rows)
  sorted_items = jax.device_put(sorted_items.astype(np.int32), rows)
  zeros = jax.device_put(np.zeros((padded, width + 1), np.int32), rows)
  histogram = zeros
  add = partial(_add_block_histogram, sorted_thresholds=sorted_thresholds,
                sorted_items=sorted_items, mesh=mesh)
  tie_flags = []
  in_flight: collections.deque[jax.Array] = collections.deque()
  for start in range(0, num_items, block):
    sims, finite = block_similarities(start)
    finite_flags.append(finite)
    histogram, tied = add(histogram, sims, start=jnp.int32(start), tie_rule=False)
    tie_flags.append((start, tied))
    # Waiting for an earlier step bounds the host blocks held by dispatched, unfinished steps.
    in_flight.append(histogram)
    if len(in_flight) > _IN_FLIGHT:
      in_flight.popleft().block_until_ready()
  # Blocks where a similarity equals a listed item's are counted again with the tie rule.
  for start, tied in tie_flags:
    if np.any(np.asarray(tied)):
      sims, _ = block_similarities(start)
      exact, _ = add(zeros, sims, start=jnp.int32(start), tie_rule=True)
      approximate, _ = add(zeros, sims, start=jnp.int32(start), tie_rule=False)
      histogram = histogram + exact - approximate
  ranks_sorted = np.cumsum(np.asarray(histogram, np.int64), axis=1)[:, :width] - 1
  if not all(bool(np.all(np.asarray(f))) for f in finite_flags):
    raise ValueError("database_embeddings contain NaN or infinite values")
  ranks = np.empty_like(ranks_sorted)
  np.put_along_axis(ranks, order, ranks_sorted, axis=1)
  return [ranks[q, :query_items.size] for q, query_items in enumerate(items)]


def format_revisited_table(metrics: Mapping[str, float], *, digits: int = 2) -> str:
  """The Easy / Medium / Hard table of `revisited_metrics` results, in percent.

  Args:
    metrics: `revisited_metrics` output, either as returned ('easy/map', ...) or with one prefix
      per setting ('roxford5k/easy/map', 'roxford5k+revisitop1m/easy/map', ...): one row each.
    digits: decimals shown.

  Returns:
    A plain-text table: one header line naming the protocols, one naming the columns (mAP and
    mP@k, in the order the metrics hold them), one line per setting.

  Raises:
    ValueError: no '<protocol>/<metric>' keys.
  """
  settings: dict[str, dict[str, float]] = {}
  columns: list[str] = []
  for key, value in metrics.items():
    parts = key.split("/")
    if len(parts) < 2 or parts[-2] not in PROTOCOLS:
      continue
    setting = "/".join(parts[:-2])
    settings.setdefault(setting, {})[f"{parts[-2]}/{parts[-1]}"] = float(value)
    if parts[-1] not in columns:
      columns.append(parts[-1])
  if not settings:
    raise ValueError(f"no '<protocol>/<metric>' keys (protocols {PROTOCOLS}) in {sorted(metrics)}")
  columns.sort(key=lambda c: (c != "map", int(c[3:]) if c.startswith("mp@") else 0))
  titles = ["mAP" if c == "map" else c.replace("mp@", "mP@") for c in columns]
  cell = max(4 + digits, *(len(t) for t in titles)) + 1
  label = max(len("setting"), *(len(s) for s in settings))
  group = cell * len(columns)
  lines = [" " * label + "".join(f"{p.capitalize():>{group}}" for p in PROTOCOLS),
           f"{'setting':<{label}}" + "".join(f"{t:>{cell}}" for _ in PROTOCOLS for t in titles)]
  for setting, values in settings.items():
    row = f"{setting or '-':<{label}}"
    for protocol in PROTOCOLS:
      for column in columns:
        value = values.get(f"{protocol}/{column}", math.nan)
        row += f"{100 * value:>{cell}.{digits}f}"
    lines.append(row)
  return "\n".join(lines)
