"""Smooth-AP against a float64 NumPy reference written with plain loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import smooth_ap_loss

# Tests call one compiled function per configuration: eager dispatch of the loss's many small
# ops is slow on a 2-core CPU. Under jit the labels are traced, so the layout is passed.
_loss = jax.jit(smooth_ap_loss, static_argnames=(
    "temperature", "include_query", "max_positives", "query_block"))


def _sigmoid(x, temperature):
  return 1.0 / (1.0 + np.exp(-np.clip(x / temperature, -50.0, 50.0)))


def reference_smooth_ap(embeddings, labels, temperature=0.01, include_query=False):
  """1 - AP averaged over queries with a positive, one term at a time."""
  e = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  n = len(labels)
  s = np.array([[float(np.dot(e[i], e[j])) for j in range(n)] for i in range(n)])
  losses = []
  for q in range(n):
    retrieval = [j for j in range(n) if include_query or j != q]
    positives = [j for j in retrieval if labels[j] == labels[q]]
    if not any(j != q for j in positives):
      continue
    ap = 0.0
    for p in positives:
      rank_pos = 1.0 + sum(_sigmoid(s[q, j] - s[q, p], temperature) for j in positives if j != p)
      rank_all = 1.0 + sum(_sigmoid(s[q, j] - s[q, p], temperature) for j in retrieval if j != p)
      ap += rank_pos / rank_all
    losses.append(1.0 - ap / len(positives))
  return float(np.mean(losses))


def _batch(seed, sizes=(4, 1, 3, 2, 1, 5), dim=6, scale=1.0):
  """Unit-norm embeddings (times `scale`) with unequal classes, singletons, shuffled order."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(size, 10 * c + 3) for c, size in enumerate(sizes)])
  perm = rng.permutation(len(labels))
  e = rng.normal(size=(len(labels), dim))
  e = scale * e / np.linalg.norm(e, axis=1, keepdims=True)
  return e, labels[perm].astype(np.int32)


@pytest.mark.parametrize("include_query, query_block", [(False, None), (True, 4)])
def test_matches_reference(x64, include_query, query_block):
  for seed in range(3):
    e, labels = _batch(seed)
    got = _loss(jnp.asarray(e), jnp.asarray(labels), include_query=include_query,
                max_positives=4, query_block=query_block)
    assert got.dtype == jnp.float64
    want = reference_smooth_ap(e, labels, include_query=include_query)
    np.testing.assert_allclose(float(got), want, rtol=0, atol=1e-9)


def test_matches_reference_other_temperature(x64):
  e, labels = _batch(7, scale=2.0)
  got = _loss(jnp.asarray(e), jnp.asarray(labels), temperature=0.3, max_positives=4)
  np.testing.assert_allclose(float(got), reference_smooth_ap(e, labels, 0.3), atol=1e-9)


def _finite_difference_grad(f, x, h=1e-5):
  """Fourth-order central differences, coordinate by coordinate."""
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    def at(t, idx=idx):
      y = x.copy()
      y[idx] += t
      return f(y)
    grad[idx] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
  return grad


@pytest.mark.parametrize("include_query, query_block", [(False, 3), (True, None)])
def test_gradient_matches_finite_differences(x64, include_query, query_block):
  e, labels = _batch(3, sizes=(3, 1, 2, 3), dim=3)
  grad = jax.jit(jax.grad(functools.partial(
      smooth_ap_loss, include_query=include_query, max_positives=2,
      query_block=query_block)))(jnp.asarray(e), jnp.asarray(labels))
  # Fourth-order differences keep the truncation error near 1e-11 even at temperature 0.01.
  want = _finite_difference_grad(
      lambda x: reference_smooth_ap(x, labels, include_query=include_query), e)
  assert np.abs(want).max() > 1e-2  # the check is not vacuous
  np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-9)


def test_query_blocks_give_same_value(x64):
  # Gradients through the blocked path are checked against finite differences above.
  e, labels = _batch(4, sizes=(5, 2, 7, 1, 3, 4))
  e, labels = jnp.asarray(e), jnp.asarray(labels)
  value = _loss(e, labels, max_positives=6)
  # 22 rows in blocks of 5: the last block is padded.
  blocked = _loss(e, labels, max_positives=6, query_block=5)
  np.testing.assert_allclose(float(blocked), float(value), atol=1e-12)
  np.testing.assert_allclose(float(value), reference_smooth_ap(e, labels), atol=1e-9)


def test_permutation_invariance(x64):
  e, labels = _batch(5)
  perm = np.random.default_rng(0).permutation(len(labels))
  a = _loss(jnp.asarray(e), jnp.asarray(labels), max_positives=4)
  b = _loss(jnp.asarray(e[perm]), jnp.asarray(labels[perm]), max_positives=4)
  np.testing.assert_allclose(float(a), float(b), atol=1e-12)


def test_perfect_and_reversed_ranking():
  # Two tight clusters far apart: every positive outranks every negative, AP = 1.
  e = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
  labels = np.array([0, 0, 0, 1, 1])
  assert float(_loss(jnp.asarray(e), jnp.asarray(labels), max_positives=2)) < 1e-6
  # Query 0's positive has similarity -1, its 3 negatives +1: rank 1 among positives, 4 among
  # all, AP = 1/4. Query 1 ties with everything (all -1): G(0) = 1/2 per negative, AP = 1/2.5.
  # Queries 2-4 have no positive and are left out.
  e = np.array([[1, 0], [-1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
  labels = np.array([0, 0, 1, 2, 3])
  got = _loss(jnp.asarray(e), jnp.asarray(labels), max_positives=2)
  np.testing.assert_allclose(float(got), ((1 - 1 / 4) + (1 - 1 / 2.5)) / 2, atol=1e-6)


def test_float32_and_bfloat16_inputs():
  e, labels = _batch(6)
  got = _loss(jnp.asarray(e, jnp.float32), jnp.asarray(labels), max_positives=4)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), reference_smooth_ap(e, labels), atol=1e-4)
  got = _loss(jnp.asarray(e, jnp.bfloat16), jnp.asarray(labels), max_positives=4)
  assert got.dtype == jnp.float32


def test_jit_and_layout():
  e, labels = _batch(8)
  e, labels = jnp.asarray(e, jnp.float32), jnp.asarray(labels)
  # Concrete (closed-over) labels: the slots are inferred.
  inferred = jax.jit(lambda x: smooth_ap_loss(x, np.asarray(labels)))(e)
  np.testing.assert_allclose(float(inferred), reference_smooth_ap(e, labels), atol=1e-5)
  np.testing.assert_allclose(float(_loss(e, labels, max_positives=4)), float(inferred),
                             atol=1e-6)
  # Traced labels without a layout: B - 1 slots, the same value, and a warning about the cost.
  with pytest.warns(UserWarning, match="B - 1 = 15 positive slots"):
    no_layout = jax.jit(smooth_ap_loss)(e, labels)
  np.testing.assert_allclose(float(no_layout), float(inferred), atol=1e-6)
  # Too few slots: concrete labels raise, traced labels poison the loss.
  with pytest.raises(ValueError, match="a query has 4 positives .*max_positives=3"):
    smooth_ap_loss(e, labels, max_positives=3)
  too_few = jax.jit(functools.partial(smooth_ap_loss, max_positives=3))(e, labels)
  assert np.isnan(float(too_few))


@pytest.mark.usefixtures("x64")  # float64 references (conftest)
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_layout_gives_reference_value_and_gradient(self):
    e, labels = _batch(9, sizes=(3, 3, 3, 3, 3))
    for include_query in (False, True):
      loss = functools.partial(smooth_ap_loss, include_query=include_query, temperature=0.05)
      value, grad = self.variant(jax.value_and_grad(
          functools.partial(loss, samples_per_class=3)))(jnp.asarray(e), jnp.asarray(labels))
      np.testing.assert_allclose(
          float(value), reference_smooth_ap(e, labels, 0.05, include_query), atol=1e-12)
      expected = jax.grad(loss)(jnp.asarray(e), labels)  # eager, slots from concrete labels
      chex.assert_trees_all_close(grad, expected, rtol=1e-9, atol=1e-13)

  @chex.variants(with_jit=True, without_jit=True)
  def test_overflow_raises_on_concrete_labels_and_is_nan_on_traced(self):
    e, labels = _batch(10, sizes=(4, 2, 2))
    loss = self.variant(functools.partial(smooth_ap_loss, samples_per_class=2))
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      self.assertTrue(np.isnan(float(loss(e, labels))))
    else:
      with self.assertRaisesRegex(ValueError, "a query has 3 positives .*samples_per_class=2"):
        loss(e, labels)


def test_automatic_query_block_gives_the_same_value_and_gradient(x64):
  e, labels = _batch(11, sizes=(4, 4, 4, 4, 4, 4))
  e, labels = jnp.asarray(e), jnp.asarray(labels)
  grad_fn = lambda **kw: jax.value_and_grad(
      functools.partial(smooth_ap_loss, samples_per_class=4, include_query=True, **kw))(e, labels)
  auto = grad_fn(memory_budget_bytes=8 * 1024)
  chex.assert_trees_all_close(auto, grad_fn(query_block=len(labels)), rtol=1e-12, atol=1e-15)
  chex.assert_trees_all_close(auto, grad_fn(query_block=5), rtol=1e-12, atol=1e-15)


def test_automatic_query_block_plans_within_the_budget():
  b, d, budget = 2048, 32, 8 * 2**20
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  plan = lambda **kw: jax.jit(jax.value_and_grad(functools.partial(
      smooth_ap_loss, samples_per_class=4, **kw))).lower(emb, labels).compile().memory_analysis()
  assert plan(query_block=b).temp_size_in_bytes > 8 * budget
  assert plan(memory_budget_bytes=budget).temp_size_in_bytes <= budget + 4 * b * d * 4 + 64 * b


def test_labels_may_be_array_likes():
  e, labels = _batch(12)
  e = jnp.asarray(e, jnp.float32)
  expected = float(smooth_ap_loss(e, jnp.asarray(labels)))
  for given in (labels.tolist(), tuple(labels.tolist()), labels):
    assert float(smooth_ap_loss(e, given)) == pytest.approx(expected, rel=1e-6)


def test_no_cubic_intermediate():
  """With query blocks, no array in the forward or backward pass has B * B * B elements."""
  b, block = 96, 8
  labels = jnp.arange(b) // 4
  e = jax.random.normal(jax.random.key(0), (b, 16))
  fn = jax.grad(functools.partial(smooth_ap_loss, max_positives=3, query_block=block))
  largest = 0

  def walk(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(e, labels).jaxpr)
  # The per-block (block, P, B) tensor, with P = 3 slots.
  assert largest == block * 3 * b, largest
  assert largest < b * b * b // 10


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, match",
    [
        (np.zeros((4,)), np.zeros(4, int), {}, "shape"),
        (np.zeros((4, 2)), np.zeros(3, int), {}, "mismatch"),
        (np.zeros((4, 2)), np.zeros(4, np.float32), {}, "integer"),
        (np.zeros((0, 2)), np.zeros(0, int), {}, "empty"),
        (np.zeros((4, 2), int), np.zeros(4, int), {}, "floating"),
        (np.zeros((4, 2)), np.arange(4), {}, "no query has a positive"),
        (np.zeros((4, 2)), np.zeros(4, int), {"temperature": 0.0}, "temperature"),
        (np.zeros((4, 2)), np.zeros(4, int), {"temperature": float("nan")}, "temperature"),
        (np.zeros((4, 2)), np.zeros(4, int), {"query_block": 0}, "query_block"),
        (np.zeros((4, 2)), np.zeros(4, int), {"max_positives": 0}, "max_positives"),
        (np.zeros((4, 2)), np.zeros(4, int), {"temperature": float("inf")}, "temperature"),
        (np.zeros((4, 2)), np.zeros(4, int), {"samples_per_class": 1}, "samples_per_class"),
        (np.zeros((4, 2)), np.zeros(4, int), {"samples_per_class": 2, "max_positives": 1},
         "not both"),
    ],
)
def test_bad_input(embeddings, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    smooth_ap_loss(jnp.asarray(embeddings), jnp.asarray(labels), **kwargs)


def test_matches_pytorch_metric_learning(x64):
  """pml's SmoothAPLoss = include_query=True, on the layouts where pml groups rows correctly.

  pml 2.9 requires equal class sizes, and reshapes the batch as if classes were contiguous
  blocks of size (number of classes): its value is only right for contiguous classes whose size
  equals the number of classes (e.g. AAABBBCCC). It normalises embeddings (cosine similarity)
  and computes in float32.
  """
  pml_losses = pytest.importorskip(
      "pytorch_metric_learning.losses", reason="optional comparison with pytorch-metric-learning")
  torch = pytest.importorskip("torch", reason="pytorch-metric-learning needs torch")
  if not hasattr(pml_losses, "SmoothAPLoss"):
    pytest.skip("this pytorch-metric-learning version has no SmoothAPLoss")
  rng = np.random.default_rng(0)
  for classes in ([1, 0, 3, 2], [9, 4, 6, 5]):
    labels = np.repeat(classes, 4)  # contiguous, 4 classes of 4
    e = rng.normal(size=(len(labels), 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    want = pml_losses.SmoothAPLoss(temperature=0.01)(torch.tensor(e), torch.tensor(labels))
    got = _loss(jnp.asarray(e), jnp.asarray(labels), include_query=True,
                max_positives=3)
    np.testing.assert_allclose(float(got), float(want), atol=2e-6)
