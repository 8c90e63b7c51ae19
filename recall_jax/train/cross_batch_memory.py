"""A cross-batch memory (XBM; Wang, Zhang, Huang, Scott, CVPR 2020) as a pure ring buffer.

Category-level task. The memory holds the embeddings and labels of the last M rows seen in
training; a pair-based loss then ranks each batch query against the batch plus the memory, a
database far larger than the batch at the cost of embeddings computed with older parameters.
As in XBM, nothing is differentiated through the memory: stored rows are constants.

Everything is functional and of fixed shape, so it runs under `jit` and the state can be
carried in a train state: `init` -> `update` after each step -> `contents` / `database` for the
next loss. Before the memory fills, the rows not yet written are marked invalid by a mask that
the query/database losses accept (`database_valid`).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses import _common


class MemoryState(NamedTuple):
  """The ring buffer.

  Attributes:
    embeddings: (M, D) stored embeddings, in the dtype given to `init`.
    labels: (M,) int32 stored labels.
    position: int32 scalar, the slot the next row is written to.
    count: int32 scalar, rows stored so far, at most M.
  """

  embeddings: jax.Array
  labels: jax.Array
  position: jax.Array
  count: jax.Array


def init(size: int, dim: int, dtype: jnp.dtype = jnp.float32) -> MemoryState:
  """An empty memory of `size` rows (M >= 1) of `dim` features (D >= 1)."""
  size = _common.positive_int("memory size", size)
  dim = _common.positive_int("dim", dim)
  return MemoryState(embeddings=jnp.zeros((size, dim), dtype),
                     labels=jnp.zeros((size,), jnp.int32),
                     position=jnp.zeros((), jnp.int32),
                     count=jnp.zeros((), jnp.int32))


def update(state: MemoryState, embeddings: jax.Array, labels: jax.Array) -> MemoryState:
  """`state` after appending a batch, the oldest rows overwritten first.

  Args:
    state: the memory.
    embeddings: (B, D) float embeddings of this step (any B; of a batch larger than the memory
      only the last M rows stay). No gradient flows into the memory.
    labels: (B,) integer labels.

  Returns:
    The new state (fixed shapes: the same as `state`'s).
  """
  size, dim = state.embeddings.shape
  embeddings, labels = _common.check_batch(embeddings, labels)
  if embeddings.shape[1] != dim:
    raise ValueError(f"the memory holds {dim}-d embeddings, got shape {embeddings.shape}")
  num_rows = labels.shape[0]
  kept = min(num_rows, size)  # static: a scatter with repeated slots has no defined winner
  slots = (state.position + (num_rows - kept) + jnp.arange(kept)) % size
  rows = jax.lax.stop_gradient(jnp.asarray(embeddings)[num_rows - kept:])
  return MemoryState(
      embeddings=state.embeddings.at[slots].set(rows.astype(state.embeddings.dtype)),
      labels=state.labels.at[slots].set(jnp.asarray(labels)[num_rows - kept:].astype(jnp.int32)),
      position=((state.position + num_rows) % size).astype(jnp.int32),
      count=jnp.minimum(state.count + num_rows, size).astype(jnp.int32))


def contents(state: MemoryState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored rows, oldest first, as constants.

  Returns:
    embeddings: (M, D), no gradient.
    labels: (M,) int32.
    valid: (M,) bool, True on the first `count` rows (those written so far); the other rows
      hold zeros and must be masked out.
  """
  size = state.labels.shape[0]
  oldest = (state.position - state.count) % size
  order = (oldest + jnp.arange(size)) % size
  valid = jnp.arange(size) < state.count
  chex.assert_shape(valid, (size,))
  return jax.lax.stop_gradient(state.embeddings[order]), state.labels[order], valid


def database(state: MemoryState, embeddings: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The batch followed by the memory: the database of the query/database losses.

  The first B rows are the batch itself (differentiable), which is how those losses find each
  query's own row; the memory's rows carry no gradient.

  Args:
    state: the memory (as it was before this step's `update`).
    embeddings: (B, D) float embeddings of the batch.
    labels: (B,) integer labels.

  Returns:
    database: (B + M, D) embeddings, in the batch's dtype.
    database_labels: (B + M,) int32.
    database_valid: (B + M,) bool, True on the batch and the memory's written rows.
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  stored, stored_labels, stored_valid = contents(state)
  embeddings = jnp.asarray(embeddings)
  return (jnp.concatenate([embeddings, stored.astype(embeddings.dtype)]),
          jnp.concatenate([jnp.asarray(labels).astype(jnp.int32), stored_labels]),
          jnp.concatenate([jnp.ones(labels.shape, bool), stored_valid]))
