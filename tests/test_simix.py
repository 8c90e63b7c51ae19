"""SiMix: exact virtual rows, pair order, gradients, and the similarity form."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses import recall_at_k_surrogate
from recall_jax.losses import recall_at_k_surrogate_from_similarity
from recall_jax.simix import num_simix_pairs
from recall_jax.simix import simix
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
  eager, _ = simix(emb, LABELS, key)
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
    return recall_at_k_surrogate(e_aug, l_aug, tau2=0.1)

  grad = jax.grad(loss)(jnp.asarray(emb))
  # Class 2 (row 7) is a singleton: no pair, but it is a negative for every virtual query.
  assert np.all(np.abs(np.asarray(grad)).sum(axis=1) > 0)
  # The virtual rows matter: the loss differs from the loss of the real rows alone.
  assert abs(float(loss(emb)) - float(recall_at_k_surrogate(emb, LABELS, tau2=0.1))) > 1e-6


def test_similarity_form_gives_same_matrix_and_loss(x64):
  emb = np.random.default_rng(4).normal(size=(len(LABELS), 7))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  key = jax.random.key(0)
  e_aug, l_aug = simix(jnp.asarray(emb), jnp.asarray(LABELS), key)
  s_aug, ls_aug = simix_similarities(jnp.asarray(emb @ emb.T), jnp.asarray(LABELS), key)
  np.testing.assert_allclose(s_aug, e_aug @ e_aug.T, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(ls_aug, l_aug)
  np.testing.assert_allclose(recall_at_k_surrogate_from_similarity(s_aug, ls_aug),
                             recall_at_k_surrogate(e_aug, l_aug), rtol=1e-10)


def test_bad_input():
  emb = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="key or explicit alpha"):
    simix(emb, np.array([0, 0, 1, 1]))
  with pytest.raises(ValueError, match="alpha must have shape"):
    simix(emb, np.array([0, 0, 1, 1]), alpha=np.zeros(3))
  with pytest.raises(ValueError, match="shape mismatch"):
    simix(emb, np.array([0, 0, 1]), jax.random.key(0))
  with pytest.raises(ValueError, match="num_pairs"):
    jax.jit(lambda e, l: simix(e, l, jax.random.key(0)))(emb, np.array([0, 0, 1, 1]))
