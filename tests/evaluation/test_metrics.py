"""retrieval_metrics against a brute-force NumPy float64 ranking and pytorch-metric-learning.

Both rank paths are covered: query blocks against the whole database, and the symmetric
leave-one-out tiles (`symmetric_ranks`), forced with `symmetric=` and compared with each other.
"""

import chex
import jax
import numpy as np
import pytest

from recall_jax.evaluation import metrics as metrics_lib
from recall_jax.evaluation import metrics_from_ranks, retrieval_metrics
from recall_jax.evaluation import symmetric_ranks

KEYS = ("precision@1", "r_precision", "map@r", "map")


def exact_data(num, dim, seed, duplicates=0):
  """Multiples of 1/4: float32 inner products are exact, so ties in float32 are ties in float64."""
  x = np.random.default_rng(seed).integers(-4, 5, (num, dim)).astype(np.float32) / 4
  if duplicates:
    x[num - duplicates:] = x[:duplicates]
  return x


def reference_metrics(db, db_labels, k_values, queries=None, q_labels=None):
  """Full similarity matrix, stable argsort (lower index first on ties), metrics per query."""
  leave_one_out = queries is None
  if leave_one_out:
    queries, q_labels = db, db_labels
  sims = queries.astype(np.float64) @ db.astype(np.float64).T
  order = np.argsort(-sims, axis=1, kind="stable")
  per_query = {f"recall@{k}": [] for k in k_values}
  per_query.update({key: [] for key in KEYS})
  excluded = 0
  for i in range(len(queries)):
    ranking = order[i]
    if leave_one_out:
      ranking = ranking[ranking != i]
    relevant = db_labels[ranking] == q_labels[i]
    r = int(relevant.sum())
    if r == 0:
      excluded += 1
      continue
    precision_at = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    for k in k_values:
      per_query[f"recall@{k}"].append(float(relevant[:k].any()))
    per_query["precision@1"].append(float(relevant[0]))
    per_query["r_precision"].append(relevant[:r].sum() / r)
    per_query["map@r"].append((precision_at[:r] * relevant[:r]).sum() / r)
    per_query["map"].append((precision_at * relevant).sum() / r)
  out = {key: float(np.mean(values)) for key, values in per_query.items()}
  out["num_queries"] = len(queries) - excluded
  out["num_queries_without_positives"] = excluded
  return out


def assert_metrics_equal(actual, expected, atol=1e-12):
  assert set(actual) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, rtol=0, atol=atol, err_msg=key)


@pytest.mark.parametrize("block", [3, 16, 1024])
def test_leave_one_out_with_ties_matches_reference(block):
  x = exact_data(150, 4, seed=0, duplicates=40)
  labels = np.random.default_rng(1).integers(0, 25, 150)
  labels[149] = 1000  # a singleton class: no positive, excluded and counted
  k_values = (1, 2, 5, 30, 149)
  actual = retrieval_metrics(x, labels, k_values=k_values, block=block)
  expected = reference_metrics(x, labels, k_values)
  assert expected["num_queries_without_positives"] == 1
  assert_metrics_equal(actual, expected)


def test_query_database_mode_and_wide_classes():
  # One 70-item class makes a wide positive list; queries of absent labels are excluded.
  rng = np.random.default_rng(2)
  db = exact_data(160, 5, seed=3, duplicates=30)
  db_labels = np.concatenate([np.zeros(70, int), rng.integers(1, 30, 90)])
  queries = np.concatenate([exact_data(40, 5, seed=4), db[:10]])
  q_labels = np.concatenate([rng.integers(0, 35, 40), db_labels[:10]])
  k_values = (1, 4, 160)
  for block in (8, 50):
    actual = retrieval_metrics(db, db_labels, k_values=k_values, query_embeddings=queries,
                               query_labels=q_labels, block=block)
    expected = reference_metrics(db, db_labels, k_values, queries, q_labels)
    assert expected["num_queries_without_positives"] > 0
    assert_metrics_equal(actual, expected)


def test_metrics_from_ranks_by_hand():
  # Positives at ranks 3 and 1 (R = 2), and a single positive at rank 4 (R = 1, padded).
  ranks = np.array([[3, 1], [4, 99]])
  out = metrics_from_ranks(ranks, np.array([2, 1]), k_values=(1, 3))
  np.testing.assert_allclose(out["recall@1"], [1, 0])
  np.testing.assert_allclose(out["recall@3"], [1, 0])
  np.testing.assert_allclose(out["precision@1"], [1, 0])
  np.testing.assert_allclose(out["r_precision"], [0.5, 0])
  np.testing.assert_allclose(out["map@r"], [0.5, 0])
  np.testing.assert_allclose(out["map"], [(1 + 2 / 3) / 2, 0.25])


def test_matches_pytorch_metric_learning():
  pytest.importorskip("torch", reason="torch is an optional test extra (pip install torch)")
  pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator",
                            reason="pytorch-metric-learning is an optional test extra")
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = rng.standard_normal((400, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = np.repeat(np.arange(50), 8)[rng.permutation(400)]
  labels[:20] = labels[20:40]  # uneven class sizes
  calculator = pml.AccuracyCalculator(
      include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
      k="max_bin_count", device=torch.device("cpu"))
  expected = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
  actual = retrieval_metrics(x, labels, k_values=(1,), block=64)
  assert actual["num_queries_without_positives"] == 0
  np.testing.assert_allclose(actual["precision@1"], expected["precision_at_1"], atol=1e-6)
  np.testing.assert_allclose(actual["r_precision"], expected["r_precision"], atol=1e-6)
  np.testing.assert_allclose(actual["map@r"], expected["mean_average_precision_at_r"], atol=1e-6)
  # And a separate query set.
  queries = rng.standard_normal((60, 32)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  q_labels = rng.integers(0, 50, 60)
  expected = calculator.get_accuracy(torch.from_numpy(queries), torch.from_numpy(q_labels),
                                     torch.from_numpy(x), torch.from_numpy(labels))
  actual = retrieval_metrics(x, labels, k_values=(1,), query_embeddings=queries,
                             query_labels=q_labels)
  np.testing.assert_allclose(actual["precision@1"], expected["precision_at_1"], atol=1e-6)
  np.testing.assert_allclose(actual["r_precision"], expected["r_precision"], atol=1e-6)
  np.testing.assert_allclose(actual["map@r"], expected["mean_average_precision_at_r"], atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(4, int), k_values=(1,)), "shape \\(5,\\)"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5), k_values=(1,)), "integers"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(5,)), "k=5 exceeds"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=()), "empty"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(0,)), "positive"),
    (dict(embeddings=np.full((5, 3), np.nan), labels=np.zeros(5, int), k_values=(1,)), "NaN"),
    (dict(embeddings=np.ones((5, 3)), labels=np.arange(5), k_values=(1,)), "no query"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(1,),
          query_embeddings=np.ones((2, 3))), "together"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(1,),
          query_embeddings=np.ones((2, 4)), query_labels=np.zeros(2, int)), "dimension"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(1,),
          query_embeddings=np.ones((2, 3)), query_labels=np.zeros(3, int)), "query_labels"),
    (dict(embeddings=np.ones((5, 3)), labels=np.zeros(5, int), k_values=(6,),
          query_embeddings=np.ones((2, 3)), query_labels=np.zeros(2, int)), "k=6 exceeds"),
])
def test_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    retrieval_metrics(**kwargs)


def test_accelerator_layout_counts_the_same_ranks():
  # On GPU/TPU the whole block is one compare-and-reduce (rows_per_step = block); on CPU 8 rows
  # per step. Both layouts run here on CPU and must give identical ranks.
  import jax  # pylint: disable=g-import-not-at-top
  from recall_jax.evaluation import data_mesh  # pylint: disable=g-import-not-at-top
  from recall_jax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  x = exact_data(64, 4, seed=6, duplicates=16)
  rng = np.random.default_rng(7)
  positives = rng.integers(0, 64, (32, 8)).astype(np.int32)
  valid = rng.random((32, 8)) < 0.7
  self_index = np.arange(32, dtype=np.int32)
  mesh = data_mesh(jax.devices()[:1])
  ranks = [np.asarray(metrics_lib.positive_ranks_block(
      x[:32], x, self_index, positives, valid, mesh=mesh, rows_per_step=rows))
      for rows in (8, 32)]
  np.testing.assert_array_equal(ranks[0], ranks[1])
  # And both equal brute force: 1 + items (self excluded) above, ties broken by lower index.
  sims = x[:32].astype(np.float64) @ x.T.astype(np.float64)
  np.fill_diagonal(sims[:, :32], -np.inf)
  t = np.take_along_axis(sims, positives, axis=1)
  cols = np.arange(64)
  above = (sims[:, None, :] > t[:, :, None]) | (
      (sims[:, None, :] == t[:, :, None]) & (cols < positives[:, :, None]))
  np.testing.assert_array_equal(ranks[0], np.where(valid, above.sum(-1) + 1, 65))


def brute_force_ranks(x, labels):
  """{query: sorted 1-based ranks of its positives} by a float64 stable sort, self excluded."""
  sims = x.astype(np.float64) @ x.T.astype(np.float64)
  order = np.argsort(-sims, axis=1, kind="stable")
  out = {}
  for i in range(len(x)):
    ranking = order[i][order[i] != i]
    ranks = np.flatnonzero(labels[ranking] == labels[i]) + 1
    if ranks.size:
      out[i] = ranks
  return out


def tie_heavy_data(num=150, seed=0):
  """Exact data with duplicates far apart (ties across tiles), singletons and uneven classes."""
  x = exact_data(num, 4, seed=seed, duplicates=40)
  rng = np.random.default_rng(seed + 1)
  labels = rng.integers(0, num // 6, num)
  labels[:12] = np.arange(1000, 1012)  # singletons: database items that are never queries
  labels[40:49] = 2000  # a 9-item class
  return x, labels


@pytest.mark.parametrize("block", [3, 16, 40, 1024])
def test_symmetric_path_equals_query_blocks_and_reference(block):
  # Small blocks make many tiles (of 16 at least: the largest class) with padding; block 3 is also
  # smaller than several classes. The whole ranking is one tile with block 1024.
  x, labels = tie_heavy_data()
  k_values = (1, 2, 5, 30, 149)
  symmetric = retrieval_metrics(x, labels, k_values=k_values, block=block, symmetric=True)
  query_blocks = retrieval_metrics(x, labels, k_values=k_values, block=block, symmetric=False)
  assert symmetric == query_blocks
  assert retrieval_metrics(x, labels, k_values=k_values, block=block) == symmetric  # auto
  expected = reference_metrics(x, labels, k_values)
  assert expected["num_queries_without_positives"] >= 12
  assert_metrics_equal(symmetric, expected)


@pytest.mark.parametrize("tile", [16, 24])
def test_symmetric_ranks_equal_brute_force(tile):
  x, labels = tie_heavy_data(num=90, seed=3)
  expected = brute_force_ranks(x, labels)
  got = {}
  for ids, ranks in symmetric_ranks.leave_one_out_ranks(x, labels.astype(np.int64), tile=tile,
                                                        device=jax.devices()[0]):
    assert ranks.shape[0] == ids.size
    for i, row in zip(ids, ranks):
      assert np.all(row[row > len(x)] == len(x) + 1)  # padding slots
      got[int(i)] = np.sort(row[row <= len(x)])
  assert got.keys() == expected.keys()
  for i, ranks in expected.items():
    np.testing.assert_array_equal(got[i], ranks, err_msg=f"query {i}")


def test_symmetric_path_with_a_class_larger_than_the_block():
  # A 30-item class and block 8: forced, the tile grows to 32; auto also takes it here because a
  # 32 x 32 tile is no more memory than the 8 x 150 query block.
  x, labels = tie_heavy_data()
  labels[60:90] = 3000
  k_values = (1, 3, 100)
  expected = reference_metrics(x, labels, k_values)
  symmetric = retrieval_metrics(x, labels, k_values=k_values, block=8, symmetric=True)
  assert symmetric == retrieval_metrics(x, labels, k_values=k_values, block=8, symmetric=False)
  assert_metrics_equal(symmetric, expected)
  assert metrics_lib.symmetric_tile(8, 150, 30) == (32, True)


def test_auto_falls_back_to_query_blocks_when_a_tile_would_be_too_big():
  # One class of 100 out of 120 with block 8: a 104 x 104 tile exceeds 8 x 120, so auto uses query
  # blocks; forcing the symmetric path still gives the same exact metrics.
  symmetric_tile = metrics_lib.symmetric_tile
  assert symmetric_tile(8, 120, 100) == (104, False)
  assert symmetric_tile(2048, 120, 100) == (120, True)
  x = exact_data(120, 4, seed=8, duplicates=30)
  labels = np.concatenate([np.zeros(100, int), np.arange(1, 21) % 7 + 1])
  k_values = (1, 10)
  expected = reference_metrics(x, labels, k_values)
  auto = retrieval_metrics(x, labels, k_values=k_values, block=8)
  assert auto == retrieval_metrics(x, labels, k_values=k_values, block=8, symmetric=True)
  assert_metrics_equal(auto, expected)


def test_pack_classes_keeps_classes_whole_and_smallest_first():
  labels = np.array([5, 1, 5, 2, 2, 2, 9, 5, 1, 7, 7, 7, 7])
  packing = symmetric_ranks.pack_classes(labels, tile=5)
  items = packing.items
  real = items != symmetric_ranks.PADDING
  np.testing.assert_array_equal(np.sort(items[real]), np.arange(labels.size))
  sizes = []
  for t in range(items.shape[0]):
    tile_labels = labels[items[t][real[t]]]
    for label in tile_labels[np.sort(np.unique(tile_labels, return_index=True)[1])]:
      slots = np.flatnonzero(real[t] & (labels[np.where(real[t], items[t], 0)] == label))
      # Whole class, contiguous, ascending original indices, with its start and size recorded.
      np.testing.assert_array_equal(items[t][slots], np.flatnonzero(labels == label))
      np.testing.assert_array_equal(slots, np.arange(slots[0], slots[0] + slots.size))
      assert np.all(packing.class_start[t][slots] == slots[0])
      assert np.all(packing.class_size[t][slots] == slots.size)
      sizes.append(slots.size)
  assert sizes == sorted(sizes)
  assert np.all(packing.class_size[~real] == 0)
  with pytest.raises(ValueError, match="does not fit a tile of 3"):
    symmetric_ranks.pack_classes(labels, tile=3)


def test_column_counts_are_row_counts_of_the_transpose():
  rng = np.random.default_rng(9)
  sims = rng.integers(-3, 4, (16, 24)).astype(np.float32)  # many exact ties
  thresholds = rng.integers(-3, 4, (24, 5)).astype(np.float32)
  positives = rng.integers(0, 40, (24, 5)).astype(np.int32)
  rows_index = rng.permutation(40)[:16].astype(np.int32)
  by_column = symmetric_ranks.count_above_by_column(sims, thresholds, positives, rows_index, 8)
  by_row = symmetric_ranks.count_above_by_row(sims.T, thresholds, positives, rows_index, 8)
  np.testing.assert_array_equal(by_column, by_row)
  above = (sims.T[:, None, :] > thresholds[:, :, None]) | (
      (sims.T[:, None, :] == thresholds[:, :, None]) & (rows_index < positives[:, :, None]))
  np.testing.assert_array_equal(by_row, above.sum(-1))


def test_symmetric_needs_leave_one_out():
  x = exact_data(20, 3, seed=10)
  labels = np.arange(20) % 4
  with pytest.raises(ValueError, match="symmetric=True needs leave-one-out"):
    retrieval_metrics(x, labels, k_values=(1,), query_embeddings=x[:5], query_labels=labels[:5],
                      symmetric=True)


class TileCountsInsideAndOutsideJitTest(chex.TestCase):
  """The symmetric path's tile counts mean the same with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_counts_match_brute_force(self):
    rng = np.random.default_rng(10)
    sims = rng.integers(-3, 4, (16, 24)).astype(np.float32)  # many exact ties
    thresholds = rng.integers(-3, 4, (24, 5)).astype(np.float32)
    positives = rng.integers(0, 40, (24, 5)).astype(np.int32)
    rows_index = rng.permutation(40)[:16].astype(np.int32)
    above = (sims.T[:, None, :] > thresholds[:, :, None]) | (
        (sims.T[:, None, :] == thresholds[:, :, None]) & (rows_index < positives[:, :, None]))
    by_row = self.variant(symmetric_ranks.count_above_by_row, static_argnums=4)
    by_column = self.variant(symmetric_ranks.count_above_by_column, static_argnums=4)
    chex.assert_trees_all_equal(by_row(sims.T, thresholds, positives, rows_index, 8),
                                above.sum(-1))
    chex.assert_trees_all_equal(by_column(sims, thresholds, positives, rows_index, 8),
                                above.sum(-1))
