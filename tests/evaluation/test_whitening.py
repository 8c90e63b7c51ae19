"""Tests for recall_jax.evaluation.whitening against NumPy float64 references."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import errors
from recall_jax import models
from recall_jax.evaluation import whitening


def synthetic_pairs(seed=0, n=200, d=6):
  """Correlated descriptors and pairs whose differences have a non-trivial covariance."""
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(d, d))
  x = rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)
  q = rng.permutation(n)[:120]
  p = rng.permutation(n)[:120]
  return x, q, p


def test_learned_whitening_whitens_pair_differences():
  x, q, p = synthetic_pairs()
  w = whitening.learn_whitening(x, q, p)
  assert w.kind == "learned" and w.projection.shape == (6, 6)
  np.testing.assert_allclose(w.mean, x[q].mean(axis=0), rtol=1e-12)
  diff = (x[q] - x[p]) @ w.projection.T
  np.testing.assert_allclose(diff.T @ diff / len(q), np.eye(6), atol=1e-9)
  # Independent of the eigenvector signs: P^T P = S^-1 for the pair-difference covariance S.
  s = (x[q] - x[p]).T @ (x[q] - x[p]) / len(q)
  np.testing.assert_allclose(w.projection.T @ w.projection, np.linalg.inv(s), rtol=1e-8,
                             atol=1e-10)
  # The final rotation is the PCA of the projected descriptors: decreasing, uncorrelated.
  y = (x - w.mean) @ w.projection.T
  second = y.T @ y
  np.testing.assert_allclose(second - np.diag(np.diag(second)), 0, atol=1e-8 * second.max())
  assert np.all(np.diff(np.diag(second)) <= 0)
  reduced = whitening.learn_whitening(x, q, p, dim=3)
  np.testing.assert_allclose(np.abs(reduced.projection), np.abs(w.projection[:3]), rtol=1e-10)


@pytest.mark.parametrize("power", [0.5, 0.25])
def test_pca_whitening_has_identity_covariance_up_to_the_power(power):
  x, _, _ = synthetic_pairs(1)
  w = whitening.pca_whitening(x, power=power)
  y = (x - w.mean) @ w.projection.T
  eigval = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.diag(eigval**(1 - 2 * power)),
                             rtol=1e-8, atol=1e-10)
  reduced = whitening.pca_whitening(x, power=power, dim=2)
  assert reduced.projection.shape == (2, 6)
  np.testing.assert_allclose(np.abs(reduced.projection), np.abs(w.projection[:2]), rtol=1e-8)


def test_apply_whitening_matches_numpy():
  x, q, p = synthetic_pairs(2)
  w = whitening.learn_whitening(x, q, p)
  for dim in (None, 4):
    got = np.asarray(whitening.apply_whitening(jnp.asarray(x, jnp.float32), w, dim=dim))
    want = (x - w.mean) @ w.projection[:dim or 6].T
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == (len(x), dim or 6)
    np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(AssertionError):
    whitening.apply_whitening(jnp.ones((3, 5)), w)


def test_save_load_round_trip_and_refusals(tmp_path):
  x, q, p = synthetic_pairs(3)
  w = whitening.pca_whitening(x, power=0.25, dim=4)
  whitening.save_whitening(tmp_path / "w.npz", w)
  back = whitening.load_whitening(tmp_path / "w.npz")
  assert back.kind == "pca"
  np.testing.assert_array_equal(back.projection, w.projection)
  np.testing.assert_array_equal(back.mean, w.mean)
  with pytest.raises(errors.MissingFileError):
    whitening.load_whitening(tmp_path / "absent.npz")
  (tmp_path / "w.pkl").write_bytes(pickle.dumps({"mean": x[0]}))
  with pytest.raises(errors.DataError, match="not a .npz"):
    whitening.load_whitening(tmp_path / "w.pkl")
  np.savez(tmp_path / "obj.npz", mean=np.array([object()]), projection=np.eye(2),
           kind=np.array("pca"))
  with pytest.raises(errors.DataError):
    whitening.load_whitening(tmp_path / "obj.npz")
  np.savez(tmp_path / "bad.npz", mean=np.zeros(3), projection=np.eye(2), kind=np.array("pca"))
  with pytest.raises(errors.DataError, match="inconsistent"):
    whitening.load_whitening(tmp_path / "bad.npz")


def test_bad_input_raises():
  x, q, p = synthetic_pairs(4)
  with pytest.raises(errors.DataError, match="singular"):
    whitening.learn_whitening(x, q[:3], p[:3])
  with pytest.raises(errors.DataError, match="lie in"):
    whitening.learn_whitening(x, q, p + 1000)
  with pytest.raises(errors.DataError, match="equal-length"):
    whitening.learn_whitening(x, q, p[:-1])
  with pytest.raises(errors.ConfigError):
    whitening.learn_whitening(x, q, p, dim=7)
  with pytest.raises(errors.ConfigError):
    whitening.pca_whitening(x, power=-1)
  with pytest.raises(errors.DataError, match="span fewer"):
    whitening.pca_whitening(x[:4])
  with pytest.raises(errors.DataError, match="NaN"):
    whitening.pca_whitening(np.full((5, 2), np.nan))


def test_pairs_from_labels_are_distinct_same_class_images():
  labels = np.array([0, 0, 1, 2, 2, 2, 3])
  q, p = whitening.pairs_from_labels(labels, pairs_per_class=5)
  assert len(q) == 10 and np.all(q != p) and np.all(labels[q] == labels[p])
  with pytest.raises(errors.DataError):
    whitening.pairs_from_labels(np.arange(4))


def test_whitening_fc_init_equals_test_time_whitening(tmp_path):
  model = models.get_model("resnet_tiny_landmark_test", embedding_dim=128)
  plain = models.get_model("resnet_tiny_landmark_test", whiten=False)
  variables = models.init_variables(model, jax.random.key(0), 32)
  plain_vars = {"params": {"backbone": variables["params"]["backbone"],
                           "landmark_head": {"gem": variables["params"]["landmark_head"]["gem"]}},
                "batch_stats": variables["batch_stats"]}
  images = np.random.default_rng(5).integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
  descriptors = np.asarray(jax.jit(plain.apply)(plain_vars, images), np.float64)
  w = whitening.pca_whitening(descriptors, power=0.5, dim=128)
  whitening.save_whitening(tmp_path / "pca.npz", w)
  loaded = models.load_whitening(variables, tmp_path / "pca.npz")
  got = np.asarray(jax.jit(model.apply)(loaded, images[:8]))
  want = np.asarray(whitening.apply_whitening(descriptors[:8], w))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got - np.asarray(jax.jit(model.apply)(variables, images[:8]))).max() > 1e-2
  with pytest.raises(ValueError, match="no whitening FC"):
    models.load_whitening(plain_vars, tmp_path / "pca.npz")
  whitening.save_whitening(tmp_path / "small.npz", whitening.pca_whitening(descriptors, dim=16))
  with pytest.raises(ValueError, match="does not fit"):
    models.load_whitening(variables, tmp_path / "small.npz")


def test_ridge_makes_a_singular_pair_covariance_invertible_as_the_reference_does():
  x, q, p = synthetic_pairs(3, d=6)
  q, p = q[:4], p[:4]  # 4 pairs in 6 dimensions: singular
  with pytest.raises(errors.DataError, match="eval.whitening_ridge"):
    whitening.learn_whitening(x, q, p)
  w = whitening.learn_whitening(x, q, p, ridge=1e-3)
  diff = x[q] - x[p]
  s = diff.T @ diff / len(q)
  regularised = s + 1e-3 * np.trace(s) / 6 * np.eye(6)
  # P^T P is the inverse of the regularised pair covariance, whatever the eigenvector signs.
  np.testing.assert_allclose(w.projection.T @ w.projection, np.linalg.inv(regularised),
                             rtol=1e-7, atol=1e-9)
  with pytest.raises(errors.ConfigError, match="ridge"):
    whitening.learn_whitening(x, q, p, ridge=-1.0)


def test_the_space_a_whitening_was_learned_in_is_saved_and_bad_values_are_refused(tmp_path):
  x, q, p = synthetic_pairs(4)
  space = {"target": "eval", "model": "resnet101_landmark", "scales": [1.0, 0.5], "dim_in": 6}
  w = whitening.learn_whitening(x, q, p)
  path = tmp_path / "w.npz"
  whitening.save_whitening(path, whitening.Whitening(w.mean, w.projection, w.kind, space))
  loaded = whitening.load_whitening(path)
  assert loaded.space == space
  np.testing.assert_array_equal(loaded.projection, w.projection)
  # A NaN whitening is reported as what it is, when it is loaded (not when descriptors are).
  projection = w.projection.copy()
  projection[2, 3] = np.nan
  np.savez(path, mean=w.mean, projection=projection, kind=np.array("pca"))
  with pytest.raises(errors.DataError, match="NaN or infinite"):
    whitening.load_whitening(path)
  np.savez(path, mean=w.mean.astype(str), projection=w.projection, kind=np.array("pca"))
  with pytest.raises(errors.DataError, match="must hold numbers"):
    whitening.load_whitening(path)
