"""knn against a brute-force NumPy float64 reference (full similarity matrix, stable argsort)."""

import importlib

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.evaluation import knn

# The module (the package exports its `knn` function under the same name).
knn_lib = importlib.import_module("recall_jax.evaluation.knn")


def exact_data(num, dim, seed, duplicates=0):
  """Multiples of 1/4 in [-1, 1]: every float32 inner product is exact, so exact ties are real ties.

  The last `duplicates` rows copy the first ones, so some similarities tie exactly.
  """
  x = np.random.default_rng(seed).integers(-4, 5, (num, dim)).astype(np.float32) / 4
  if duplicates:
    x[num - duplicates:] = x[:duplicates]
  return x


def reference_knn(queries, database, k, exclude_self):
  sims = queries.astype(np.float64) @ database.astype(np.float64).T
  if exclude_self:
    np.fill_diagonal(sims, -np.inf)
  # A stable sort of -sims ranks equal similarities by ascending database index.
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_leave_one_out_matches_reference_with_ties(block):
  x = exact_data(120, 5, seed=0, duplicates=30)
  k = 12
  sims, idx = knn(x, x, k, exclude_self=True, block=block)
  ref_sims, ref_idx = reference_knn(x, x, k, exclude_self=True)
  assert sims.dtype == np.float32 and idx.dtype == np.int32
  assert sims.shape == idx.shape == (120, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(sims, ref_sims.astype(np.float32))
  # The data really has ties inside the returned lists, so the tie rule was exercised.
  assert np.any(sims[:, 1:] == sims[:, :-1])


def test_self_excluded_by_index_even_when_a_duplicate_ranks_first():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((60, 4)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  x[40:] = x[:20]
  _, idx = knn(x, x, 59, exclude_self=True, block=16)
  rows = np.arange(60)
  assert not np.any(idx == rows[:, None])
  # Rows 40-59 duplicate rows 0-19: each query's duplicate ties with its own (excluded) similarity
  # and ranks first; a self-at-position-0 assumption would drop the duplicate instead.
  np.testing.assert_array_equal(idx[:20, 0], rows[40:])
  np.testing.assert_array_equal(idx[40:, 0], rows[:20])
  assert np.all(np.sort(idx, axis=1)
                == np.delete(np.tile(rows, (60, 1)), rows * 61).reshape(60, 59))


def test_blocked_equals_unblocked_for_separate_queries():
  db = exact_data(90, 6, seed=2, duplicates=10)
  queries = exact_data(33, 6, seed=3)
  full = knn(queries, db, 90, block=33)
  for block in (1, 5, 8, 32):
    blocked = knn(queries, db, 90, block=block)
    np.testing.assert_array_equal(blocked[1], full[1])
    np.testing.assert_array_equal(blocked[0], full[0])
  ref_sims, ref_idx = reference_knn(queries, db, 90, exclude_self=False)
  np.testing.assert_array_equal(full[1], ref_idx)


def test_continuous_data_matches_reference():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((200, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  sims, idx = knn(x, x, 10, exclude_self=True, block=48)
  ref_sims, ref_idx = reference_knn(x, x, 10, exclude_self=True)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


@pytest.mark.parametrize("queries, database, k, exclude_self, message", [
    (np.ones((4, 3)), np.ones((5, 3)), 6, False, "k must be"),
    (np.ones((5, 3)), np.ones((5, 3)), 5, True, "k must be"),
    (np.ones((4, 3)), np.ones((5, 3)), 0, False, "k must be"),
    (np.ones((4, 3)), np.ones((5, 2)), 1, False, "dimension"),
    (np.ones((4, 3)), np.ones((5, 3)), 1, True, "exclude_self"),
    (np.ones((4,)), np.ones((5, 3)), 1, False, "2-D"),
    (np.full((4, 3), np.nan), np.ones((5, 3)), 1, False, "NaN"),
    (np.ones((4, 3)), np.full((5, 3), np.inf), 1, False, "NaN or infinite"),
    (np.ones((4, 3), int), np.ones((5, 3)), 1, False, "floating point"),
])
def test_bad_input(queries, database, k, exclude_self, message):
  with pytest.raises(ValueError, match=message):
    knn(queries, database, k, exclude_self=exclude_self)


class BlockFunctionsInsideAndOutsideJitTest(chex.TestCase):
  """The per-block maths (similarities, self masking) means the same with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_similarities_and_self_mask_match_numpy(self):
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(6, 16)).astype(np.float32)
    database = rng.normal(size=(9, 16)).astype(np.float32)
    self_index = np.array([0, 3, -1, 8, 2, -1], np.int32)
    sims = self.variant(knn_lib.similarities)(jnp.asarray(queries), jnp.asarray(database))
    expected = queries.astype(np.float64) @ database.astype(np.float64).T
    chex.assert_shape(sims, (6, 9))
    chex.assert_trees_all_close(sims, expected.astype(np.float32), rtol=1e-6, atol=1e-5)
    masked = np.asarray(self.variant(knn_lib.mask_self)(sims, jnp.asarray(self_index)))
    for row, column in enumerate(self_index):
      keep = np.ones(9, bool)
      if column >= 0:
        keep[column] = False
        assert masked[row, column] == -np.inf
      np.testing.assert_array_equal(masked[row, keep], np.asarray(sims)[row, keep])
