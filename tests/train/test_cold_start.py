"""Cold-start diagnostics (`recall_jax.train.cold_start`) against brute-force NumPy ranks.

Serves both tasks; how each input layout embeds a batch for it is tested in test_layouts.py.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

from recall_jax.train import cold_start


def _normalise(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force_ranks(embeddings: np.ndarray, labels: np.ndarray) -> list[float]:
  """Every (query, positive) pair's 1-based rank among the other rows, float64, ties by index."""
  sims = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
  ranks = []
  for q in range(len(labels)):
    others = [j for j in range(len(labels)) if j != q]
    order = sorted(others, key=lambda j: (-sims[q, j], j))
    ranks += [order.index(p) + 1 for p in others if labels[p] == labels[q]]
  return ranks


def _batch(seed: int, num_rows: int = 24, dim: int = 8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, num_rows)  # unequal classes, singletons possible
  return _normalise(rng.normal(size=(num_rows, dim))), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positive_ranks_match_brute_force(seed):
  embeddings, labels = _batch(seed)
  ranks = np.asarray(cold_start.positive_ranks(embeddings, labels))
  num_positives = np.array([np.sum(labels == y) - 1 for y in labels])
  assert ranks.shape == (len(labels), num_positives.max())
  filled = np.arange(ranks.shape[1])[None, :] < num_positives[:, None]
  assert np.all(np.isnan(ranks[~filled]))
  # Row-major over (query, positive in row order), the brute force's order.
  np.testing.assert_array_equal(ranks[filled], _brute_force_ranks(embeddings, labels))


class MedianTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_median_matches_brute_force(self):
    embeddings, labels = _batch(3, num_rows=31)
    max_positives = int(np.bincount(labels).max()) - 1  # static: labels are traced under jit
    median = self.variant(cold_start.median_positive_rank, static_argnames="max_positives")(
        embeddings, labels, max_positives=max_positives)
    self.assertEqual(float(median), float(np.median(_brute_force_ranks(embeddings, labels))))


def test_ties_rank_the_lower_index_first():
  # Rows 1, 2 and 3 are identical: for query 0 they tie, and rank in index order.
  embeddings = _normalise(np.array([[1, 0], [1, 1], [1, 1], [1, 1], [-1, 0]], np.float32))
  labels = np.array([0, 0, 0, 0, 1])
  ranks = np.asarray(cold_start.positive_ranks(embeddings, labels))
  np.testing.assert_array_equal(ranks[0], [1, 2, 3])
  np.testing.assert_array_equal(ranks[0], _brute_force_ranks(embeddings, labels)[:3])


def test_no_positive_pair_gives_nan():
  embeddings, _ = _batch(4, num_rows=6)
  assert np.isnan(float(cold_start.median_positive_rank(embeddings, np.arange(6))))


def test_bad_input():
  embeddings, labels = _batch(5)
  with pytest.raises(ValueError, match="shape mismatch"):
    cold_start.median_positive_rank(embeddings, labels[:-1])
  with pytest.raises(ValueError, match="floating point"):
    cold_start.median_positive_rank(embeddings.astype(np.int32), labels)
  with pytest.raises(ValueError, match="max_positives"):
    cold_start.positive_ranks(embeddings, np.zeros_like(labels), max_positives=2)
  with pytest.raises(ValueError, match="rank_factor"):
    cold_start.diagnose_cold_start(embeddings, labels, rank_factor=0.5)
  with pytest.raises(ValueError, match="positive integer"):
    cold_start.diagnose_cold_start(embeddings, labels, k_values=(0, 1))


def _classes(num_rows: int = 64, num_classes: int = 16):
  return np.repeat(np.arange(num_classes), num_rows // num_classes)


def test_collapsed_batch_cannot_learn():
  labels = _classes()
  rng = np.random.default_rng(6)
  # A network at initialisation: every image close to one common direction.
  embeddings = _normalise(np.ones((len(labels), 16)) + 1e-3 * rng.normal(size=(len(labels), 16)))
  diagnosis = cold_start.diagnose_cold_start(embeddings, labels, k_values=(1, 2, 4, 8, 16))
  assert diagnosis.cannot_learn
  assert diagnosis.median_positive_rank > 16
  assert diagnosis.gradient_norm < 1e-4
  for remedy in ("model.pretrained", "model.center_head_init", "loss.warmup_name",
                 "loss.warmup_steps", "smooth_ap", "multi_similarity"):
    assert remedy in diagnosis.message


def test_well_separated_batch_can_learn():
  labels = _classes()
  rng = np.random.default_rng(7)
  centres = _normalise(rng.normal(size=(16, 16)))
  embeddings = _normalise(centres[labels] + 0.05 * rng.normal(size=(len(labels), 16)))
  diagnosis = cold_start.diagnose_cold_start(embeddings, labels, k_values=(1, 2, 4, 8, 16))
  assert not diagnosis.cannot_learn
  assert diagnosis.message is None
  assert diagnosis.median_positive_rank <= 3


def test_positives_far_beyond_k_cannot_learn_whatever_the_gradient():
  labels = _classes(num_rows=256, num_classes=64)
  rng = np.random.default_rng(8)
  embeddings = _normalise(rng.normal(size=(256, 16)))  # random: positives rank about B / 2
  diagnosis = cold_start.diagnose_cold_start(embeddings, labels, k_values=(1, 2, 4),
                                             gradient_tol=0.0)
  assert diagnosis.median_positive_rank > 4 * 4
  assert diagnosis.cannot_learn
  relaxed = cold_start.diagnose_cold_start(embeddings, labels, k_values=(1, 2, 4),
                                           gradient_tol=0.0, rank_factor=1000.0)
  assert not relaxed.cannot_learn


def _monitor_on(embed, steps=(0, 10)):
  said = []
  monitor = cold_start.ColdStartMonitor(lambda params: embed, k_values=(1, 2, 4, 8, 16),
                                        steps=steps, say=said.append, max_positives=3)
  return monitor, said


def test_monitor_says_once_on_a_collapsed_start():
  labels = _classes()
  rng = np.random.default_rng(9)
  collapsed = _normalise(np.ones((len(labels), 16)) + 1e-3 * rng.normal(size=(len(labels), 16)))
  embed = lambda images: collapsed[np.asarray(images)]  # "images" are row indices here
  monitor, said = _monitor_on(embed)
  rows = [monitor(step, None, np.arange(len(labels)), labels) for step in range(12)]
  logged = [(step, row) for step, row in enumerate(rows) if row is not None]
  assert [step for step, _ in logged] == [0, 10]
  for _, row in logged:
    assert row["cannot_learn"] == 1.0
    assert row["median_positive_rank"] > 16 and row["rsk_gradient_norm"] < 1e-4
  assert len(said) == 1 and "loss.warmup_name" in said[0]
  assert said[0].startswith("warning at step 0")


def test_monitor_is_silent_on_a_healthy_start():
  labels = _classes()
  rng = np.random.default_rng(10)
  centres = _normalise(rng.normal(size=(16, 16)))
  healthy = _normalise(centres[labels] + 0.05 * rng.normal(size=(len(labels), 16)))
  monitor, said = _monitor_on(lambda images: healthy[np.asarray(images)], steps=(0,))
  row = monitor(0, None, np.arange(len(labels)), labels)
  assert row["cannot_learn"] == 0.0 and row["median_positive_rank"] <= 3
  assert not said
