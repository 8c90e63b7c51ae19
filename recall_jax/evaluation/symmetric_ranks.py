"""Leave-one-out positive ranks from each similarity tile computed once: half the matmul.

In leave-one-out mode the similarity matrix S = E E^T is symmetric, so the query-block path (every
query row against the whole database) computes every similarity twice. Here items are permuted so
that each class lies inside one square tile of `tile` rows (classes sorted by size and packed whole,
tiles padded with rows that never rank above anything), and:

  * diagonal tile I: S_II gives the thresholds T_I = S[q, p] of its queries (all positives p of a
    query are in its own tile) and the counts of tile-I items above them;
  * off-diagonal tiles I < J: S_IJ is computed once; rows of I count along its rows against T_I,
    rows of J count along its columns against T_J.

A database item j ranks above positive p of query q when S[q, j] > S[q, p], or they are equal and j
has the lower ORIGINAL index (the tie rule of `knn`); the query itself never counts (excluded by
index). Every similarity a row of queries uses is the single float32 value computed in its tile, and
its thresholds are taken from that same tile, so comparisons are self-consistent bit for bit.

Cost: N^2 D / 2 multiply-adds for the tiles (against N^2 D for query blocks) plus the same
O(N * sum_q R_q) comparisons; memory O(tile^2 + N x W) where W is a tile's largest class minus one,
bucketed. Calls are dispatched asynchronously; kernels compile once per bucketed width.

Serves the category-level task (metric learning, Recall@k).
"""

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recall_jax.evaluation import knn as knn_lib
from recall_jax import parallel

# Original index of a padding row: larger than any real index, so even a tie never ranks it first.
PADDING = np.iinfo(np.int32).max
# Tile rows compared per step on CPU (whole tiles on accelerators), at most: the largest divisor of
# the tile up to these. Counting along rows reduces over the minor axis and is fastest with ~32 rows
# in cache at once; counting along columns adds rows elementwise into a (W, tile) accumulator and is
# fastest with 8 (measured with 1024-row tiles on a 2-core AVX2 CPU).
_CPU_ROW_CHUNK = 32
_CPU_COLUMN_CHUNK = 8


def bucket_width(width: int) -> int:
  """Rounds a positive-list width up to one of ~4 sizes per octave to bound recompilation."""
  step = max(4, 1 << max(0, width.bit_length() - 3))
  return parallel.round_up(width, step)


def count_above_by_row(sims: jax.Array, thresholds: jax.Array, positives: jax.Array,
                       columns: jax.Array, chunk: int) -> jax.Array:
  """counts[q, w] = #{j : sims[q, j] > t[q, w], or equal and columns[j] < positives[q, w]}.

  Args:
    sims: (B, C) float32 similarities.
    thresholds: (B, W) float32 similarities of the positives, t above.
    positives: (B, W) int32 indices of the positives (for the tie rule).
    columns: (C,) int32 index of each column in the same numbering.
    chunk: rows per step (divides B); the minor-axis reductions of a step stay in cache.

  Returns:
    (B, W) int32 counts.
  """
  rows, num_columns = sims.shape
  width = thresholds.shape[1]
  chex.assert_shape([thresholds, positives], (rows, width))
  chex.assert_shape(columns, (num_columns,))

  def count(args):
    s, t, p = args  # (chunk, C), (chunk, W), (chunk, W)
    higher = s[:, None, :] > t[:, :, None]
    tied_before = (s[:, None, :] == t[:, :, None]) & (columns < p[:, :, None])
    return jnp.sum(higher | tied_before, axis=-1, dtype=jnp.int32)

  steps = rows // chunk
  counts = lax.map(count, (sims.reshape(steps, chunk, num_columns),
                           thresholds.reshape(steps, chunk, width),
                           positives.reshape(steps, chunk, width)))
  return counts.reshape(rows, width)


def count_above_by_column(sims: jax.Array, thresholds: jax.Array, positives: jax.Array,
                          rows_index: jax.Array, chunk: int) -> jax.Array:
  """The transposed count: counts[j, w] = #{q : sims[q, j] > t[j, w], or equal and
  rows_index[q] < positives[j, w]}, without materialising sims^T.

  Args:
    sims: (B, C) float32 similarities.
    thresholds: (C, W) float32 thresholds of each column.
    positives: (C, W) int32 indices of the positives (for the tie rule).
    rows_index: (B,) int32 index of each row in the same numbering.
    chunk: rows added per step (divides B).

  Returns:
    (C, W) int32 counts.
  """
  rows, num_columns = sims.shape
  width = thresholds.shape[1]
  chex.assert_shape([thresholds, positives], (num_columns, width))
  chex.assert_shape(rows_index, (rows,))
  t, p = thresholds.T, positives.T  # (W, C): the reduction runs over rows, elementwise in C

  def add(total, args):
    s, r = args  # (chunk, C), (chunk,)
    higher = s[:, None, :] > t
    tied_before = (s[:, None, :] == t) & (r[:, None, None] < p)
    return total + jnp.sum(higher | tied_before, axis=0, dtype=jnp.int32), None

  steps = rows // chunk
  total, _ = lax.scan(add, jnp.zeros((width, num_columns), jnp.int32),
                      (sims.reshape(steps, chunk, num_columns), rows_index.reshape(steps, chunk)))
  return total.T


@jax.jit
def _tile_similarities(embeddings_a, embeddings_b, index_a, index_b):
  """(B, D) x (B, D) -> (B, B) float32 similarities with excluded pairs at -inf.

  Excluded: an item with itself (same original index, so only on a diagonal tile) and any pair with
  a padding row; -inf never ranks above a real positive's finite similarity.
  """
  sims = knn_lib.similarities(embeddings_a, embeddings_b)
  excluded = ((index_a[:, None] == index_b[None, :]) | (index_a[:, None] == PADDING)
              | (index_b[None, :] == PADDING))
  return jnp.where(excluded, -jnp.inf, sims)


@jax.jit
def _thresholds(sims, positive_slots):
  """(B, B) diagonal tile, (B, W) slots of the positives -> (B, W) their similarities."""
  return jnp.take_along_axis(sims, positive_slots, axis=1)


# Counting is jitted apart from the matmul so that variants are compiled per width, not per pair of
# widths; passing the (tile, tile) similarities between calls costs a few percent on CPU.
@partial(jax.jit, static_argnames=("chunk",), donate_argnames=("counts",))
def _add_row_counts(counts, sims, thresholds, positives, columns, *, chunk: int):
  return counts + count_above_by_row(sims, thresholds, positives, columns, chunk)


@partial(jax.jit, static_argnames=("chunk",), donate_argnames=("counts",))
def _add_column_counts(counts, sims, thresholds, positives, rows_index, *, chunk: int):
  return counts + count_above_by_column(sims, thresholds, positives, rows_index, chunk)


class Packing(NamedTuple):
  """Items packed into tiles, whole classes per tile.

  Attributes:
    items: (T, tile) int32 original index of each slot, `PADDING` for empty slots.
    class_start: (T, tile) int32 slot where the slot's class begins in its tile (0 for padding).
    class_size: (T, tile) int32 size of the slot's class (0 for padding).
  """
  items: np.ndarray
  class_start: np.ndarray
  class_size: np.ndarray


def pack_classes(labels: np.ndarray, tile: int) -> Packing:
  """Packs classes, smallest first, into tiles of `tile` slots; members in ascending index order.

  Sorting by size keeps the largest class of each tile (hence its positive-list width) close to its
  smallest; greedy packing wastes less than one class per tile.

  Args:
    labels: (N,) integer labels.
    tile: slots per tile, at least the largest class size.

  Returns:
    The `Packing`.
  """
  order = np.argsort(labels, kind="stable")
  _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
  if sizes.max() > tile:
    raise ValueError(f"a class of {sizes.max()} items does not fit a tile of {tile}")
  tile_of = np.empty(sizes.size, np.int64)
  offset_of = np.empty(sizes.size, np.int64)
  current, fill = 0, 0
  for c in np.argsort(sizes, kind="stable"):
    if fill + sizes[c] > tile:
      current, fill = current + 1, 0
    tile_of[c], offset_of[c] = current, fill
    fill += sizes[c]
  num_tiles = current + 1
  class_of = np.repeat(np.arange(sizes.size), sizes)  # of each position in `order`
  class_offset = offset_of[class_of]
  slot = tile_of[class_of] * tile + class_offset + (np.arange(labels.size) - starts[class_of])
  items = np.full(num_tiles * tile, PADDING, np.int32)
  class_start = np.zeros(num_tiles * tile, np.int32)
  class_size = np.zeros(num_tiles * tile, np.int32)
  items[slot] = order
  class_start[slot] = class_offset
  class_size[slot] = sizes[class_of]
  shape = (num_tiles, tile)
  return Packing(items.reshape(shape), class_start.reshape(shape), class_size.reshape(shape))


def _positive_slots(class_start: np.ndarray, class_size: np.ndarray):
  """Slots of each row's positives (its class minus itself): (B, W) slots and validity."""
  slots = np.arange(class_start.size)
  width = bucket_width(max(int(class_size.max()) - 1, 0))
  w = np.arange(width)
  member = w + (w >= (slots - class_start)[:, None])  # skips the row itself
  valid = w < (class_size - 1)[:, None]
  return np.where(valid, class_start[:, None] + member, 0).astype(np.int32), valid


@dataclasses.dataclass
class _Tile:
  """One tile: host-side items and positive validity, device-side inputs and running counts."""
  items: np.ndarray  # (B,) int32 original indices, PADDING for empty slots
  valid: np.ndarray  # (B, W) bool: slot w is a real positive of row b
  embeddings: jax.Array  # (B, D) float32
  index: jax.Array  # (B,) int32, `items` on device
  positive_slots: jax.Array  # (B, W) int32 rows of the tile holding each positive
  positives: jax.Array  # (B, W) int32 original indices of the positives
  counts: jax.Array  # (B, W) int32 items found above each positive so far
  thresholds: jax.Array | None = None  # (B, W) float32 once the diagonal tile is computed

  @property
  def has_queries(self) -> bool:
    return self.valid.shape[1] > 0


def leave_one_out_ranks(embeddings: np.ndarray, labels: np.ndarray, *, tile: int,
                        device: jax.Device) -> list[tuple[np.ndarray, np.ndarray]]:
  """1-based rank of every positive of every item among all other items, each tile computed once.

  Args:
    embeddings: (N, D) float32.
    labels: (N,) int64.
    tile: rows per tile, at least the largest class; memory ~ tile^2 x 4 bytes per live tile.
    device: where to compute.

  Returns:
    per tile, (ids, ranks): ids (M,) int64 original indices of the tile's items that have a
    positive, ranks (M, W) int32 ranks of their positives in any order, padded with N + 1.
  """
  num_items = embeddings.shape[0]
  on_cpu = device.platform == "cpu"
  row_chunk = math.gcd(tile, _CPU_ROW_CHUNK) if on_cpu else tile
  column_chunk = math.gcd(tile, _CPU_COLUMN_CHUNK) if on_cpu else tile
  put = partial(jax.device_put, device=device)

  tiles = []
  for items, class_start, class_size in zip(*pack_classes(labels, tile)):
    slots, valid = _positive_slots(class_start, class_size)
    real = items != PADDING
    tile_embeddings = np.where(real[:, None], embeddings[np.where(real, items, 0)], 0)
    positives = np.where(valid, items[slots], 0).astype(np.int32)
    tiles.append(_Tile(items, valid, put(tile_embeddings.astype(np.float32)), put(items),
                       put(slots), put(positives), put(np.zeros(valid.shape, np.int32))))

  # Every call is dispatched without waiting for results; count buffers are donated and replaced.
  for t in tiles:
    if t.has_queries:
      sims = _tile_similarities(t.embeddings, t.embeddings, t.index, t.index)
      t.thresholds = _thresholds(sims, t.positive_slots)  # the very values counted against below
      t.counts = _add_row_counts(t.counts, sims, t.thresholds, t.positives, t.index,
                                 chunk=row_chunk)
  for a, tile_a in enumerate(tiles):
    if a >= 2:
      # Row a - 2 of tiles is final; waiting for it bounds the dispatched-but-unrun (tile, tile)
      # similarity buffers to about two rows of tiles instead of all N^2 / 2 of them.
      tiles[a - 2].counts.block_until_ready()
    for tile_b in tiles[a + 1:]:
      if not (tile_a.has_queries or tile_b.has_queries):
        continue
      sims = _tile_similarities(tile_a.embeddings, tile_b.embeddings, tile_a.index, tile_b.index)
      if tile_a.has_queries:
        tile_a.counts = _add_row_counts(tile_a.counts, sims, tile_a.thresholds, tile_a.positives,
                                        tile_b.index, chunk=row_chunk)
      if tile_b.has_queries:
        tile_b.counts = _add_column_counts(tile_b.counts, sims, tile_b.thresholds,
                                           tile_b.positives, tile_a.index, chunk=column_chunk)

  out = []
  for t in tiles:
    queries = t.valid.any(axis=1)
    ranks = np.where(t.valid, np.asarray(t.counts) + 1, num_items + 1)
    out.append((t.items[queries].astype(np.int64), ranks[queries]))
  return out
