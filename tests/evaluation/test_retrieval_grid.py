"""Retrieval grid: exact neighbours (query excluded by index) and the PNG."""

import numpy as np
import pytest

from recall_jax.evaluation import SetEmbeddings, retrieval_grid
from recall_jax.evaluation.retrieval_grid import neighbours_of


def brute_force(queries, database, k, self_rows=None):
  sims = queries.astype(np.float64) @ database.T.astype(np.float64)
  if self_rows is not None:
    sims[np.arange(len(queries)), self_rows] = -np.inf
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_leave_one_out_neighbours_exclude_the_query_and_keep_its_duplicates():
  rng = np.random.default_rng(0)
  x = rng.integers(-4, 5, (40, 6)).astype(np.float32) / 4  # exact products, many ties
  x[30:] = x[:10]  # duplicates: query i (i < 10) retrieves row 30 + i, not itself
  rows = np.array([0, 3, 9, 17, 31, 39])
  got = neighbours_of(SetEmbeddings(x, np.zeros(40)), rows, 7)
  np.testing.assert_array_equal(got, brute_force(x[rows], x, 7, self_rows=rows))
  assert not np.any(got == rows[:, None])


def test_separate_queries_search_the_gallery():
  rng = np.random.default_rng(1)
  gallery = rng.integers(-4, 5, (25, 5)).astype(np.float32) / 4
  queries = rng.integers(-4, 5, (6, 5)).astype(np.float32) / 4
  embedded = SetEmbeddings(gallery, np.zeros(25), queries, np.zeros(6))
  rows = np.array([1, 4])
  np.testing.assert_array_equal(neighbours_of(embedded, rows, 25), brute_force(queries[rows],
                                                                              gallery, 25))


@pytest.mark.parametrize("separate", [False, True])
def test_grid_png(tmp_path, separate):
  rng = np.random.default_rng(2)
  emb = rng.standard_normal((12, 4)).astype(np.float32)
  labels = np.repeat(np.arange(3), 4)
  embedded = (SetEmbeddings(emb, labels, emb[:5], labels[:5]) if separate else
              SetEmbeddings(emb, labels))
  images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  out = retrieval_grid(embedded, lambda i: images[i], tmp_path / "grid.png", num_queries=3, k=4)
  assert out.stat().st_size > 1000
