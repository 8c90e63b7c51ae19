"""Descriptor whitening: learned from positive pairs, or PCA-whitening; stored as `.npz`.

Serves instance-level retrieval (landmarks).

A whitening is an affine map x -> P (x - m) followed by L2 normalisation, with m (D,) a mean and
P (D_out, D) a projection whose rows are sorted by decreasing variance, so the first d rows are
the dimension reduction to d.

* `learn_whitening` (Radenovic, Tolias and Chum, "Fine-tuning CNN image retrieval with no human
  annotation", TPAMI 2018, after Mikolajczyk and Matas, ICCV 2007): m = mean of the query
  descriptors; P_1 = L^-1 with L L^T = S the covariance of the pair differences q - p; then P =
  V^T P_1 with V the eigenvectors of the covariance of P_1 (x - m) over all descriptors. Pair
  differences whitened by P have identity covariance.
* `pca_whitening`: m = mean of the descriptors, P = diag(lambda^-power) V^T from the eigen-
  decomposition of their covariance. power = 0.5 whitens fully (identity covariance); 0.25 (as
  some landmark papers use) leaves covariance diag(lambda^(1 - 2 power)).

Both are learned once on the host in float64 NumPy. A whitening either initialises the landmark
head's FC before training (`recall_jax.models.load_whitening`) or is applied to descriptors at
test time (`apply_whitening`), and only to the descriptors it was learned from: files hold plain
arrays `mean`, `projection`, a string `kind` and (from `--mode whiten`) a JSON string `space`
naming those descriptors (`config_checks.whitening_space`), read with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import errors

KINDS = ("learned", "pca")


@dataclasses.dataclass(frozen=True)
class Whitening:
  """x -> P (x - m), then L2 normalisation.

  Attributes:
    mean: float64 (D,) m.
    projection: float64 (D_out, D) P, rows by decreasing variance.
    kind: 'learned' or 'pca'.
    space: what descriptors it was learned on (model, head, scales...), or None if unrecorded.
  """

  mean: np.ndarray
  projection: np.ndarray
  kind: str
  space: dict | None = None


def _as_matrix(descriptors: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(descriptors, np.float64)
  if x.ndim != 2 or not x.size:
    raise errors.DataError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise errors.DataError(f"{name} contain NaN or infinite values")
  return x


def _descending_eigh(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  eigval, eigvec = np.linalg.eigh((covariance + covariance.T) / 2)
  return eigval[::-1], eigvec[:, ::-1]


def _check_dim(dim: int | None, width: int) -> int:
  if dim is None:
    return width
  if not 1 <= dim <= width:
    raise errors.ConfigError(f"whitening dimension must be in [1, {width}], got {dim}")
  return dim


def learn_whitening(descriptors: np.ndarray, query_indices: np.ndarray,
                    positive_indices: np.ndarray, *, dim: int | None = None,
                    ridge: float = 0.0) -> Whitening:
  """Learns a whitening from matching pairs (Radenovic et al.'s `whitenlearn`).

  Args:
    descriptors: (N, D) descriptors (e.g. L2-normalised GeM of the training images).
    query_indices: (P,) int rows of the pairs' queries.
    positive_indices: (P,) int rows of their positives (same landmark / 3D model).
    dim: keep the first `dim` output dimensions (default: D).
    ridge: adds ridge * trace(S) / D * I to the pair covariance S, which makes it invertible
      with fewer than D independent pairs (the reference code's regularisation; 0: none).

  Returns:
    A `Whitening` of kind 'learned'; P (q - p) over the pairs has identity second moment (that
    of S + ridge * trace(S) / D * I with a ridge).

  Raises:
    DataError: bad shapes, out-of-range indices, or pair differences whose covariance is
      singular (fewer than D independent pairs) with no ridge.
    ConfigError: `dim` out of range or a negative ridge.
  """
  x = _as_matrix(descriptors, "descriptors")
  q, p = np.asarray(query_indices), np.asarray(positive_indices)
  if q.ndim != 1 or q.shape != p.shape or not q.size:
    raise errors.DataError(f"query_indices and positive_indices must be equal-length non-empty "
                           f"vectors, got shapes {q.shape} and {p.shape}")
  if not (np.issubdtype(q.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
    raise errors.DataError("pair indices must be integers")
  if min(q.min(), p.min()) < 0 or max(q.max(), p.max()) >= len(x):
    raise errors.DataError(f"pair indices must lie in [0, {len(x)})")
  dim = _check_dim(dim, x.shape[1])
  mean = x[q].mean(axis=0)
  diff = x[q] - x[p]
  if not (np.isfinite(ridge) and ridge >= 0):
    raise errors.ConfigError(f"whitening ridge must be a finite number >= 0, got {ridge}")
  covariance = diff.T @ diff / len(diff)
  covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
  try:
    lower = np.linalg.cholesky(covariance)
  except np.linalg.LinAlgError as e:
    raise errors.DataError(
        f"the covariance of the {len(diff)} pair differences is singular in {x.shape[1]} "
        f"dimensions; learning a whitening needs at least as many independent pairs as "
        f"dimensions, or a ridge (eval.whitening_ridge, e.g. 1e-3)") from e
  inverse_cholesky = np.linalg.solve(lower, np.eye(len(lower)))
  projected = (x - mean) @ inverse_cholesky.T
  _, eigvec = _descending_eigh(projected.T @ projected)
  return Whitening(mean, (eigvec.T @ inverse_cholesky)[:dim], "learned")


def pca_whitening(descriptors: np.ndarray, *, power: float = 0.5,
                  dim: int | None = None) -> Whitening:
  """PCA-whitening of training descriptors with an eigenvalue power.

  Args:
    descriptors: (N, D) training descriptors.
    power: eigenvalues are raised to -power: 0.5 whitens, 0.25 whitens partially.
    dim: keep the `dim` leading principal directions (default: D).

  Returns:
    A `Whitening` of kind 'pca'; the whitened (unnormalised) training descriptors have
    covariance diag(lambda_i^(1 - 2 power)).

  Raises:
    DataError: bad descriptors, or a kept direction with (numerically) zero variance (pass a
      smaller `dim`, at most the number of descriptors minus one).
    ConfigError: `power` < 0 or `dim` out of range.
  """
  x = _as_matrix(descriptors, "descriptors")
  if power < 0:
    raise errors.ConfigError(f"whitening power must be >= 0, got {power}")
  dim = _check_dim(dim, x.shape[1])
  mean = x.mean(axis=0)
  centred = x - mean
  eigval, eigvec = _descending_eigh(centred.T @ centred / len(x))
  eigval, eigvec = eigval[:dim], eigvec[:, :dim]
  if eigval[-1] <= 1e-12 * max(eigval[0], 1e-300):
    raise errors.DataError(
        f"the {len(x)} descriptors span fewer than {dim} dimensions; pass dim <= "
        f"{int(np.sum(eigval > 1e-12 * max(eigval[0], 1e-300)))}")
  return Whitening(mean, eigval[:, None]**-power * eigvec.T, "pca")


def apply_whitening(descriptors: jax.Array, whitening: Whitening, *,
                    dim: int | None = None) -> jax.Array:
  """Whitens and L2-normalises descriptors, in float32.

  Args:
    descriptors: (N, D) descriptors (a block of a large database at a time).
    whitening: from `learn_whitening`, `pca_whitening` or `load_whitening`.
    dim: use the first `dim` rows of the projection (default: all).

  Returns:
    float32 (N, dim) unit-norm whitened descriptors.
  """
  projection = whitening.projection[:_check_dim(dim, len(whitening.projection))]
  chex.assert_rank(descriptors, 2)
  chex.assert_axis_dimension(descriptors, 1, projection.shape[1])
  centred = jnp.asarray(descriptors, jnp.float32) - jnp.asarray(whitening.mean, jnp.float32)
  y = centred @ jnp.asarray(projection, jnp.float32).T
  return y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, axis=-1, keepdims=True), 1e-24))


def save_whitening(path: str | pathlib.Path, whitening: Whitening) -> None:
  """Writes `mean`, `projection`, `kind` (and `space` as JSON) to an uncompressed `.npz`."""
  extra = {} if whitening.space is None else {"space": np.array(json.dumps(whitening.space))}
  np.savez(pathlib.Path(path), mean=np.asarray(whitening.mean, np.float64),
           projection=np.asarray(whitening.projection, np.float64),
           kind=np.array(whitening.kind), **extra)


def load_whitening(path: str | pathlib.Path) -> Whitening:
  """Reads a whitening written by `save_whitening`.

  Raises:
    MissingFileError: the file does not exist.
    DataError: not a `.npz` of the expected plain arrays (pickled objects are never loaded),
      non-numeric or non-finite values.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f"whitening file not found: {path}")
  if not zipfile.is_zipfile(path):  # np.load would otherwise try to unpickle it.
    raise errors.DataError(f"{path} is not a .npz whitening file")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
  except ValueError as e:
    raise errors.DataError(f"could not read whitening {path}: {e}") from e
  if not {"mean", "projection", "kind"} <= set(arrays) <= {"mean", "projection", "kind", "space"}:
    raise errors.DataError(f"whitening {path} must hold mean, projection, kind (and space), got "
                           f"{sorted(arrays)}")
  mean, projection, kind = arrays["mean"], arrays["projection"], str(arrays["kind"])
  if mean.dtype.kind not in "iuf" or projection.dtype.kind not in "iuf":
    raise errors.DataError(f"whitening {path} must hold numbers, got mean {mean.dtype} and "
                           f"projection {projection.dtype}")
  if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != len(mean) or (
      kind not in KINDS):
    raise errors.DataError(f"whitening {path} is inconsistent: mean {mean.shape}, projection "
                           f"{projection.shape}, kind {kind!r}")
  if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
    raise errors.DataError(f"whitening {path} holds NaN or infinite values")
  try:
    space = json.loads(str(arrays["space"])) if "space" in arrays else None
  except ValueError as e:
    raise errors.DataError(f"whitening {path}: unreadable space record: {e}") from None
  return Whitening(mean.astype(np.float64), projection.astype(np.float64), kind, space)


def pairs_from_labels(labels: np.ndarray, *, pairs_per_class: int = 10,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Samples (query, positive) index pairs of distinct images with the same label.

  Args:
    labels: (N,) int class of each descriptor.
    pairs_per_class: pairs drawn per class with at least two images.
    seed: NumPy seed.

  Returns:
    int64 (P,) query indices and (P,) positive indices.

  Raises:
    DataError: no class has two images.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  queries, positives = [], []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) < 2:
      continue
    for _ in range(pairs_per_class):
      q, p = rng.choice(members, size=2, replace=False)
      queries.append(q)
      positives.append(p)
  if not queries:
    raise errors.DataError("no class has two images to form a positive pair")
  return np.asarray(queries, np.int64), np.asarray(positives, np.int64)
