"""Exact k-nearest-neighbour search by blocked matmul + `lax.top_k`.

Similarity is the inner product in float32 at `Precision.HIGHEST`; for cosine similarity pass
L2-normalised embeddings (what `extract_embeddings` returns). Queries are processed `block` rows at
a time against the whole database, so peak memory is O(block x N) and never O(N^2). Rows of a block
are split across the devices of a 1-D mesh; the database is replicated. The default mesh holds this
process's devices only: the queries and database are host arrays of this process, so a search run
by one of several `jax.distributed` processes (a retrieval grid drawn by process 0) needs no other.

Tie-breaking is deterministic: among equal similarities the lower database index ranks first
(`lax.top_k` guarantees this within a row, and a row is never split). Every metric in this package
uses the same rule.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from recall_jax import parallel
from recall_jax.numerics import similarity as similarities


def as_embeddings(x, name: str) -> np.ndarray:
  """Validates an (N, D) array of finite values and returns it as float32 NumPy."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D (num, dim) array, got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  x = x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(x)):
    bad = int(np.count_nonzero(~np.all(np.isfinite(x), axis=1)))
    raise ValueError(f"{name} contains NaN or infinite values ({bad} rows)")
  return x


def mask_self(sims: jax.Array, self_index: jax.Array) -> jax.Array:
  """Sets sims[b, self_index[b]] to -inf; rows with self_index -1 are untouched."""
  columns = lax.broadcasted_iota(jnp.int32, sims.shape, 1)
  return jnp.where(columns == self_index[:, None], -jnp.inf, sims)


def _knn_local(queries, database, self_index, *, k):
  sims = mask_self(similarities(queries, database), self_index)
  values, indices = lax.top_k(sims, k)
  return values, indices.astype(jnp.int32)


@partial(jax.jit, static_argnames=("k", "mesh"))
def _knn_block(queries, database, self_index, *, k: int, mesh: Mesh):
  rows = PartitionSpec(parallel.DATA_AXIS)
  return jax.shard_map(
      partial(_knn_local, k=k), mesh=mesh, in_specs=(rows, PartitionSpec(), rows),
      out_specs=(rows, rows))(queries, database, self_index)


def block_size(block: int, num_rows: int, num_devices: int) -> int:
  """A query block no larger than needed, divisible by the device count."""
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  return parallel.round_up(min(block, num_rows), num_devices)


def knn(queries, database, k: int, *, exclude_self: bool = False, block: int = 1024,
        mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k neighbours of each query in the database by inner product.

  Args:
    queries: (Q, D) float array.
    database: (N, D) float array.
    k: neighbours per query, 1 <= k <= N (N - 1 with `exclude_self`).
    exclude_self: leave-one-out mode: `queries` are the database itself and query i never retrieves
      database item i (excluded by index, so duplicates of query i are still retrieved).
    block: queries per matmul; peak memory is about block x N x 4 bytes.
    mesh: 1-D mesh to split query blocks over (default: this process's devices).

  Returns:
    similarities: (Q, k) float32, descending per row.
    indices: (Q, k) int32 database indices; among equal similarities the lower index comes first.
  """
  queries = as_embeddings(queries, "queries")
  database = as_embeddings(database, "database")
  if queries.shape[1] != database.shape[1]:
    raise ValueError(f"queries have dimension {queries.shape[1]} but the database has "
                     f"{database.shape[1]}")
  if exclude_self and queries.shape[0] != database.shape[0]:
    raise ValueError("exclude_self needs the queries to be the database itself, got "
                     f"{queries.shape[0]} queries for {database.shape[0]} database items")
  available = database.shape[0] - int(exclude_self)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
    raise ValueError(f"k must be an integer in [1, {available}] (database size"
                     f"{' minus the excluded query' if exclude_self else ''}), got {k}")
  mesh = parallel.data_mesh(jax.local_devices()) if mesh is None else mesh
  num_queries = queries.shape[0]
  block = block_size(block, num_queries, mesh.size)
  padded = parallel.round_up(num_queries, block)
  queries = parallel.pad_rows(queries, padded)
  self_index = np.full((padded,), -1, np.int32)
  if exclude_self:
    self_index[:num_queries] = np.arange(num_queries, dtype=np.int32)
  database = jax.device_put(database, parallel.replicated(mesh))
  rows = parallel.row_sharding(mesh)
  # All blocks are dispatched before any result is fetched so host and device overlap.
  results = [
      _knn_block(jax.device_put(queries[s:s + block], rows),
                 database, jax.device_put(self_index[s:s + block], rows), k=int(k), mesh=mesh)
      for s in range(0, padded, block)]
  values = np.concatenate([np.asarray(v) for v, _ in results])[:num_queries]
  indices = np.concatenate([np.asarray(i) for _, i in results])[:num_queries]
  return values, indices
