"""SiMix: exact virtual rows, pair order, gradients, and the similarity form."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import recall_at_k_surrogate
from recall_jax.losses import recall_at_k_surrogate_from_similarity
from recall_jax.simix import num_simix_pairs
from recall_jax.simix import samples_per_class_after_simix
from recall_jax.simix import simix
from recall_jax.simix import simix_pairs
from recall_jax.simix import simix_similarities


def reference_pairs(labels):
  """Classes by first appearance, then itertools.combinations of positions within the class."""
  classes = list(dict.fromkeys(labels.tolist()))
  pairs = []
  for c in classes:
    rows = np.flatnonzero(labels == c)
    pairs += [(rows[i], rows[j]) for i, j in itertools.combinations(range(len(rows)), 2)]
  return pairs


LABELS = np.array([5, 3, 5, 1, 3, 5, 5, 2, 1, 3, 8, 8], np.int32)


def test_exact_virtual_rows_for_given_alpha(x64):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(len(LABELS), 6))
  pairs = reference_pairs(LABELS)
  alpha = rng.uniform(size=len(pairs))
  out, out_labels = simix(jnp.asarray(emb), jnp.asarray(LABELS), alpha=jnp.asarray(alpha))
  assert out.shape == (len(LABELS) + len(pairs), 6) == (12 + 6 + 3 + 1 + 1, 6)
  np.testing.assert_array_equal(out[:12], emb)
  expected = np.stack([a * emb[i] + (1 - a) * emb[j] for a, (i, j) in zip(alpha, pairs)])
  np.testing.assert_allclose(out[12:], expected, rtol=1e-13, atol=1e-15)
  np.testing.assert_array_equal(out_labels, np.concatenate([LABELS, [LABELS[i] for i, _ in pairs]]))


def test_key_draws_uniform_alpha_and_jit_matches():
  emb = np.random.default_rng(1).normal(size=(len(LABELS), 4)).astype(np.float32)
  key = jax.random.key(3)
  eager, _ = simix(emb, LABELS, key, num_pairs=11)
  traced, _ = jax.jit(lambda e, l, k: simix(e, l, k, num_pairs=11))(emb, LABELS, key)
  np.testing.assert_allclose(traced, eager, rtol=1e-6)
  alpha = jax.random.uniform(key, (11,))
  assert float(alpha.min()) >= 0 and float(alpha.max()) < 1
  manual, _ = simix(emb, LABELS, alpha=alpha)
  np.testing.assert_allclose(manual, eager, rtol=1e-6)


def test_wrong_static_pair_count_poisons_under_jit():
  emb = np.ones((len(LABELS), 4), np.float32)
  out, _ = jax.jit(lambda e, l: simix(e, l, alpha=jnp.zeros(10), num_pairs=10))(emb, LABELS)
  assert np.isnan(out[12:]).all()


def test_gradients_reach_real_rows(x64):
  emb = np.random.default_rng(2).normal(size=(len(LABELS), 5))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  alpha = np.linspace(0.1, 0.9, num_simix_pairs(LABELS))

  def loss(e):
    e_aug, l_aug = simix(e, jnp.asarray(LABELS), alpha=jnp.asarray(alpha))
    return recall_at_k_surrogate(e_aug, l_aug, k_values=(1, 2, 4), tau2=0.1)

  grad = jax.grad(loss)(jnp.asarray(emb))
  # Class 2 (row 7) is a singleton: no pair, but it is a negative for every virtual query.
  assert np.all(np.abs(np.asarray(grad)).sum(axis=1) > 0)
  # The virtual rows matter: the loss differs from the loss of the real rows alone.
  real_only = recall_at_k_surrogate(emb, LABELS, k_values=(1, 2, 4), tau2=0.1)
  assert abs(float(loss(emb)) - float(real_only)) > 1e-6


def test_similarity_form_gives_same_matrix_and_loss(x64):
  emb = np.random.default_rng(4).normal(size=(len(LABELS), 7))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  key = jax.random.key(0)
  e_aug, l_aug = simix(jnp.asarray(emb), jnp.asarray(LABELS), key, num_pairs=11)
  s_aug, ls_aug = simix_similarities(jnp.asarray(emb @ emb.T), jnp.asarray(LABELS), key,
                                     num_pairs=11)
  np.testing.assert_allclose(s_aug, e_aug @ e_aug.T, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(ls_aug, l_aug)
  np.testing.assert_allclose(recall_at_k_surrogate_from_similarity(s_aug, ls_aug),
                             recall_at_k_surrogate(e_aug, l_aug), rtol=1e-10)


BALANCED = np.array([4, 9, 4, 2, 9, 2, 4, 9, 2], np.int32)  # three classes of m = 3, shuffled


@pytest.mark.usefixtures("x64")  # float64 references (conftest)
class SameMeaningInsideAndOutsideJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_layout_gives_the_reference_rows(self):
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(len(BALANCED), 4))
    pairs = reference_pairs(BALANCED)
    alpha = rng.uniform(size=len(pairs))
    expected = np.stack([a * emb[i] + (1 - a) * emb[j] for a, (i, j) in zip(alpha, pairs)])
    mix = self.variant(functools.partial(simix, samples_per_class=3))
    out, out_labels = mix(jnp.asarray(emb), jnp.asarray(BALANCED), alpha=jnp.asarray(alpha))
    chex.assert_trees_all_close(out, np.concatenate([emb, expected]), rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(out_labels, BALANCED.tolist() +
                                  [BALANCED[i] for i, _ in pairs])
    sims = self.variant(functools.partial(simix_similarities, samples_per_class=3))
    s_aug, _ = sims(jnp.asarray(emb @ emb.T), jnp.asarray(BALANCED), alpha=jnp.asarray(alpha))
    chex.assert_trees_all_close(s_aug, out @ out.T, rtol=1e-12, atol=1e-14)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_through_simix_and_the_loss(self):
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(len(BALANCED), 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    alpha = jnp.asarray(rng.uniform(size=9))
    m_aug = samples_per_class_after_simix(3)

    def loss(e, y):
      mixed, mixed_labels = simix(e, y, alpha=alpha, samples_per_class=3)
      return recall_at_k_surrogate(mixed, mixed_labels, k_values=(1, 2, 4), tau2=0.1,
                                   samples_per_class=m_aug)

    value, grad = self.variant(jax.value_and_grad(loss))(jnp.asarray(emb), jnp.asarray(BALANCED))
    # Eager, with everything inferred from the concrete labels.
    mixed, mixed_labels = simix(emb, BALANCED, alpha=alpha)
    expected = recall_at_k_surrogate(mixed, mixed_labels, k_values=(1, 2, 4), tau2=0.1)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-12)
    expected_grad = jax.grad(lambda e: recall_at_k_surrogate(
        *simix(e, BALANCED, alpha=alpha), k_values=(1, 2, 4), tau2=0.1))(jnp.asarray(emb))
    chex.assert_trees_all_close(grad, expected_grad, rtol=1e-10, atol=1e-13)

  @chex.variants(with_jit=True, without_jit=True)
  def test_wrong_layout_raises_on_concrete_labels_and_is_nan_on_traced(self):
    emb = np.ones((len(LABELS), 4))
    mix = self.variant(functools.partial(simix, num_pairs=10))
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      out, _ = mix(emb, LABELS, jax.random.key(0))
      self.assertTrue(np.isnan(out[12:]).all())
      self.assertFalse(np.isnan(out[:12]).any())
    else:
      with self.assertRaisesRegex(ValueError, "these labels give 11 SiMix pairs .* num_pairs=10"):
        mix(emb, LABELS, jax.random.key(0))


def test_samples_per_class_after_simix():
  assert [samples_per_class_after_simix(m) for m in (2, 3, 4)] == [3, 6, 10]
  labels = np.repeat(np.arange(5), 4)
  _, mixed_labels = simix(np.zeros((20, 2), np.float32), labels, jax.random.key(0),
                          samples_per_class=4)
  assert np.bincount(np.asarray(mixed_labels)).max() == samples_per_class_after_simix(4)


def test_simix_pairs_in_reference_order():
  first, second, valid = simix_pairs(LABELS.tolist(), 11)
  assert bool(valid)
  assert list(zip(first.tolist(), second.tolist())) == [tuple(p) for p in reference_pairs(LABELS)]
  first, _, _ = simix_pairs(BALANCED, samples_per_class=3)
  assert first.shape == (9,)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: simix(e, np.array([0, 0, 1, 1]), num_pairs=2), "key or explicit alpha"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), alpha=np.zeros(3)),
         "these labels give 2 SiMix pairs"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), alpha=np.zeros(3), num_pairs=2),
         "alpha must have shape"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), alpha=np.zeros((2, 1))),
         "alpha must have shape"),
        (lambda e: simix(e, np.array([0, 0, 1]), jax.random.key(0), num_pairs=2),
         "shape mismatch"),
        (lambda e: simix(e, np.array([0.0, 0, 1, 1]), jax.random.key(0), num_pairs=2),
         "integers"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), jax.random.key(0)), "batch layout"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), jax.random.key(0), samples_per_class=3),
         "does not divide"),
        (lambda e: simix(e, np.array([0, 0, 1, 1]), jax.random.key(0), num_pairs=-1),
         "num_pairs must be an integer >= 0"),
        (lambda e: simix(e[0], np.array([0, 0, 1, 1]), jax.random.key(0), num_pairs=2),
         r"shape \(B, D\)"),
        (lambda e: simix_similarities(e, np.array([0, 0, 1, 1]), jax.random.key(0),
                                      num_pairs=2), r"shape \(B, B\)"),
    ],
)
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call(np.zeros((4, 3), np.float32))


def test_layout_is_needed_inside_jit_and_out():
  emb, labels = np.zeros((4, 3), np.float32), np.array([0, 0, 1, 1])
  for fn in (simix, jax.jit(simix)):
    with pytest.raises(ValueError, match="batch layout"):
      fn(emb, labels, jax.random.key(0))
