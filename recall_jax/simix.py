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

The number of virtual rows is a static size, so it comes from the batch layout the caller gives
(`samples_per_class`, `num_pairs` or the length of `alpha`), never from label values: the same
call works inside and outside `jit`. Concrete labels whose pair count differs raise ValueError;
traced ones give NaN virtual rows instead.

Serves both tasks.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax.losses import _common
from recall_jax.numerics import is_concrete


def samples_per_class_after_simix(samples_per_class: int) -> int:
  """Rows per class after SiMix, m + m (m - 1) / 2: the layout to give the loss of a SiMix batch.

  Examples:
    >>> from recall_jax.simix import samples_per_class_after_simix
    >>> samples_per_class_after_simix(4)
    10
  """
  m = _common.positive_int("samples_per_class", samples_per_class)
  return m + m * (m - 1) // 2


def num_simix_pairs(labels) -> int:
  """Number of virtual rows SiMix adds to concrete labels: sum over classes of n (n - 1) / 2."""
  _, counts = np.unique(np.asarray(labels), return_counts=True)
  return int(np.sum(counts * (counts - 1) // 2))


def _resolve_num_pairs(labels, *, samples_per_class, num_pairs, alpha) -> int:
  """The static pair count from the layout arguments; ValueError when absent or inconsistent."""
  num_rows = labels.shape[0]
  given = {}
  if samples_per_class is not None:
    m = _common.positive_int("samples_per_class", samples_per_class)
    if num_rows % m:
      raise ValueError(
          f"samples_per_class={m} does not divide the batch of {num_rows} rows")
    given["samples_per_class"] = (num_rows // m) * (m * (m - 1) // 2)
  if num_pairs is not None:
    if isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 0:
      raise ValueError(f"num_pairs must be an integer >= 0, got {num_pairs!r}")
    given["num_pairs"] = int(num_pairs)
  if alpha is not None:
    if np.ndim(alpha) != 1:
      raise ValueError(f"alpha must have shape (num_pairs,) (one per pair), got "
                       f"{np.shape(alpha)}")
    given["alpha"] = int(np.shape(alpha)[0])
  if not given:
    raise ValueError(
        "SiMix needs the batch layout to size its output: pass samples_per_class (every class "
        "has that many rows), num_pairs, or alpha")
  if len(set(given.values())) > 1:
    raise ValueError(
        "alpha must have shape (num_pairs,) (one per pair): the layout arguments disagree on "
        "the number of pairs: " + ", ".join(f"{k} gives {v}" for k, v in given.items()))
  count = next(iter(given.values()))
  if is_concrete(labels):
    needed = num_simix_pairs(labels)
    if needed != count:
      source = ", ".join(f"{k}" for k in given)
      raise ValueError(
          f"these labels give {needed} SiMix pairs but the layout ({source}) gives num_pairs="
          f"{count}")
  return count


def simix_pairs(labels, num_pairs: int | None = None, *, samples_per_class: int | None = None):
  """The row indices (a, b) of every same-class pair, in SiMix order.

  Args:
    labels: (B,) integer labels (array or array-like).
    num_pairs: the static number of pairs; or
    samples_per_class: m, every class having m rows: num_pairs = B / m * m (m - 1) / 2.

  Returns:
    first, second: (num_pairs,) int32 row indices with first < second.
    valid: scalar bool, False when traced labels do not give exactly `num_pairs` pairs.

  Raises:
    ValueError: on bad labels, a missing or inconsistent layout, or concrete labels giving
      another number of pairs.
  """
  labels = _common.check_labels(labels)
  count = _resolve_num_pairs(labels, samples_per_class=samples_per_class, num_pairs=num_pairs,
                             alpha=None)
  return _simix_pairs(jnp.asarray(labels), count)


@functools.partial(jax.jit, static_argnames="num_pairs")
def _simix_pairs(labels: jax.Array, num_pairs: int):
  b = labels.shape[0]
  order, start, count, position = _common.class_groups(labels)
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
    return jnp.asarray(alpha, dtype)
  if key is None:
    raise ValueError("simix needs a PRNG key or explicit alpha values")
  return jax.random.uniform(key, (num_pairs,), dtype=dtype)


def _prepare(x, labels, key, alpha, samples_per_class, num_pairs):
  labels = _common.check_labels(labels, x.shape[0])
  if alpha is None and key is None:
    raise ValueError("simix needs a PRNG key or explicit alpha values")
  count = _resolve_num_pairs(labels, samples_per_class=samples_per_class, num_pairs=num_pairs,
                             alpha=alpha)
  first, second, valid = _simix_pairs(jnp.asarray(labels), count)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return jnp.asarray(labels), first, second, valid, _alphas(key, alpha, count, dtype)


def simix(
    embeddings: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    alpha: jax.Array | None = None,
    samples_per_class: int | None = None,
    num_pairs: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Appends SiMix virtual rows to a batch of embeddings.

  Args:
    embeddings: (B, D) float embeddings.
    labels: (B,) integer labels (array or array-like), any order.
    key: PRNG key drawing alpha ~ U[0, 1) per pair; ignored when `alpha` is given.
    alpha: optional (num_pairs,) mixing weights, in SiMix pair order (module docstring).
    samples_per_class: the batch layout, m: every class has m rows, so there are
      B / m * m (m - 1) / 2 pairs (B must be a multiple of m).
    num_pairs: the static number of pairs, instead of `samples_per_class`. One of
      `samples_per_class`, `num_pairs` or `alpha` is needed, inside `jit` or not.

  Returns:
    embeddings_aug: (B + num_pairs, D), the real rows then the virtual rows, not renormalised.
      NaN virtual rows when the labels are traced and do not give exactly `num_pairs` pairs.
    labels_aug: (B + num_pairs,) labels of the real then the virtual rows.

  Raises:
    ValueError: on a shape mismatch, non-integer or empty labels, neither key nor alpha, a
      missing or inconsistent layout, or concrete labels giving another number of pairs.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from recall_jax.simix import simix
    >>> embeddings = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    >>> mixed, mixed_labels = simix(embeddings, [0, 0, 1, 1], alpha=jnp.array([0.5, 0.25]))
    >>> mixed[4:].tolist(), mixed_labels.tolist()
    ([[0.5, 0.5], [-0.5, 1.0]], [0, 0, 1, 1, 0, 1])
    >>> # Under jit the layout sizes the output; the key draws one alpha per pair.
    >>> augment = jax.jit(lambda e, y, k: simix(e, y, k, samples_per_class=2))
    >>> augment(embeddings, jnp.array([0, 0, 1, 1]), jax.random.key(0))[0].shape
    (6, 2)
  """
  embeddings = _common.as_array(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must have shape (B, D), got shape {embeddings.shape}")
  labels, first, second, valid, a = _prepare(embeddings, labels, key, alpha, samples_per_class,
                                             num_pairs)
  return _mix_rows(jnp.asarray(embeddings), labels, first, second, valid, a)


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
    samples_per_class: int | None = None,
    num_pairs: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """SiMix in similarity form: the similarity matrix of the `simix`-augmented batch.

  Args:
    similarities: (B, B) similarity matrix of the real rows (`E @ E.T`).
    labels, key, alpha, samples_per_class, num_pairs: as in `simix`; the same key or alpha
      gives the same virtual rows.

  Returns:
    similarities_aug: (B + num_pairs, B + num_pairs), equal to `E_aug @ E_aug.T` for
      `E_aug, _ = simix(E, labels, key, alpha=alpha)` up to float rounding.
    labels_aug: (B + num_pairs,).

  Raises:
    ValueError: as `simix`, with a (B, B) matrix in place of the embeddings.

  Examples:
    >>> import jax.numpy as jnp
    >>> from recall_jax.simix import simix_similarities
    >>> embeddings = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    >>> sims, _ = simix_similarities(embeddings @ embeddings.T, [0, 0, 1, 1],
    ...                              alpha=jnp.array([0.5, 0.25]))
    >>> sims.shape, float(sims[4, 4])
    ((6, 6), 0.5)
  """
  similarities = _common.as_array(similarities)
  if similarities.ndim != 2 or similarities.shape[0] != similarities.shape[1]:
    raise ValueError(f"similarities must have shape (B, B), got shape {similarities.shape}")
  labels, first, second, valid, a = _prepare(similarities, labels, key, alpha, samples_per_class,
                                             num_pairs)
  return _mix_similarities(jnp.asarray(similarities), labels, first, second, valid, a)


@jax.jit
def _mix_similarities(similarities, labels, first, second, valid, a):
  rows = jnp.concatenate(
      [similarities, a[:, None] * similarities[first] + (1 - a[:, None]) * similarities[second]],
      axis=0)
  full = jnp.concatenate(
      [rows, a[None, :] * rows[:, first] + (1 - a[None, :]) * rows[:, second]], axis=1)
  full = jnp.where(valid, full, jnp.nan)
  return full, jnp.concatenate([labels, labels[first]], axis=0)
