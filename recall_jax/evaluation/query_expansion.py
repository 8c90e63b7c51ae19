"""Alpha query expansion (alpha-QE) and database-side augmentation (alpha-DBA).

Both replace a descriptor by an L2-normalised weighted sum of itself and its k nearest database
neighbours by cosine similarity s, each with weight max(s, 0)^alpha (Radenovic, Tolias and Chum,
TPAMI 2018; Arandjelovic and Zisserman, CVPR 2012; alpha = 0 is average QE):

  x' = normalise(x + sum_{i <= k} max(s_i, 0)^alpha d_i).

DBA applies this to every database descriptor (its neighbours exclude itself); QE to every query
against the (augmented) database. `expand_descriptors` runs DBA and then QE, as is usual, before
the revisited metrics; both are off by default (k = 0). Descriptors must be L2-normalised.

Similarities are computed in row blocks of `block_size` x N on device (memory O(block_size N)),
neighbours chosen by `jax.lax.top_k`.

Serves the instance-level task (landmark retrieval).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from recall_jax import errors


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _expand_block(rows: jax.Array, database: jax.Array, offset: jax.Array, *, k: int,
                  alpha: jax.Array, exclude_self: bool) -> jax.Array:
  sims = rows @ database.T
  if exclude_self:
    own = offset + jnp.arange(len(rows))
    sims = jnp.where(jnp.arange(database.shape[0])[None, :] == own[:, None], -jnp.inf, sims)
  values, indices = jax.lax.top_k(sims, k)
  weights = jnp.maximum(values, 0.0) ** alpha
  expanded = rows + jnp.einsum("bk,bkd->bd", weights, database[indices])
  return expanded * jax.lax.rsqrt(jnp.maximum(jnp.sum(expanded**2, -1, keepdims=True), 1e-24))


def _expand(rows: jax.Array, database: jax.Array, *, k: int, alpha: float, block_size: int,
            exclude_self: bool) -> jax.Array:
  chex.assert_rank([rows, database], 2)
  chex.assert_equal_shape_suffix([rows, database], 1)
  if k < 0 or block_size < 1:
    raise errors.ConfigError(f"k must be >= 0 and block_size >= 1, got k={k}, "
                             f"block_size={block_size}")
  available = database.shape[0] - int(exclude_self)
  if k > available:
    raise errors.ConfigError(f"k = {k} exceeds the {available} database neighbours available")
  rows = jnp.asarray(rows, jnp.float32)
  if k == 0:
    return rows
  database = jnp.asarray(database, jnp.float32)
  n = rows.shape[0]
  # Every block has the same shape (the last is padded), so the kernel compiles once.
  padded = jnp.pad(rows, ((0, -n % block_size), (0, 0))) if n > block_size else rows
  size = min(block_size, n)
  out = [_expand_block(padded[i:i + size], database, jnp.int32(i), k=k,
                       alpha=jnp.float32(alpha), exclude_self=exclude_self)
         for i in range(0, n, size)]
  return jnp.concatenate(out)[:n]


def query_expansion(queries: jax.Array, database: jax.Array, *, k: int, alpha: float = 3.0,
                    block_size: int = 256) -> jax.Array:
  """alpha-QE: each query plus its k nearest database descriptors, weighted, L2-normalised.

  Args:
    queries: (Q, D) L2-normalised query descriptors.
    database: (N, D) L2-normalised database descriptors.
    k: neighbours per query (0: the queries unchanged, as float32).
    alpha: weight exponent (0: average QE).
    block_size: queries per similarity block.

  Returns:
    float32 (Q, D) expanded queries.

  Raises:
    ConfigError: k < 0, k > N or block_size < 1.
  """
  return _expand(queries, database, k=k, alpha=alpha, block_size=block_size,
                 exclude_self=False)


def database_augmentation(database: jax.Array, *, k: int, alpha: float = 3.0,
                          block_size: int = 256) -> jax.Array:
  """alpha-DBA: each database descriptor plus its k nearest other database descriptors.

  Args:
    database: (N, D) L2-normalised descriptors.
    k: neighbours per item, itself excluded (0: unchanged).
    alpha: weight exponent.
    block_size: database rows per similarity block.

  Returns:
    float32 (N, D) augmented database.

  Raises:
    ConfigError: k < 0, k > N - 1 or block_size < 1.
  """
  return _expand(database, database, k=k, alpha=alpha, block_size=block_size, exclude_self=True)


def expand_descriptors(queries: jax.Array, database: jax.Array, *, qe_k: int = 0,
                       qe_alpha: float = 3.0, dba_k: int = 0, dba_alpha: float = 3.0,
                       block_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """DBA on the database, then QE of the queries against the augmented database.

  Args:
    queries: (Q, D) and database: (N, D) L2-normalised descriptors.
    qe_k, qe_alpha: query expansion (qe_k = 0: off).
    dba_k, dba_alpha: database-side augmentation (dba_k = 0: off).
    block_size: rows per similarity block.

  Returns:
    float32 (Q, D) queries and (N, D) database, to pass to the metrics.
  """
  database = database_augmentation(database, k=dba_k, alpha=dba_alpha, block_size=block_size)
  queries = query_expansion(queries, database, k=qe_k, alpha=qe_alpha, block_size=block_size)
  return queries, database
