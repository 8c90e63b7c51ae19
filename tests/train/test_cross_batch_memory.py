"""The cross-batch memory against a Python deque of (embedding, label) rows."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.train import cross_batch_memory as xbm


def _check_against_deque(state, reference, size, dim):
  embeddings, labels, valid = xbm.contents(state)
  count = len(reference)
  assert embeddings.shape == (size, dim) and labels.shape == (size,) and valid.shape == (size,)
  np.testing.assert_array_equal(np.asarray(valid), np.arange(size) < count)
  want = np.array([row for row, _ in reference]).reshape(count, dim)
  np.testing.assert_array_equal(np.asarray(embeddings)[:count], want)
  np.testing.assert_array_equal(np.asarray(labels)[:count], [label for _, label in reference])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("size, batch_sizes", [(10, [3, 3, 3, 3, 5, 1]),  # wraps mid-batch
                                               (4, [6, 2, 4, 1]),  # batches larger than M
                                               (6, [6, 6, 6])])
def test_matches_deque(jit, size, batch_sizes):
  dim = 3
  rng = np.random.default_rng(size)
  reference = collections.deque(maxlen=size)
  state = xbm.init(size, dim)
  update = jax.jit(xbm.update) if jit else xbm.update
  _check_against_deque(state, reference, size, dim)
  for batch_size in batch_sizes:
    embeddings = rng.standard_normal((batch_size, dim)).astype(np.float32)
    labels = rng.integers(0, 100, batch_size).astype(np.int32)
    state = update(state, embeddings, labels)
    reference.extend(zip(embeddings, labels.tolist()))
    _check_against_deque(state, reference, size, dim)
  assert state.embeddings.shape == (size, dim)  # fixed shapes: no retracing


def test_database_is_batch_then_memory():
  state = xbm.update(xbm.init(5, 2), np.ones((3, 2), np.float32), np.array([7, 8, 9]))
  batch = np.full((2, 2), 2.0, np.float32)
  database, labels, valid = xbm.database(state, batch, np.array([1, 2]))
  assert database.shape == (7, 2)
  np.testing.assert_array_equal(np.asarray(database[:2]), batch)
  np.testing.assert_array_equal(np.asarray(database[2:5]), np.ones((3, 2)))
  np.testing.assert_array_equal(np.asarray(labels[:5]), [1, 2, 7, 8, 9])
  np.testing.assert_array_equal(np.asarray(valid), [True] * 5 + [False] * 2)


def test_no_gradient_through_the_memory():
  state = xbm.update(xbm.init(4, 2), np.ones((4, 2), np.float32), np.arange(4))

  def total(batch, stored):
    memory = state._replace(embeddings=stored)
    database, _, _ = xbm.database(memory, batch, np.array([0, 1]))
    return jnp.sum(database ** 2)

  batch_grad, memory_grad = jax.grad(total, argnums=(0, 1))(jnp.ones((2, 2)), state.embeddings)
  np.testing.assert_array_equal(np.asarray(batch_grad), 2 * np.ones((2, 2)))
  np.testing.assert_array_equal(np.asarray(memory_grad), np.zeros((4, 2)))
  # Nor into what is written.
  written = jax.grad(lambda e: jnp.sum(xbm.update(state, e, np.arange(2)).embeddings))(
      jnp.ones((2, 2)))
  np.testing.assert_array_equal(np.asarray(written), np.zeros((2, 2)))


@pytest.mark.parametrize("args, match", [((0, 3), "memory size"), ((3, 0), "dim")])
def test_bad_sizes(args, match):
  with pytest.raises(ValueError, match=match):
    xbm.init(*args)


def test_bad_update():
  state = xbm.init(4, 3)
  with pytest.raises(ValueError, match="3-d"):
    xbm.update(state, np.ones((2, 2), np.float32), np.arange(2))
  with pytest.raises(ValueError, match="mismatch"):
    xbm.update(state, np.ones((2, 3), np.float32), np.arange(3))
