"""Contrastive loss against a float64 NumPy reference written with plain loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import contrastive_loss

_loss = jax.jit(contrastive_loss, static_argnames=("pos_margin", "neg_margin"))


def reference_contrastive(embeddings, labels, pos_margin=0.0, neg_margin=0.5):
  """Loss and its gradient w.r.t. the embeddings, pair by pair.

  Returns:
    (loss, grad): AvgNonZero of relu(d - pos_margin) over positive ordered pairs plus AvgNonZero
    of relu(neg_margin - d) over negative ordered pairs, d = 1 - e_i . e_j.
  """
  e = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  n = len(labels)
  pos, neg = [], []  # (loss, i, j, d loss / d s_ij)
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      s = float(np.dot(e[i], e[j]))
      if labels[i] == labels[j]:
        value = max(0.0, (1.0 - s) - pos_margin)
        if value > 0:
          pos.append((value, i, j, -1.0))
      else:
        value = max(0.0, neg_margin - (1.0 - s))
        if value > 0:
          neg.append((value, i, j, 1.0))
  loss = 0.0
  grad = np.zeros_like(e)
  for pairs in (pos, neg):
    if not pairs:
      continue
    loss += sum(p[0] for p in pairs) / len(pairs)
    for _, i, j, slope in pairs:
      # d s_ij / d e_i = e_j and d s_ij / d e_j = e_i.
      grad[i] += slope / len(pairs) * e[j]
      grad[j] += slope / len(pairs) * e[i]
  return loss, grad


def _batch(seed, sizes=(4, 1, 3, 2, 1, 5), dim=6):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(size, 7 * c + 2) for c, size in enumerate(sizes)])
  e = rng.normal(size=(len(labels), dim))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  return e, labels[rng.permutation(len(labels))].astype(np.int32)


@pytest.mark.parametrize("margins", [(0.0, 0.5), (0.2, 0.9)])
def test_value_and_gradient_match_reference(x64, margins):
  pos_margin, neg_margin = margins
  grad_fn = jax.jit(jax.value_and_grad(contrastive_loss), static_argnames=(
      "pos_margin", "neg_margin"))
  for seed in range(3):
    e, labels = _batch(seed)
    value, grad = grad_fn(jnp.asarray(e), jnp.asarray(labels), pos_margin=pos_margin,
                          neg_margin=neg_margin)
    assert value.dtype == jnp.float64
    want_value, want_grad = reference_contrastive(e, labels, pos_margin, neg_margin)
    assert want_value > 0
    np.testing.assert_allclose(float(value), want_value, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=0, atol=1e-9)


def test_dot_product_of_unnormalised_embeddings(x64):
  e, labels = _batch(3)
  e = e * np.linspace(0.5, 2.0, len(labels))[:, None]
  got = _loss(jnp.asarray(e), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), reference_contrastive(e, labels)[0], atol=1e-9)


def test_known_values():
  # Positives identical, negatives orthogonal: every pair is inside its margin.
  e = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  labels = np.array([0, 0, 1])
  assert float(_loss(jnp.asarray(e), jnp.asarray(labels))) == 0.0
  # Positives orthogonal (d = 1, loss 1 each); negatives identical (d = 0, loss 0.5 each).
  e = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
  labels = np.array([0, 0, 1])
  # Positive pairs (0,1),(1,0): 1 each. Negative pairs (0,2),(2,0): d = 1, no loss;
  # (1,2),(2,1): d = 0, loss 0.5 each. Averages over non-zero pairs: 1 + 0.5.
  np.testing.assert_allclose(float(_loss(jnp.asarray(e), jnp.asarray(labels))), 1.5, atol=1e-7)


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
  eager = contrastive_loss(jnp.asarray(e, jnp.float32), labels)
  np.testing.assert_allclose(float(eager), reference_contrastive(e, labels)[0], atol=1e-5)


@pytest.mark.usefixtures("x64")  # float64 references (conftest)
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_gradient_match_reference(self):
    hyper = dict(pos_margin=0.2, neg_margin=0.9)
    grad_fn = self.variant(jax.value_and_grad(functools.partial(contrastive_loss, **hyper)))
    for seed in range(2):
      e, labels = _batch(seed)
      value, grad = grad_fn(jnp.asarray(e), jnp.asarray(labels))
      want_value, want_grad = reference_contrastive(e, labels, **hyper)
      np.testing.assert_allclose(float(value), want_value, rtol=0, atol=1e-9)
      chex.assert_trees_all_close(grad, jnp.asarray(want_grad), rtol=0, atol=1e-9)


def test_labels_may_be_array_likes():
  e, labels = _batch(6)
  e = jnp.asarray(e, jnp.float32)
  expected = float(contrastive_loss(e, jnp.asarray(labels)))
  for given in (labels.tolist(), tuple(labels.tolist()), labels.astype(np.int64)):
    assert float(contrastive_loss(e, given)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, match",
    [
        (np.zeros((4,)), np.zeros(4, int), {}, "shape"),
        (np.zeros((4, 2)), np.zeros(3, int), {}, "mismatch"),
        (np.zeros((4, 2)), np.zeros(4, np.float32), {}, "integer"),
        (np.zeros((0, 2)), np.zeros(0, int), {}, "empty"),
        (np.zeros((4, 2), int), np.zeros(4, int), {}, "floating"),
        (np.zeros((4, 2)), np.zeros(4, int), {"pos_margin": -0.1}, "pos_margin"),
        (np.zeros((4, 2)), np.zeros(4, int), {"neg_margin": float("inf")}, "neg_margin"),
        (np.zeros((4, 2)), np.zeros(4, int), {"pos_margin": 0.6, "neg_margin": 0.5},
         "neg_margin"),
    ],
)
def test_bad_input(embeddings, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    contrastive_loss(jnp.asarray(embeddings), jnp.asarray(labels), **kwargs)


def test_matches_pytorch_metric_learning(x64):
  """Our distance margins (0, 0.5) are pml's similarity margins (1, 0.5) on CosineSimilarity."""
  pml_losses = pytest.importorskip(
      "pytorch_metric_learning.losses", reason="optional comparison with pytorch-metric-learning")
  pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
  torch = pytest.importorskip("torch", reason="pytorch-metric-learning needs torch")
  for seed, margins in ((0, (0.0, 0.5)), (1, (0.3, 0.8))):
    e, labels = _batch(seed)
    pml = pml_losses.ContrastiveLoss(pos_margin=1 - margins[0], neg_margin=1 - margins[1],
                                     distance=pml_distances.CosineSimilarity())
    tensor = torch.tensor(e, requires_grad=True)
    want = pml(tensor, torch.tensor(labels, dtype=torch.long))
    want.backward()
    value, grad = jax.value_and_grad(contrastive_loss)(
        jnp.asarray(e), jnp.asarray(labels), pos_margin=margins[0], neg_margin=margins[1])
    np.testing.assert_allclose(float(value), want.item(), atol=1e-9)
    # pml differentiates through its normalisation too; for unit-norm inputs that only
    # removes the radial component of our gradient.
    radial = np.sum(np.asarray(grad) * e, axis=1, keepdims=True) * e
    np.testing.assert_allclose(np.asarray(grad) - radial, tensor.grad.numpy(), atol=1e-9)
