"""RS@k against an independent float64 NumPy reference written with explicit loops."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import get_loss
from recall_jax.losses import recall_at_k_loss
from recall_jax.losses import recall_at_k_loss_from_similarity
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
  emb, labels = random_batch(seed, class_sizes=[2, 3, 5, 4, 1, 2])
  expected = reference_loss(emb, labels, **kwargs)
  got = recall_at_k_surrogate(jnp.asarray(emb), jnp.asarray(labels), **kwargs)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), expected, rtol=1e-9, atol=1e-12)


def _directional_derivative(f, x, v, h=1e-5):
  """Five-point central difference: truncation O(h^4), so ~1e-11 here even with tau2=0.01."""
  return (-f(x + 2 * h * v) + 8 * f(x + h * v) - 8 * f(x - h * v) + f(x - 2 * h * v)) / (12 * h)


@pytest.mark.parametrize("kwargs", [CASES[0], CASES[1], CASES[3]])
def test_gradient_matches_finite_differences_of_reference(x64, kwargs):
  emb, labels = random_batch(3, class_sizes=[3, 2, 4, 5, 3], dim=5, singletons=1)
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
  emb, labels = random_batch(5, class_sizes=[2, 6, 3, 4, 2])
  e, l = jnp.asarray(emb), jnp.asarray(labels)
  full, full_grad = jax.value_and_grad(recall_at_k_surrogate)(e, l)
  blocked, blocked_grad = jax.value_and_grad(recall_at_k_surrogate)(e, l, query_block=block)
  np.testing.assert_allclose(blocked, full, rtol=1e-12)
  np.testing.assert_allclose(blocked_grad, full_grad, rtol=1e-10, atol=1e-14)


def test_jit_with_traced_labels_and_permutation_invariance(x64):
  emb, labels = random_batch(6, class_sizes=[3, 3, 5, 2, 3])
  loss = jax.jit(lambda e, l: recall_at_k_surrogate(e, l, max_positives=4, query_block=4))
  value = loss(jnp.asarray(emb), jnp.asarray(labels))
  np.testing.assert_allclose(float(value), reference_loss(emb, labels), rtol=1e-9)
  perm = np.random.default_rng(1).permutation(len(labels))
  permuted = loss(jnp.asarray(emb[perm]), jnp.asarray(labels[perm]))
  np.testing.assert_allclose(float(permuted), float(value), rtol=1e-12)


def test_traced_overflow_poisons_loss():
  emb, labels = random_batch(7, class_sizes=[5, 2], dtype=np.float32)
  value = jax.jit(lambda e, l: recall_at_k_surrogate(e, l, k_values=(1, 2, 4), max_positives=2))(
      emb, labels)
  assert np.isnan(value), "a query with more positives than slots must not give a number"


def test_from_similarity_matches_embeddings(x64):
  emb, labels = random_batch(8, class_sizes=[3, 4, 2, 5, 3])
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
  # The unblocked form (one block of all B queries) holds (B, P, B) terms: ~3.6 GB per copy.
  unblocked = jax.jit(jax.value_and_grad(
      lambda e, l: recall_at_k_surrogate(e, l, max_positives=9, query_block=b)))
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
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)),
         {"tau1": 0.0, "k_values": (1,)}, "tau1"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)),
         {"tau2": -1.0, "k_values": (1,)}, "tau2"),
        (lambda: (np.zeros((4, 3), np.float32), np.zeros(4, np.int32)),
         {"max_positives": 2, "k_values": (1,)}, "max_positives"),
        (lambda: (np.zeros((4, 3), np.float32), np.arange(4, dtype=np.int32)), {"k_values": (1,)},
         "no query has a positive"),
    ],
)
def test_bad_input(make_args, kwargs, message):
  emb, labels = make_args()
  with pytest.raises(ValueError, match=message):
    recall_at_k_surrogate(emb, labels, **kwargs)


def test_one_function_under_every_name():
  assert recall_at_k_surrogate is recall_at_k_loss
  assert recall_at_k_surrogate_from_similarity is recall_at_k_loss_from_similarity
  assert get_loss("recall_at_k") is recall_at_k_loss


@pytest.mark.usefixtures("x64")  # float64 references (conftest)
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):
  """The traced path is the contract: the same call gives the same value and gradient."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_layout_gives_reference_value_and_gradient(self):
    emb, labels = random_batch(10, class_sizes=[4, 4, 4, 4, 4], singletons=0)
    for kwargs in (dict(samples_per_class=4), dict(max_positives=5, query_block=7)):
      loss = self.variant(jax.value_and_grad(functools.partial(recall_at_k_loss, **kwargs)))
      value, grad = loss(jnp.asarray(emb), jnp.asarray(labels))
      np.testing.assert_allclose(float(value), reference_loss(emb, labels), rtol=1e-9)
      # Eager, with the slots inferred from the concrete labels.
      expected = jax.grad(recall_at_k_loss)(jnp.asarray(emb), labels)
      chex.assert_trees_all_close(grad, expected, rtol=1e-9, atol=1e-13)

  @chex.variants(with_jit=True, without_jit=True)
  def test_from_similarity_gives_the_same_value(self):
    emb, labels = random_batch(11, class_sizes=[3, 3, 3, 3, 3, 3], singletons=1)
    e, y = jnp.asarray(emb), jnp.asarray(labels)
    from_sim = self.variant(functools.partial(recall_at_k_loss_from_similarity,
                                              samples_per_class=3))
    np.testing.assert_allclose(float(from_sim(e @ e.T, y)), reference_loss(emb, labels),
                               rtol=1e-9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_overflow_raises_on_concrete_labels_and_is_nan_on_traced(self):
    emb, labels = random_batch(12, class_sizes=[5, 3, 3, 3, 3, 3], singletons=0)
    loss = self.variant(functools.partial(recall_at_k_loss, samples_per_class=3))
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      self.assertTrue(np.isnan(float(loss(emb, labels))))
    else:
      with self.assertRaisesRegex(ValueError, "a query has 4 positives but .* 2 slots"):
        loss(emb, labels)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_without_positive_raises_on_concrete_labels_and_is_nan_on_traced(self):
    emb = np.eye(20)
    loss = self.variant(functools.partial(recall_at_k_loss, samples_per_class=2))
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      self.assertTrue(np.isnan(float(loss(emb, np.arange(20)))))
    else:
      with self.assertRaisesRegex(ValueError, "no query has a positive"):
        loss(emb, np.arange(20))


def test_traced_labels_without_layout_give_the_same_value_and_warn(x64):
  emb, labels = random_batch(13, class_sizes=[3, 4, 2, 5, 3])
  eager = recall_at_k_loss(emb, labels)
  with pytest.warns(UserWarning, match=r"B - 1 = 18 positive slots"):
    traced = jax.jit(recall_at_k_loss)(emb, labels)
  np.testing.assert_allclose(float(traced), float(eager), rtol=1e-12)
  np.testing.assert_allclose(float(eager), reference_loss(emb, labels), rtol=1e-9)


def test_concrete_labels_inside_jit_are_checked_like_eager_ones():
  emb, labels = random_batch(14, class_sizes=[5, 3, 3, 3, 3, 3], singletons=0)
  with pytest.raises(ValueError, match="samples_per_class=3"):
    jax.jit(lambda e: recall_at_k_loss(e, labels, samples_per_class=3))(emb)


def test_automatic_query_block_gives_the_same_value_and_gradient(x64):
  """A tiny budget forces many blocks; value and gradient equal one block's and explicit ones'."""
  emb, labels = random_batch(15, class_sizes=[4] * 6, singletons=1)
  e, y = jnp.asarray(emb), jnp.asarray(labels)
  grad_fn = lambda **kw: jax.value_and_grad(
      functools.partial(recall_at_k_loss, samples_per_class=4, **kw))(e, y)
  auto = grad_fn(memory_budget_bytes=8 * 1024)
  one_block = grad_fn(query_block=len(labels))
  explicit = grad_fn(query_block=5)
  chex.assert_trees_all_close(auto, one_block, rtol=1e-12, atol=1e-15)
  chex.assert_trees_all_close(auto, explicit, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(float(auto[0]), reference_loss(emb, labels), rtol=1e-9)


def _plan(loss, b, d, **kwargs):
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  fn = jax.jit(jax.value_and_grad(functools.partial(loss, **kwargs)))
  return fn.lower(emb, labels).compile().memory_analysis()


def test_automatic_query_block_plans_within_the_budget():
  b, d, budget = 4096, 32, 16 * 2**20
  one_block = _plan(recall_at_k_loss, b, d, samples_per_class=4, query_block=b)
  auto = _plan(recall_at_k_loss, b, d, samples_per_class=4, memory_budget_bytes=budget)
  # The one-block plan holds (B, P, B) terms: far beyond the budget.
  assert one_block.temp_size_in_bytes > 8 * budget
  # Beyond the budget only O(B * D) buffers of the gradient and O(B) index arrays.
  assert auto.temp_size_in_bytes <= budget + 4 * b * d * 4 + 64 * b, auto.temp_size_in_bytes
  # The default budget (1 GiB) keeps small batches in one block.
  default = _plan(recall_at_k_loss, b, d, samples_per_class=4)
  assert default.temp_size_in_bytes == one_block.temp_size_in_bytes


def test_labels_may_be_array_likes():
  emb, labels = random_batch(16, class_sizes=[3, 3, 3, 3, 3, 3], singletons=0,
                             dtype=np.float32)
  expected = float(recall_at_k_loss(emb, jnp.asarray(labels)))
  for given in (labels.tolist(), tuple(labels.tolist()), labels, labels.astype(np.int64)):
    assert float(recall_at_k_loss(emb, given)) == pytest.approx(expected, rel=1e-6)
    assert float(recall_at_k_loss_from_similarity(emb @ emb.T, given)) == pytest.approx(
        expected, rel=1e-5)


def test_k_values_none_means_the_default():
  emb, labels = random_batch(17, class_sizes=[3, 3, 3, 3, 3, 3], singletons=0,
                             dtype=np.float32)
  np.testing.assert_allclose(recall_at_k_loss(emb, labels, k_values=None),
                             recall_at_k_loss(emb, labels, k_values=(1, 2, 4, 8, 16)))
  np.testing.assert_allclose(recall_at_k_loss(emb, labels, k_values=np.array([1, 4])),
                             recall_at_k_loss(emb, labels, k_values=[1, 4]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau1": math.inf}, "tau1 must be a finite number"),
        ({"tau2": math.nan}, "tau2 must be a finite number"),
        ({"tau2": 0.0}, "tau2 must be > 0"),
        ({"tau1": "1"}, "tau1 must be a finite number"),
        ({"k_values": (1, 2.5)}, "every k must be a positive integer"),
        ({"k_values": (True,)}, "every k must be a positive integer"),
        ({"k_values": ()}, "must not be empty"),
        ({"k_values": 4}, "sequence of positive integers"),
        ({"k_values": (1, 11)}, r"k = 11 is not below B - 1 = 11 \(B = 12 rows\)"),
        ({"k_values": (1, 40)}, r"k = 40 is not below B - 1 = 11 \(B = 12 rows\)"),
        ({"samples_per_class": 1}, "samples_per_class must be >= 2"),
        ({"samples_per_class": 2.0}, "samples_per_class must be a positive integer"),
        ({"max_positives": 0}, "max_positives must be a positive integer"),
        ({"samples_per_class": 3, "max_positives": 2}, "not both"),
        ({"query_block": 0}, "query_block must be a positive integer"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes must be a positive integer"),
    ],
)
@pytest.mark.filterwarnings("ignore:labels are traced and no batch layout")
def test_bad_hyper_parameters(kwargs, message):
  emb = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  labels = np.repeat(np.arange(4), 3)
  kwargs = {"k_values": (1, 2), **kwargs}
  with pytest.raises(ValueError, match=message):
    recall_at_k_loss(emb, labels, **kwargs)
  with pytest.raises(ValueError, match=message):  # the same error under jit
    jax.jit(functools.partial(recall_at_k_loss, **kwargs))(emb, labels)


def test_default_k_values_need_a_batch_of_18_rows():
  emb = np.eye(17, dtype=np.float32)
  with pytest.raises(ValueError, match=r"k = 16 is not below B - 1 = 16 \(B = 17 rows\)"):
    recall_at_k_loss(emb, np.arange(17) // 2)
  assert np.isfinite(recall_at_k_loss(np.eye(18, dtype=np.float32), np.arange(18) // 2))
