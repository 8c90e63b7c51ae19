"""Multi-similarity loss and miner against a float64 NumPy reference written with plain loops."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import multi_similarity_loss
from recall_jax.losses import multi_similarity_pairs

_STATIC = ("alpha", "beta", "base", "epsilon")
_loss = jax.jit(multi_similarity_loss, static_argnames=_STATIC)


def reference_mining(s, labels, epsilon):
  """Lists of mined (anchor, positive) and (anchor, negative) pairs."""
  n = len(labels)
  any_pos = any(labels[i] == labels[j] for i in range(n) for j in range(n) if i != j)
  any_neg = any(labels[i] != labels[j] for i in range(n) for j in range(n))
  if not (any_pos and any_neg):
    return [], []
  pos_pairs, neg_pairs = [], []
  for i in range(n):
    positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
    negatives = [j for j in range(n) if labels[j] != labels[i]]
    if negatives:
      hardest_neg = max(s[i, j] for j in negatives)
      pos_pairs += [(i, j) for j in positives if s[i, j] - epsilon < hardest_neg]
    if positives:
      hardest_pos = min(s[i, j] for j in positives)
      neg_pairs += [(i, j) for j in negatives if s[i, j] + epsilon > hardest_pos]
  return pos_pairs, neg_pairs


def reference_multi_similarity(embeddings, labels, alpha=2.0, beta=50.0, base=0.5,
                               epsilon=0.1):
  """(loss, gradient w.r.t. the embeddings), anchor by anchor."""
  e = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  n = len(labels)
  s = np.array([[float(np.dot(e[i], e[j])) for j in range(n)] for i in range(n)])
  pos_pairs, neg_pairs = reference_mining(s, labels, epsilon)
  loss = 0.0
  grad_s = np.zeros((n, n))  # d loss / d s_ij
  for i in range(n):
    pos = [j for a, j in pos_pairs if a == i]
    neg = [j for a, j in neg_pairs if a == i]
    pos_sum = sum(math.exp(-alpha * (s[i, j] - base)) for j in pos)
    neg_sum = sum(math.exp(beta * (s[i, j] - base)) for j in neg)
    loss += (math.log1p(pos_sum) / alpha + math.log1p(neg_sum) / beta) / n
    for j in pos:
      grad_s[i, j] -= math.exp(-alpha * (s[i, j] - base)) / (1 + pos_sum) / n
    for j in neg:
      grad_s[i, j] += math.exp(beta * (s[i, j] - base)) / (1 + neg_sum) / n
  grad = np.zeros_like(e)
  for i in range(n):
    for j in range(n):
      grad[i] += grad_s[i, j] * e[j]
      grad[j] += grad_s[i, j] * e[i]
  return loss, grad


def _batch(seed, sizes=(4, 1, 3, 2, 1, 5), dim=5):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(size, 5 * c + 1) for c, size in enumerate(sizes)])
  e = rng.normal(size=(len(labels), dim))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  return e, labels[rng.permutation(len(labels))].astype(np.int32)


@pytest.mark.parametrize("hyper", [
    dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    dict(alpha=1.0, beta=10.0, base=0.2, epsilon=0.3),
])
def test_value_and_gradient_match_reference(x64, hyper):
  grad_fn = jax.jit(jax.value_and_grad(multi_similarity_loss), static_argnames=_STATIC)
  mined_anything = False
  for seed in range(3):
    e, labels = _batch(seed)
    value, grad = grad_fn(jnp.asarray(e), jnp.asarray(labels), **hyper)
    assert value.dtype == jnp.float64
    want_value, want_grad = reference_multi_similarity(e, labels, **hyper)
    mined_anything |= want_value > 0
    np.testing.assert_allclose(float(value), want_value, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=0, atol=1e-9)
  assert mined_anything


def test_mining_matches_reference(x64):
  e, labels = _batch(11, sizes=(6, 1, 4, 3, 1, 2), dim=8)
  # Pull each class towards a centre so that some pairs are easy and mining has a choice.
  centres = np.random.default_rng(0).normal(size=(labels.max() + 1, 8))
  e = e + centres[labels]
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  s = e @ e.T
  pos_mask, neg_mask = jax.jit(multi_similarity_pairs, static_argnames="epsilon")(
      jnp.asarray(s), jnp.asarray(labels), epsilon=0.1)
  pos_pairs, neg_pairs = reference_mining(s, labels, 0.1)
  assert sorted(zip(*np.nonzero(np.asarray(pos_mask)))) == sorted(pos_pairs)
  assert sorted(zip(*np.nonzero(np.asarray(neg_mask)))) == sorted(neg_pairs)
  # Mining selects: some but not all pairs of each kind.
  n = len(labels)
  num_pos = sum(labels[i] == labels[j] for i in range(n) for j in range(n) if i != j)
  num_neg = sum(labels[i] != labels[j] for i in range(n) for j in range(n))
  assert 0 < len(pos_pairs) < num_pos and 0 < len(neg_pairs) < num_neg


def test_degenerate_batches():
  e = jnp.asarray(_batch(0)[0][:4], jnp.float32)
  # One class only (no negatives) or all singletons (no positives): nothing is mined.
  assert float(_loss(e, jnp.zeros(4, jnp.int32))) == 0.0
  assert float(_loss(e, jnp.arange(4))) == 0.0
  grad = jax.jit(jax.grad(multi_similarity_loss))(e, jnp.arange(4))
  assert np.all(np.asarray(grad) == 0.0)


def test_permutation_invariance_and_float32(x64):
  e, labels = _batch(4)
  perm = np.random.default_rng(1).permutation(len(labels))
  a = _loss(jnp.asarray(e), jnp.asarray(labels))
  b = _loss(jnp.asarray(e[perm]), jnp.asarray(labels[perm]))
  np.testing.assert_allclose(float(a), float(b), atol=1e-12)
  c = _loss(jnp.asarray(e, jnp.float32), jnp.asarray(labels))
  assert c.dtype == jnp.float32
  np.testing.assert_allclose(float(c), float(a), atol=1e-5)


def test_eager_call_with_numpy_labels():
  e, labels = _batch(5)
  eager = multi_similarity_loss(jnp.asarray(e, jnp.float32), labels)
  np.testing.assert_allclose(float(eager), reference_multi_similarity(e, labels)[0], atol=1e-5)


@pytest.mark.usefixtures("x64")  # float64 references (conftest)
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_gradient_match_reference(self):
    hyper = dict(alpha=1.0, beta=10.0, base=0.2, epsilon=0.3)
    grad_fn = self.variant(jax.value_and_grad(functools.partial(multi_similarity_loss, **hyper)))
    for seed in range(2):
      e, labels = _batch(seed)
      value, grad = grad_fn(jnp.asarray(e), jnp.asarray(labels))
      want_value, want_grad = reference_multi_similarity(e, labels, **hyper)
      np.testing.assert_allclose(float(value), want_value, rtol=0, atol=1e-9)
      chex.assert_trees_all_close(grad, jnp.asarray(want_grad), rtol=0, atol=1e-9)


def test_labels_may_be_array_likes():
  e, labels = _batch(6)
  e = jnp.asarray(e, jnp.float32)
  expected = float(multi_similarity_loss(e, jnp.asarray(labels)))
  for given in (labels.tolist(), tuple(labels.tolist()), labels.astype(np.int64)):
    assert float(multi_similarity_loss(e, given)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, match",
    [
        (np.zeros((4,)), np.zeros(4, int), {}, "shape"),
        (np.zeros((4, 2)), np.zeros(3, int), {}, "mismatch"),
        (np.zeros((4, 2)), np.zeros(4, np.float32), {}, "integer"),
        (np.zeros((0, 2)), np.zeros(0, int), {}, "empty"),
        (np.zeros((4, 2), int), np.zeros(4, int), {}, "floating"),
        (np.zeros((4, 2)), np.zeros(4, int), {"alpha": 0.0}, "alpha"),
        (np.zeros((4, 2)), np.zeros(4, int), {"beta": -1.0}, "beta"),
        (np.zeros((4, 2)), np.zeros(4, int), {"base": float("nan")}, "base"),
        (np.zeros((4, 2)), np.zeros(4, int), {"alpha": float("inf")}, "alpha"),
        (np.zeros((4, 2)), np.zeros(4, int), {"epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_input(embeddings, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    multi_similarity_loss(jnp.asarray(embeddings), jnp.asarray(labels), **kwargs)


def test_matches_pytorch_metric_learning(x64):
  """pml's MultiSimilarityMiner(0.1) + MultiSimilarityLoss(2, 50, 0.5) on unit-norm rows."""
  pml_losses = pytest.importorskip(
      "pytorch_metric_learning.losses", reason="optional comparison with pytorch-metric-learning")
  pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
  torch = pytest.importorskip("torch", reason="pytorch-metric-learning needs torch")
  miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
  pml = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
  grad_fn = jax.jit(jax.value_and_grad(multi_similarity_loss))
  for seed in range(3):
    e, labels = _batch(seed)
    tensor, torch_labels = torch.tensor(e, requires_grad=True), torch.tensor(labels).long()
    want = pml(tensor, torch_labels, miner(tensor, torch_labels))
    want.backward()
    value, grad = grad_fn(jnp.asarray(e), jnp.asarray(labels))
    np.testing.assert_allclose(float(value), want.item(), atol=1e-9)
    # pml differentiates through its normalisation, which removes the radial component.
    radial = np.sum(np.asarray(grad) * e, axis=1, keepdims=True) * e
    np.testing.assert_allclose(np.asarray(grad) - radial, tensor.grad.numpy(), atol=1e-9)
