"""ProxyAnchor and normalized softmax against pytorch-metric-learning and float64 NumPy loops."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses.normalized_softmax import normalized_softmax_loss
from recall_jax.losses.proxy_anchor import init_proxies
from recall_jax.losses.proxy_anchor import proxy_anchor_loss

NUM_CLASSES = 7
DIM = 5


def _batch(seed, batch_size=12, num_classes=NUM_CLASSES):
  """Unnormalised embeddings, labels using only some classes, and class parameters."""
  rng = np.random.default_rng(seed)
  present = rng.choice(num_classes, size=4, replace=False)  # 3 classes absent from the batch
  labels = rng.choice(present, size=batch_size)
  embeddings = rng.standard_normal((batch_size, DIM)) * rng.uniform(0.5, 2.0, (batch_size, 1))
  params = rng.standard_normal((num_classes, DIM))
  return embeddings, labels.astype(np.int32), params


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_proxy_anchor(e, labels, proxies, margin=0.1, alpha=32.0):
  e, p = _unit(np.asarray(e, np.float64)), _unit(np.asarray(proxies, np.float64))
  with_positives = sorted(set(labels.tolist()))
  pos = neg = 0.0
  for c in range(len(p)):
    pos_sum = sum(math.exp(-alpha * (e[i] @ p[c] - margin))
                  for i in range(len(e)) if labels[i] == c)
    neg_sum = sum(math.exp(alpha * (e[i] @ p[c] + margin))
                  for i in range(len(e)) if labels[i] != c)
    pos += math.log1p(pos_sum)
    neg += math.log1p(neg_sum)
  return pos / len(with_positives) + neg / len(p)


def reference_normalized_softmax(e, labels, weights, temperature=0.05):
  e, w = _unit(np.asarray(e, np.float64)), _unit(np.asarray(weights, np.float64))
  total = 0.0
  for i in range(len(e)):
    logits = [e[i] @ w[c] / temperature for c in range(len(w))]
    top = max(logits)
    total += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[labels[i]]
  return total / len(e)


def _pml(name, params, e, labels, **kwargs):
  """pytorch-metric-learning's loss value and gradients (embeddings, parameters) in float64."""
  torch = pytest.importorskip("torch", reason="torch is an optional test extra")
  pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                   reason="pytorch-metric-learning is an optional test extra")
  loss_fn = getattr(pml_losses, name)(num_classes=params.shape[0], embedding_size=DIM, **kwargs)
  loss_fn = loss_fn.double()
  # ProxyAnchorLoss holds (C, D) proxies, NormalizedSoftmaxLoss (D, C) weights.
  parameter = loss_fn.proxies if name == "ProxyAnchorLoss" else loss_fn.W
  transposed = parameter.shape[0] != params.shape[0]
  with torch.no_grad():
    parameter.copy_(torch.tensor(params.T if transposed else params))
  tensor = torch.tensor(e, requires_grad=True)
  value = loss_fn(tensor, torch.tensor(labels, dtype=torch.long))
  value.backward()
  param_grad = parameter.grad.numpy()
  return value.item(), tensor.grad.numpy(), param_grad.T if transposed else param_grad


CASES = [
    (proxy_anchor_loss, "ProxyAnchorLoss", reference_proxy_anchor,
     [{}, {"margin": 0.3, "alpha": 8.0}]),
    (normalized_softmax_loss, "NormalizedSoftmaxLoss", reference_normalized_softmax,
     [{}, {"temperature": 0.5}]),
]


@pytest.mark.parametrize("loss_fn, pml_name, _, hypers", CASES)
def test_values_and_gradients_match_pytorch_metric_learning(x64, loss_fn, pml_name, _, hypers):
  for seed in range(3):
    for hyper in hypers:
      e, labels, params = _batch(seed)
      want_value, want_e_grad, want_p_grad = _pml(pml_name, params, e, labels, **hyper)
      value, (e_grad, p_grad) = jax.value_and_grad(
          functools.partial(loss_fn, **hyper), argnums=(0, 2))(
              jnp.asarray(e), jnp.asarray(labels), jnp.asarray(params))
      assert value.dtype == jnp.float64
      np.testing.assert_allclose(float(value), want_value, rtol=0, atol=1e-6)
      np.testing.assert_allclose(np.asarray(e_grad), want_e_grad, rtol=0, atol=1e-6)
      np.testing.assert_allclose(np.asarray(p_grad), want_p_grad, rtol=0, atol=1e-6)
      # Classes absent from the batch still get a gradient.
      assert np.any(np.asarray(p_grad)[np.setdiff1d(np.arange(NUM_CLASSES), labels)] != 0)


@pytest.mark.usefixtures("x64")  # float64 references
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_match_numpy_reference(self):
    for loss_fn, _, reference, hypers in CASES:
      for hyper in hypers:
        fn = self.variant(functools.partial(loss_fn, **hyper))
        for seed in range(2):
          e, labels, params = _batch(seed + 10)
          got = fn(jnp.asarray(e), jnp.asarray(labels), jnp.asarray(params))
          np.testing.assert_allclose(float(got), reference(e, labels, params, **hyper),
                                     rtol=1e-12)


def test_float32_close_to_float64_reference():
  e, labels, params = _batch(3)
  got = proxy_anchor_loss(jnp.asarray(e, jnp.float32), labels, jnp.asarray(params, jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), reference_proxy_anchor(e, labels, params), rtol=1e-5)


def test_init_proxies_is_kaiming_normal_fan_out():
  proxies = init_proxies(jax.random.key(0), 400, 300)
  assert proxies.shape == (400, 300) and proxies.dtype == jnp.float32
  values = np.asarray(proxies, np.float64)
  np.testing.assert_allclose(values.mean(), 0.0, atol=3e-4)
  # torch's kaiming_normal_(mode='fan_out') on (C, D): std sqrt(2 / C).
  np.testing.assert_allclose(values.std(), math.sqrt(2.0 / 400), rtol=1e-2)
  with pytest.raises(ValueError, match="num_classes"):
    init_proxies(jax.random.key(0), 0, 3)


@pytest.mark.parametrize("loss_fn", [proxy_anchor_loss, normalized_softmax_loss])
@pytest.mark.parametrize(
    "embeddings, labels, params, match",
    [
        (np.ones((4, 2)), np.array([0, 1, 2, 3]), np.ones((3, 2)), r"\[0, 3\)"),
        (np.ones((4, 2)), np.array([0, -1, 1, 1]), np.ones((3, 2)), r"\[0, 3\)"),
        (np.ones((4, 2)), np.zeros(4, int), np.ones((3, 4)), "shape"),
        (np.ones((4, 2)), np.zeros(4, int), np.ones((3, 2), int), "floating"),
        (np.ones((4, 2)), np.zeros(3, int), np.ones((3, 2)), "mismatch"),
        (np.ones((4, 2), int), np.zeros(4, int), np.ones((3, 2)), "floating"),
    ],
)
def test_bad_input(loss_fn, embeddings, labels, params, match):
  with pytest.raises(ValueError, match=match):
    loss_fn(jnp.asarray(embeddings), jnp.asarray(labels), jnp.asarray(params))


@pytest.mark.parametrize("loss_fn, kwargs", [(proxy_anchor_loss, {"alpha": 0.0}),
                                             (proxy_anchor_loss, {"margin": math.inf}),
                                             (normalized_softmax_loss, {"temperature": -1.0})])
def test_bad_hyper_parameters(loss_fn, kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    loss_fn(jnp.ones((2, 2)), jnp.array([0, 1]), jnp.ones((2, 2)), **kwargs)


@pytest.mark.parametrize("loss_fn", [proxy_anchor_loss, normalized_softmax_loss])
def test_traced_labels_out_of_range_give_nan(loss_fn):
  e, labels, params = _batch(4)
  jitted = jax.jit(loss_fn)
  assert np.isfinite(float(jitted(jnp.asarray(e, jnp.float32), labels, params)))
  labels[0] = NUM_CLASSES
  assert np.isnan(float(jitted(jnp.asarray(e, jnp.float32), labels, params)))
