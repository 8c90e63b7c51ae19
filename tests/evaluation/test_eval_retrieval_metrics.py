"""retrieval_metrics against a brute-force NumPy float64 ranking and pytorch-metric-learning."""

import numpy as np
import pytest

from recall_jax.evaluation import metrics_from_ranks, retrieval_metrics

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
  ranks = [np.asarray(metrics_lib._positive_ranks_block(  # pylint: disable=protected-access
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
