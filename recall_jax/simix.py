"""SiMix: similarity mixup of same-class embeddings (Patel, Tolias, Matas, CVPR 2022).

For every class in the batch and every unordered pair (a, b) of its rows, SiMix adds a virtual
row `alpha * e_a + (1 - alpha) * e_b` with its own `alpha ~ U[0, 1)`, labelled with the class and
deliberately not renormalised. Virtual rows act as extra queries, positives and negatives of the
RS@k loss; gradients flow back to the real rows through the mixing.

Pair order (which fixes which `alpha` goes with which pair): classes in order of first
appearance in the batch; within a class, pairs of its rows' positions in
`itertools.combinations` order ((0, 1), (0, 2), ..., (1, 2), ...), positions counted in row
order. With m rows per class there are m (m - 1) / 2 virtual rows per class: 6 for m = 4, so a
4,000-image batch becomes 10,000 rows.

Because similarity is bilinear, mixing vectors and mixing similarities are the same thing:
`(alpha e_a + (1 - alpha) e_b) . x = alpha s_ax + (1 - alpha) s_bx`. `simix_similarities`
builds the augmented similarity matrix from the real one by two gathers instead of a
(B + N_p) x (B + N_p) x D matmul, which is cheaper when D is large.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax.losses.recall_at_k import check_labels
from recall_jax.losses.recall_at_k import class_groups


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def num_simix_pairs(labels) -> int:
  """Number of virtual rows SiMix adds: sum over classes of n (n - 1) / 2 (concrete labels)."""
  _, counts = np.unique(np.asarray(labels), return_counts=True)
  return int(np.sum(counts * (counts - 1) // 2))


def _resolve_num_pairs(labels, num_pairs: int | None) -> int:
  if _is_concrete(labels):
    needed = num_simix_pairs(labels)
    if num_pairs is not None and num_pairs != needed:
      raise ValueError(f"num_pairs={num_pairs} but these labels give {needed} SiMix pairs")
    return needed
  if num_pairs is None:
    raise ValueError(
        "labels are traced (inside jit/grad), so the number of SiMix pairs cannot be inferred: "
        "pass num_pairs (classes x m (m - 1) / 2 for m rows per class)")
  return int(num_pairs)


def simix_pairs(labels: jax.Array, num_pairs: int | None = None):
  """The row indices (a, b) of every same-class pair, in SiMix order.

  Args:
    labels: (B,) integer labels.
    num_pairs: static number of pairs; inferred from concrete labels, required under jit.

  Returns:
    first, second: (num_pairs,) int32 row indices with first < second.
    valid: scalar bool, False when traced labels do not give exactly `num_pairs` pairs.
  """
  return _simix_pairs(jnp.asarray(labels), _resolve_num_pairs(labels, num_pairs))


@functools.partial(jax.jit, static_argnames="num_pairs")
def _simix_pairs(labels: jax.Array, num_pairs: int):
  b = labels.shape[0]
  order, start, count, position = class_groups(labels)
  first_row_of_class = order[start]  # the stable sort keeps a class's smallest row first
  is_first = position == 0
  class_pairs = count * (count - 1) // 2
  # Classes in order of first appearance = first-occurrence rows in row order.
  class_offset = (jnp.cumsum(jnp.where(is_first, class_pairs, 0)) -
                  jnp.where(is_first, class_pairs, 0))[first_row_of_class]
  # Row at position g of a class of size n opens the pairs (g, g+1..n-1).
  g, n = position, count
  segment_start = class_offset + g * n - g * (g + 1) // 2
  segment_len = n - 1 - g
  key = jnp.where(segment_len > 0, segment_start, jnp.iinfo(jnp.int32).max)
  by_start = jnp.argsort(key, stable=True)
  pair = jnp.arange(num_pairs)
  owner = by_start[jnp.clip(jnp.searchsorted(key[by_start], pair, side="right") - 1, 0, b - 1)]
  h = g[owner] + 1 + (pair - segment_start[owner])
  second = order[jnp.clip(start[owner] + h, 0, b - 1)]
  total = jnp.sum(jnp.where(is_first, class_pairs, 0))
  valid = total == num_pairs
  return owner.astype(jnp.int32), second.astype(jnp.int32), valid


def _alphas(key, alpha, num_pairs: int, dtype) -> jax.Array:
  if alpha is not None:
    alpha = jnp.asarray(alpha, dtype)
    if alpha.shape != (num_pairs,):
      raise ValueError(f"alpha must have shape ({num_pairs},) (one per pair), got {alpha.shape}")
    return alpha
  if key is None:
    raise ValueError("simix needs a PRNG key or explicit alpha values")
  return jax.random.uniform(key, (num_pairs,), dtype=dtype)


def simix(
    embeddings: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    alpha: jax.Array | None = None,
    num_pairs: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Appends SiMix virtual rows to a batch of embeddings.

  Args:
    embeddings: (B, D) float embeddings.
    labels: (B,) integer labels, any order.
    key: PRNG key drawing alpha ~ U[0, 1) per pair; ignored when `alpha` is given.
    alpha: optional (num_pairs,) mixing weights, in SiMix pair order (module docstring).
    num_pairs: static number of pairs; inferred from concrete labels, required under jit.

  Returns:
    embeddings_aug: (B + num_pairs, D), the real rows then the virtual rows, not renormalised.
      Under jit, rows are NaN when the labels do not give exactly `num_pairs` pairs.
    labels_aug: (B + num_pairs,) labels of the real then the virtual rows.
  """
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must have shape (B, D), got shape {embeddings.shape}")
  check_labels(labels, embeddings.shape[0])
  first, second, valid = simix_pairs(labels, num_pairs)
  a = _alphas(key, alpha, first.shape[0], embeddings.dtype)
  return _mix_rows(embeddings, jnp.asarray(labels), first, second, valid, a)


@jax.jit
def _mix_rows(embeddings, labels, first, second, valid, alpha):
  a = alpha[:, None]
  virtual = a * embeddings[first] + (1 - a) * embeddings[second]
  virtual = jnp.where(valid, virtual, jnp.nan)
  chex.assert_equal_shape_suffix([virtual, embeddings], 1)
  return (jnp.concatenate([embeddings, virtual], axis=0),
          jnp.concatenate([labels, labels[first]], axis=0))


def simix_similarities(
    similarities: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    alpha: jax.Array | None = None,
    num_pairs: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """SiMix in similarity form: the similarity matrix of the `simix`-augmented batch.

  Args:
    similarities: (B, B) similarity matrix of the real rows (`E @ E.T`).
    labels, key, alpha, num_pairs: as in `simix`; the same key or alpha gives the same virtual
      rows.

  Returns:
    similarities_aug: (B + num_pairs, B + num_pairs), equal to `E_aug @ E_aug.T` for
      `E_aug, _ = simix(E, labels, key, alpha=alpha)` up to float rounding.
    labels_aug: (B + num_pairs,).
  """
  if similarities.ndim != 2 or similarities.shape[0] != similarities.shape[1]:
    raise ValueError(f"similarities must have shape (B, B), got shape {similarities.shape}")
  check_labels(labels, similarities.shape[0])
  first, second, valid = simix_pairs(labels, num_pairs)
  a = _alphas(key, alpha, first.shape[0], similarities.dtype)
  return _mix_similarities(similarities, jnp.asarray(labels), first, second, valid, a)


@jax.jit
def _mix_similarities(similarities, labels, first, second, valid, a):
  rows = jnp.concatenate(
      [similarities, a[:, None] * similarities[first] + (1 - a[:, None]) * similarities[second]],
      axis=0)
  full = jnp.concatenate(
      [rows, a[None, :] * rows[:, first] + (1 - a[None, :]) * rows[:, second]], axis=1)
  full = jnp.where(valid, full, jnp.nan)
  return full, jnp.concatenate([labels, labels[first]], axis=0)
