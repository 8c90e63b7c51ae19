"""Tests for recall_jax.evaluation.query_expansion against a NumPy float64 reference."""

import numpy as np
import pytest

from recall_jax import errors
from recall_jax.evaluation import query_expansion as qe


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(rows, database, k, alpha, exclude_self):
  """Full argsort in float64: x + sum over the k most similar of max(s, 0)^alpha d."""
  out = []
  for i, x in enumerate(rows):
    sims = database @ x
    order = [j for j in np.argsort(-sims, kind="stable") if not (exclude_self and j == i)][:k]
    out.append(x + sum(max(sims[j], 0.0)**alpha * database[j] for j in order))
  return unit(np.array(out))


def descriptors(seed, n, d=8):
  return unit(np.random.default_rng(seed).normal(size=(n, d)))


@pytest.mark.parametrize("k,alpha,block_size", [(1, 3.0, 256), (3, 3.0, 4), (5, 0.0, 7),
                                                (2, 1.5, 1)])
def test_query_expansion_matches_numpy(k, alpha, block_size):
  queries, database = descriptors(0, 10), descriptors(1, 30)
  got = np.asarray(qe.query_expansion(queries.astype(np.float32), database.astype(np.float32),
                                      k=k, alpha=alpha, block_size=block_size))
  np.testing.assert_allclose(got, reference(queries, database, k, alpha, False), atol=1e-5)


@pytest.mark.parametrize("k,block_size", [(1, 256), (4, 6)])
def test_database_augmentation_excludes_self_and_matches_numpy(k, block_size):
  database = descriptors(2, 20)
  got = np.asarray(qe.database_augmentation(database.astype(np.float32), k=k, alpha=3.0,
                                            block_size=block_size))
  np.testing.assert_allclose(got, reference(database, database, k, 3.0, True), atol=1e-5)
  # Were the item its own neighbour, k = 1 would leave it unchanged.
  assert np.abs(got - database).max() > 1e-2


def test_expand_descriptors_is_off_by_default_and_chains_dba_then_qe():
  queries, database = descriptors(3, 5), descriptors(4, 25)
  q, db = qe.expand_descriptors(queries, database)
  np.testing.assert_allclose(np.asarray(q), queries, atol=1e-7)
  np.testing.assert_allclose(np.asarray(db), database, atol=1e-7)
  q, db = qe.expand_descriptors(queries, database, qe_k=2, dba_k=3, qe_alpha=2.0, dba_alpha=1.0)
  want_db = reference(database, database, 3, 1.0, True)
  np.testing.assert_allclose(np.asarray(db), want_db, atol=1e-5)
  np.testing.assert_allclose(np.asarray(q), reference(queries, want_db, 2, 2.0, False), atol=1e-5)


def test_negative_similarities_get_zero_weight():
  database = np.array([[0.6, -0.8], [-1.0, 0.0]])  # Similarities -0.8 and 0.
  got = np.asarray(qe.query_expansion(np.array([[0.0, 1.0]]), database, k=2, alpha=1.0))
  np.testing.assert_allclose(got, [[0.0, 1.0]], atol=1e-7)


def test_bad_arguments_raise():
  database = descriptors(5, 4)
  with pytest.raises(errors.ConfigError, match="exceeds"):
    qe.database_augmentation(database, k=4)
  with pytest.raises(errors.ConfigError, match="exceeds"):
    qe.query_expansion(database, database, k=5)
  with pytest.raises(errors.ConfigError):
    qe.query_expansion(database, database, k=-1)
  with pytest.raises(AssertionError):
    qe.query_expansion(database[:, :3], database, k=1)
