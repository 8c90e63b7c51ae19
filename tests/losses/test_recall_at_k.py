"""RS@k against an independent float64 NumPy reference written with explicit loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import recall_at_k_surrogate
from recall_jax.losses import recall_at_k_surrogate_from_similarity


def _sigmoid(x):
  x = min(max(x, -50.0), 50.0)
  return 1.0 / (1.0 + math.exp(-x))


def reference_loss(emb, labels, k_values=(1, 2, 4, 8, 16), tau1=1.0, tau2=0.01,
                   count_query_in_rank=True):
  """The RS@k formula, the slow and obvious way (loops over q, p, j), in float64."""
  emb = np.asarray(emb, np.float64)
  sim = emb @ emb.T
  n = len(labels)
  losses = []
  for q in range(n):
    positives = [p for p in range(n) if p != q and labels[p] == labels[q]]
    if not positives:
      continue
    rank = {}
    for p in positives:
      r = 1.0
      for j in range(n):
        if j == p or (j == q and not count_query_in_rank):
          continue
        r += _sigmoid((sim[q, j] - sim[q, p]) / tau2)
      rank[p] = r
    recalls = []
    for k in k_values:
      hits = sum(_sigmoid((k - rank[p]) / tau1) for p in positives)
      recalls.append(min(hits, k) / min(k, len(positives)))
    losses.append(1.0 - sum(recalls) / len(recalls))
  return sum(losses) / len(losses)


def random_batch(seed, class_sizes, dim=8, singletons=2, dtype=np.float64):
  """Unequal classes, shuffled rows, labels not contiguous, plus rows without a positive."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(s, 7 * c + 3) for c, s in enumerate(class_sizes)] +
                          [np.array([1000 + i for i in range(singletons)])])
  labels = rng.permutation(labels)
  emb = rng.normal(size=(len(labels), dim))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return emb.astype(dtype), labels.astype(np.int32)


CASES = [
    dict(),
    dict(count_query_in_rank=False),
    dict(k_values=(1, 3), tau1=0.5, tau2=0.05),
    dict(k_values=(2, 4, 8), tau2=0.1, count_query_in_rank=False),
    dict(k_values=(1,), tau1=2.0, tau2=0.005),
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_float64(x64, kwargs, seed):
  emb, labels = random_batch(seed, class_sizes=[2, 3, 5, 4, 1])
  expected = reference_loss(emb, labels, **kwargs)
  got = recall_at_k_surrogate(jnp.asarray(emb), jnp.asarray(labels), **kwargs)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), expected, rtol=1e-9, atol=1e-12)


def _directional_derivative(f, x, v, h=1e-5):
  """Five-point central difference: truncation O(h^4), so ~1e-11 here even with tau2=0.01."""
  return (-f(x + 2 * h * v) + 8 * f(x + h * v) - 8 * f(x - h * v) + f(x - 2 * h * v)) / (12 * h)


@pytest.mark.parametrize("kwargs", [CASES[0], CASES[1], CASES[3]])
def test_gradient_matches_finite_differences_of_reference(x64, kwargs):
  emb, labels = random_batch(3, class_sizes=[3, 2, 4], dim=5, singletons=1)
  grad = np.asarray(jax.grad(recall_at_k_surrogate)(jnp.asarray(emb), jnp.asarray(labels),
                                                    **kwargs))
  rng = np.random.default_rng(0)
  ref = lambda e: reference_loss(e, labels, **kwargs)
  directions = [rng.normal(size=emb.shape) for _ in range(3)]
  for i, j in [(0, 0), (4, 2), (7, 4)]:
    one_hot = np.zeros(emb.shape)
    one_hot[i, j] = 1.0
    directions.append(one_hot)
  for v in directions:
    expected = _directional_derivative(ref, emb, v)
    got = float(np.sum(grad * v))
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)
  assert np.abs(grad).max() > 0, "the gradient must reach the embeddings"


def test_float32_uses_full_precision():
  emb, labels = random_batch(4, class_sizes=[4, 4, 4, 4], dim=64, dtype=np.float32)
  got = recall_at_k_surrogate(jnp.asarray(emb), jnp.asarray(labels))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), reference_loss(emb, labels), rtol=2e-5)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_equals_unblocked(x64, block):
  emb, labels = random_batch(5, class_sizes=[2, 6, 3, 4])
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  full, full_grad = jax.value_and_grad(recall_at_k_surrogate)(e, l)
  blocked, blocked_grad = jax.value_and_grad(recall_at_k_surrogate)(e, l, query_block=block)
  np.testing.assert_allclose(blocked, full, rtol=1e-12)
  np.testing.assert_allclose(blocked_grad, full_grad, rtol=1e-10, atol=1e-14)


def test_jit_with_traced_labels_and_permutation_invariance(x64):
  emb, labels = random_batch(6, class_sizes=[3, 3, 5, 2])
  loss = jax.jit(lambda e, l: recall_at_k_surrogate(e, l, max_positives=4, query_block=4))
  value = loss(jnp.asarray(emb), jnp.asarray(labels))
  np.testing.assert_allclose(float(value), reference_loss(emb, labels), rtol=1e-9)
  perm = np.random.default_rng(1).permutation(len(labels))
  permuted = loss(jnp.asarray(emb[perm]), jnp.asarray(labels[perm]))
  np.testing.assert_allclose(float(permuted), float(value), rtol=1e-12)


def test_traced_overflow_poisons_loss():
  emb, labels = random_batch(7, class_sizes=[5, 2], dtype=np.float32)
  value = jax.jit(lambda e, l: recall_at_k_surrogate(e, l, max_positives=2))(emb, labels)
  assert np.isnan(value), "a query with more positives than slots must not give a number"


def test_from_similarity_matches_embeddings(x64):
  emb, labels = random_batch(8, class_sizes=[3, 4, 2])
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  np.testing.assert_allclose(
      recall_at_k_surrogate_from_similarity(e @ e.T, l, query_block=5),
      recall_at_k_surrogate(e, l), rtol=1e-12)


def test_perfect_and_worst_embeddings():
  # Classes on orthogonal axes: every positive outranks every negative, recall is 1 for all k
  # up to |P|, so only the sigmoid's softness (tau1 = 0.1) keeps the loss above 0.
  labels = np.repeat(np.arange(4), 4)
  emb = np.eye(4, dtype=np.float32)[labels]
  good = recall_at_k_surrogate(emb, labels, k_values=(4,), tau1=0.1)
  assert float(good) < 1e-3
  # All classes mixed on the same points: positives rank anywhere, recall@1 is far from 1.
  bad_emb = np.eye(4, dtype=np.float32)[np.arange(16) % 4]
  bad = recall_at_k_surrogate(bad_emb, labels, k_values=(1,), tau1=0.1)
  assert float(bad) > 0.5


def test_memory_is_bounded_by_query_block():
  """B = 10,000 rows with P = 9 (4,000 real + SiMix): forward+backward under 2 GiB."""
  b, d = 10_000, 512
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  fn = jax.jit(jax.value_and_grad(
      lambda e, l: recall_at_k_surrogate(e, l, max_positives=9, query_block=256)))
  stats = fn.lower(emb, labels).compile().memory_analysis()
  peak = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  assert peak < 2 * 2**30, f"{peak / 2**30:.2f} GiB"
  # The unblocked form holds (B, P, B) terms: ~3.6 GB per float32 copy.
  unblocked = jax.jit(jax.value_and_grad(
      lambda e, l: recall_at_k_surrogate(e, l, max_positives=9)))
  assert unblocked.lower(emb, labels).compile().memory_analysis().temp_size_in_bytes > 2 * 2**30


@pytest.mark.parametrize(
    "make_args, kwargs, message",
    [
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(5, np.int32)), {}, "shape mismatch"),
        (lambda: (np.zeros((4,), np.float32), np.zeros(4, np.int32)), {}, "shape"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.float32)), {}, "integers"),
        (lambda: (np.zeros((0, 3), np.float32), np.zeros(0, np.int32)), {}, "empty"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)), {"k_values": (1, 0)},
         "positive integer"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)), {"tau1": 0.0}, "tau1"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)), {"tau2": -1.0}, "tau2"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)), {"max_positives": 2},
         "max_positives"),
        (lambda: (np.zeros((4, 3), np.float32), np.arange(4, dtype=np.int32)), {},
         "no query has a positive"),
    ],
)
def test_bad_input(make_args, kwargs, message):
  emb, labels = make_args()
  with pytest.raises(ValueError, match=message):
    recall_at_k_surrogate(emb, labels, **kwargs)


def test_traced_labels_need_max_positives():
  with pytest.raises(ValueError, match="max_positives"):
    jax.jit(recall_at_k_surrogate)(np.zeros((4, 3), np.float32), np.zeros(4, np.int32))
