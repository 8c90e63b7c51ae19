"""The pair-based losses in query/database form (batch + memory) against float64 brute force."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses.contrastive import contrastive_database_loss
from recall_jax.losses.contrastive import contrastive_loss
from recall_jax.losses.multi_similarity import multi_similarity_database_loss
from recall_jax.losses.multi_similarity import multi_similarity_loss
from recall_jax.losses.recall_at_k import recall_at_k_database_loss
from recall_jax.losses.recall_at_k import recall_at_k_loss
from recall_jax.losses.smooth_ap import smooth_ap_database_loss
from recall_jax.losses.smooth_ap import smooth_ap_loss


def _sigmoid(x):
  x = min(max(x, -50.0), 50.0)
  return 1.0 / (1.0 + math.exp(-x))


def reference_recall_at_k(queries, query_labels, database, database_labels, valid,
                          k_values=(1, 2, 4), tau1=1.0, tau2=0.01, count_query_in_rank=True):
  """Loops over q, p, j; database row q is query q; only valid rows count."""
  s = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  rows = [j for j in range(len(database_labels)) if valid[j]]
  losses = []
  for q in range(len(query_labels)):
    positives = [p for p in rows if p != q and database_labels[p] == query_labels[q]]
    if not positives:
      continue
    recalls = []
    for k in k_values:
      hits = 0.0
      for p in positives:
        rank = 1.0 + sum(_sigmoid((s[q, j] - s[q, p]) / tau2) for j in rows
                         if j != p and (count_query_in_rank or j != q))
        hits += _sigmoid((k - rank) / tau1)
      recalls.append(min(hits, k) / min(k, len(positives)))
    losses.append(1.0 - sum(recalls) / len(recalls))
  return sum(losses) / len(losses)


def reference_smooth_ap(queries, query_labels, database, database_labels, valid,
                        temperature=0.01, include_query=False):
  s = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  losses = []
  for q in range(len(query_labels)):
    retrieval = [j for j in range(len(database_labels))
                 if valid[j] and (include_query or j != q)]
    positives = [j for j in retrieval if database_labels[j] == query_labels[q]]
    if not any(j != q for j in positives):
      continue
    ap = 0.0
    for p in positives:
      rank_pos = 1.0 + sum(_sigmoid((s[q, j] - s[q, p]) / temperature)
                           for j in positives if j != p)
      rank_all = 1.0 + sum(_sigmoid((s[q, j] - s[q, p]) / temperature)
                           for j in retrieval if j != p)
      ap += rank_pos / rank_all
    losses.append(1.0 - ap / len(positives))
  return sum(losses) / len(losses)


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batch_and_memory(seed, batch_size=10, memory_size=12, num_valid=8, dim=6):
  """A batch (classes of 1-3 rows), a memory sharing some classes, its last rows invalid."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.array([0, 0, 0, 1, 1, 2, 2, 3, 4, 5][:batch_size]))
  batch = _unit(rng.normal(size=(batch_size, dim)))
  memory = _unit(rng.normal(size=(memory_size, dim)))
  memory_labels = rng.integers(0, 8, memory_size)
  valid_memory = np.arange(memory_size) < num_valid
  # Rows not yet written hold garbage that must not count: huge values, the batch's labels.
  memory[~valid_memory] = 50.0
  memory_labels[~valid_memory] = labels[0]
  database = np.concatenate([batch, memory])
  database_labels = np.concatenate([labels, memory_labels]).astype(np.int32)
  valid = np.concatenate([np.ones(batch_size, bool), valid_memory])
  return batch, labels.astype(np.int32), database, database_labels, valid


LOSSES = [
    (recall_at_k_database_loss, reference_recall_at_k,
     [dict(k_values=(1, 2, 4)), dict(k_values=(1, 3), tau2=0.05, count_query_in_rank=False)]),
    (smooth_ap_database_loss, reference_smooth_ap,
     [dict(), dict(temperature=0.05, include_query=True)]),
]


@pytest.mark.usefixtures("x64")  # float64 references
class DatabaseFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_and_memory_match_brute_force(self):
    for loss_fn, reference, cases in LOSSES:
      for kwargs in cases:
        fn = self.variant(functools.partial(loss_fn, max_positives=6, query_block=4, **kwargs))
        for seed in range(2):
          q, ql, db, dbl, valid = _batch_and_memory(seed)
          got = fn(jnp.asarray(q), jnp.asarray(ql), jnp.asarray(db), jnp.asarray(dbl),
                   database_valid=jnp.asarray(valid))
          assert got.dtype == jnp.float64
          np.testing.assert_allclose(float(got), reference(q, ql, db, dbl, valid, **kwargs),
                                     rtol=1e-10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_as_database_equals_batch_loss(self):
    pairs = [(recall_at_k_database_loss, recall_at_k_loss, dict(k_values=(1, 2, 4))),
             (smooth_ap_database_loss, smooth_ap_loss, dict(include_query=True))]
    for database_fn, batch_fn, kwargs in pairs:
      kwargs = dict(kwargs, max_positives=2)
      for seed in range(2):
        e, labels = (jnp.asarray(x) for x in _batch_and_memory(seed)[:2])
        as_database = lambda e, y, f=database_fn, kw=kwargs: f(e, y, e, y, **kw)
        got, got_grad = self.variant(jax.value_and_grad(as_database))(e, labels)
        want, want_grad = jax.value_and_grad(functools.partial(batch_fn, **kwargs))(e, labels)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-12)


@pytest.mark.parametrize("loss_fn, reference, kwargs", [
    (recall_at_k_database_loss, reference_recall_at_k, dict(k_values=(1, 2), tau2=0.1)),
    (smooth_ap_database_loss, reference_smooth_ap, dict(temperature=0.1)),
])
def test_gradient_through_the_batch_matches_finite_differences(x64, loss_fn, reference,
                                                               kwargs):
  """The batch is both the queries and the head of the database; the memory is constant."""
  q, ql, db, dbl, valid = _batch_and_memory(3)
  memory = db[len(ql):]

  def loss_of_batch(batch):
    database = jnp.concatenate([batch, jax.lax.stop_gradient(memory)])
    return loss_fn(batch, ql, database, dbl, database_valid=valid, **kwargs)

  grad = np.asarray(jax.grad(loss_of_batch)(jnp.asarray(q)))
  eps = 1e-6
  numeric = np.zeros_like(q)
  for index in np.ndindex(*q.shape):
    step = np.zeros_like(q)
    step[index] = eps
    plus, minus = q + step, q - step
    numeric[index] = (reference(plus, ql, np.concatenate([plus, memory]), dbl, valid, **kwargs)
                      - reference(minus, ql, np.concatenate([minus, memory]), dbl, valid,
                                  **kwargs)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_invalid_rows_are_as_good_as_absent(x64):
  q, ql, db, dbl, valid = _batch_and_memory(4)
  for loss_fn in (recall_at_k_database_loss, smooth_ap_database_loss):
    masked = loss_fn(q, ql, db, dbl, database_valid=valid)
    dropped = loss_fn(q, ql, db[valid], dbl[valid])
    np.testing.assert_allclose(float(masked), float(dropped), rtol=1e-12)


def test_traced_labels_with_too_few_slots_give_nan():
  q, ql, db, dbl, valid = _batch_and_memory(5)
  fn = jax.jit(functools.partial(recall_at_k_database_loss, k_values=(1, 2), max_positives=1))
  assert np.isnan(float(fn(q.astype(np.float32), ql, db.astype(np.float32), dbl,
                           database_valid=valid)))
  with pytest.raises(ValueError, match="positives"):
    recall_at_k_database_loss(q, ql, db, dbl, database_valid=valid, k_values=(1, 2),
                              max_positives=1)


@pytest.mark.parametrize("loss_fn", [recall_at_k_database_loss, smooth_ap_database_loss])
def test_constant_labels_closed_over_under_jit(loss_fn):
  """Labels and mask held as JAX constants by a jitted function (only the embeddings traced)
  give the eager loss: the checks read constants without tracing them."""
  q, ql, db, dbl, valid = (jnp.asarray(x) for x in _batch_and_memory(6))
  q, db = q.astype(jnp.float32), db.astype(jnp.float32)
  memory = db[len(ql):]
  fn = jax.jit(lambda e: loss_fn(e, ql, jnp.concatenate([e, memory]), dbl,
                                 database_valid=valid, max_positives=4))
  np.testing.assert_allclose(float(fn(q)), float(loss_fn(q, ql, db, dbl, database_valid=valid,
                                                          max_positives=4)), rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [recall_at_k_database_loss, smooth_ap_database_loss])
def test_bad_input(loss_fn):
  q, ql, db, dbl, valid = _batch_and_memory(6)
  q, db = q.astype(np.float32), db.astype(np.float32)
  bad = [
      ((q, ql, db[:, :3], dbl), {}, "-d"),
      ((q, ql, db[:5], dbl[:5]), {}, "must start with"),
      ((q, ql, db[::-1].copy(), dbl), {}, "first B"),
      ((q, ql, db, np.roll(dbl, 1)), {}, "query labels"),
      ((q, ql, db, dbl), {"database_valid": valid.astype(int)}, "bool mask"),
      ((q, ql, db, dbl), {"database_valid": ~valid}, "must be valid"),
      ((q, ql, db, dbl[:-1]), {}, "mismatch"),
  ]
  for args, kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      loss_fn(*args, **kwargs)


def reference_contrastive(queries, query_labels, database, database_labels, valid,
                          pos_margin=0.0, neg_margin=0.5):
  s = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  pos, neg = [], []
  for q in range(len(query_labels)):
    for j in range(len(database_labels)):
      if not valid[j] or j == q:
        continue
      if database_labels[j] == query_labels[q]:
        pos.append(max(0.0, (1 - pos_margin) - s[q, j]))
      else:
        neg.append(max(0.0, s[q, j] - (1 - neg_margin)))
  mean_nonzero = lambda xs: sum(xs) / max(1, sum(x > 0 for x in xs))
  return mean_nonzero(pos) + mean_nonzero(neg)


def reference_multi_similarity(queries, query_labels, database, database_labels, valid,
                               alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
  s = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  rows = [j for j in range(len(database_labels)) if valid[j]]
  candidates = [([j for j in rows if j != q and database_labels[j] == query_labels[q]],
                 [j for j in rows if database_labels[j] != query_labels[q]])
                for q in range(len(query_labels))]
  if not any(p for p, _ in candidates) or not any(n for _, n in candidates):
    return 0.0
  total = 0.0
  for q, (positives, negatives) in enumerate(candidates):
    hard_pos = [p for p in positives if negatives and s[q, p] - epsilon < max(s[q, negatives])]
    hard_neg = [n for n in negatives if positives and s[q, n] + epsilon > min(s[q, positives])]
    total += math.log1p(sum(math.exp(-alpha * (s[q, p] - base)) for p in hard_pos)) / alpha
    total += math.log1p(sum(math.exp(beta * (s[q, n] - base)) for n in hard_neg)) / beta
  return total / len(query_labels)


PAIR_LOSSES = [
    (contrastive_database_loss, contrastive_loss, reference_contrastive,
     dict(pos_margin=0.1, neg_margin=0.6)),
    (multi_similarity_database_loss, multi_similarity_loss, reference_multi_similarity,
     dict(alpha=3.0, epsilon=0.2)),
]


@pytest.mark.usefixtures("x64")  # float64 references
class PairLossDatabaseFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_and_memory_match_brute_force(self):
    for database_fn, _, reference, kwargs in PAIR_LOSSES:
      fn = self.variant(functools.partial(database_fn, **kwargs))
      for seed in range(2):
        q, ql, db, dbl, valid = _batch_and_memory(seed)
        got = fn(jnp.asarray(q), jnp.asarray(ql), jnp.asarray(db), jnp.asarray(dbl),
                 database_valid=jnp.asarray(valid))
        np.testing.assert_allclose(float(got), reference(q, ql, db, dbl, valid, **kwargs),
                                   rtol=1e-10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_as_database_equals_batch_loss(self):
    for database_fn, batch_fn, _, kwargs in PAIR_LOSSES:
      e, labels = (jnp.asarray(x) for x in _batch_and_memory(7)[:2])
      as_database = lambda e, y, f=database_fn, kw=kwargs: f(e, y, e, y, **kw)
      got, got_grad = self.variant(jax.value_and_grad(as_database))(e, labels)
      want, want_grad = jax.value_and_grad(functools.partial(batch_fn, **kwargs))(e, labels)
      np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
      np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-12)


@pytest.mark.parametrize("loss_fn", [contrastive_database_loss, multi_similarity_database_loss])
def test_pair_losses_reject_a_database_without_the_queries(loss_fn):
  q, ql, db, dbl, _ = _batch_and_memory(8)
  with pytest.raises(ValueError, match="first B"):
    loss_fn(q.astype(np.float32), ql, db[::-1].astype(np.float32), dbl)
