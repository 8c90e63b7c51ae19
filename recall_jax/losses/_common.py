"""Batch helpers shared by the losses: validation, positives in static slots, query blocks.

Static sizes (the number of positive slots per query, the query block) are decided from shapes
and the caller's arguments alone, never from label values, so a loss means the same inside and
outside `jit`. Label values are checked only where they are concrete; the documented traced
behaviour (a NaN loss) is what a caller relies on.

Serves both tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
import numbers
import operator
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax.numerics import compute_dtype
from recall_jax.numerics import is_concrete
from recall_jax.numerics import similarity

# Fixed budget for the temporaries of the losses that rank positives against the batch
# (RS@k, Smooth-AP) when the caller gives no `query_block`.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
# Elements the backward pass of one block holds per (query, slot, row) term and per (query, row)
# similarity; XLA's CPU plan for RS@k needs about 2 and 1, the margin covers other backends.
_ARRAYS_PER_TERM = 3
_ARRAYS_PER_SIMILARITY = 2
_CLIP = 50.0

OVERFLOW_MESSAGE = (
    "a query has {needed} positives but the batch layout gives {slots} slots ({source}); "
    "pass the real layout (samples_per_class = rows per class, counting SiMix's virtual rows) "
    "or a larger max_positives")
NO_POSITIVE_MESSAGE = "no query has a positive: every label occurs once in the batch"


def clipped_sigmoid(x: jax.Array) -> jax.Array:
  """`sigmoid(clip(x, -50, 50))`, the sigmoid of the official RS@k and Smooth-AP code."""
  return jax.nn.sigmoid(jnp.clip(x, -_CLIP, _CLIP))


def as_array(x):
  """jax arrays (and tracers) as they are; array-likes (lists, tuples, NumPy) as NumPy arrays.

  NumPy keeps label values concrete even inside `jit`, where `jnp.asarray` would not matter but
  a list would not have `.ndim`.
  """
  return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def check_labels(labels, num_rows: int | None = None):
  """`labels` as an array; ValueError unless a non-empty 1-D integer array of `num_rows` entries."""
  labels = as_array(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (B,), got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.shape[0] == 0:
    raise ValueError("empty batch: labels has no entries")
  if num_rows is not None and labels.shape[0] != num_rows:
    raise ValueError(f"shape mismatch: {num_rows} embedding rows but {labels.shape[0]} labels")
  return labels


def check_batch(embeddings, labels):
  """`(embeddings, labels)` as arrays; ValueError unless (B, D) floats and (B,) integers."""
  embeddings = as_array(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must have shape (B, D), got shape {embeddings.shape}")
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
  return embeddings, check_labels(labels, embeddings.shape[0])


def check_similarity_batch(similarities, labels):
  """`(similarities, labels)` as arrays; ValueError unless (B, B) floats and (B,) integers."""
  similarities = as_array(similarities)
  if similarities.ndim != 2 or similarities.shape[0] != similarities.shape[1]:
    raise ValueError(f"similarities must have shape (B, B), got shape {similarities.shape}")
  if not jnp.issubdtype(similarities.dtype, jnp.floating):
    raise ValueError(f"similarities must be floating point, got dtype {similarities.dtype}")
  return similarities, check_labels(labels, similarities.shape[0])


def finite_number(name: str, value) -> float:
  """`value` as a float; ValueError unless a finite real number (not a bool or an array)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return float(value)


def positive_number(name: str, value) -> float:
  """`value` as a float; ValueError unless finite and > 0."""
  value = finite_number(name, value)
  if value <= 0:
    raise ValueError(f"{name} must be > 0, got {value}")
  return value


def positive_int(name: str, value) -> int:
  """`value` as an int; ValueError unless an integer (not a bool or a float) >= 1."""
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
  if value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value}")
  return value


def check_k_values(k_values: Sequence[int] | None, num_rows: int,
                   default: tuple[int, ...]) -> tuple[int, ...]:
  """The cut-offs as a tuple of ints; None means `default`.

  Raises:
    ValueError: unless every k is a positive integer below `num_rows - 1`, the number of
      database rows of a query: Recall@k is 1 for any ranking once k reaches it.
  """
  if k_values is None:
    k_values = default
  if isinstance(k_values, np.ndarray) and k_values.ndim == 1:
    k_values = k_values.tolist()
  if isinstance(k_values, (str, bytes)) or not isinstance(k_values, Sequence):
    raise ValueError(f"k_values must be a sequence of positive integers, got {k_values!r}")
  if not k_values:
    raise ValueError("k_values must not be empty")
  checked = []
  for k in k_values:
    try:
      checked.append(positive_int("k", k))
    except ValueError:
      raise ValueError(
          f"every k must be a positive integer, got k_values={tuple(k_values)}") from None
  too_big = [k for k in checked if k >= num_rows - 1]
  if too_big:
    raise ValueError(
        f"k = {too_big[0]} is not below B - 1 = {num_rows - 1} (B = {num_rows} rows): every "
        "query's positives are within its top k whatever the embeddings; use k < B - 1 or a "
        "larger batch")
  return tuple(checked)


def check_query_block(query_block) -> int | None:
  """None or a positive int."""
  return None if query_block is None else positive_int("query_block", query_block)


def largest_class(labels) -> int:
  """Rows of the largest class in concrete `labels`."""
  _, counts = np.unique(np.asarray(labels), return_counts=True)
  return int(counts.max())


def _most_database_positives(labels, num_queries: int | None, valid) -> int:
  """The most positives (valid rows of its label, other than itself) of any query."""
  values = np.asarray(labels)
  kept = values if valid is None else values[np.asarray(valid, bool)]
  classes, counts = np.unique(kept, return_counts=True)
  queries = values[:num_queries]
  return int(counts[np.searchsorted(classes, queries)].max()) - 1


def positive_slots(labels, *, samples_per_class: int | None, max_positives: int | None,
                   num_queries: int | None = None, valid=None) -> int:
  """The static number P of positive slots per query, from the batch layout.

  `samples_per_class = m` gives P = m - 1; `max_positives` gives P directly. With neither, P is
  the largest class minus one when `labels` are concrete and B - 1 (enough for any labels, at
  O(B^2) slots' cost, with a warning) when traced: the value of the loss is the same either way.

  Where `labels` are concrete, a query with more positives than P, or a batch without any
  positive pair, raises ValueError; traced labels cannot be checked, and the loss is NaN.

  Args:
    labels: (B,) integer labels, concrete or traced.
    samples_per_class: the most rows any class has in the batch (SiMix's virtual rows
      included), >= 2.
    max_positives: the most positives (same label, other rows) of any query, >= 1.
    num_queries: for a query/database loss, B: the queries are the first B of the `labels`
      rows (the database's). None: every row is a query.
    valid: (N,) bool, the database rows that count (None: all).

  Returns:
    P, between 1 and B - 1.
  """
  num_rows = labels.shape[0]
  if samples_per_class is not None and max_positives is not None:
    raise ValueError(
        f"give samples_per_class ({samples_per_class}) or max_positives ({max_positives}), "
        "not both")
  if samples_per_class is not None:
    m = positive_int("samples_per_class", samples_per_class)
    if m < 2:
      raise ValueError(
          "samples_per_class must be >= 2: with one row per class no query has a positive")
    slots, source = m - 1, f"samples_per_class={m}"
  elif max_positives is not None:
    slots = positive_int("max_positives", max_positives)
    source = f"max_positives={slots}"
  else:
    slots, source = None, None

  if is_concrete(labels) and (valid is None or is_concrete(valid)):
    if num_queries is None and valid is None:
      needed = largest_class(labels) - 1
    else:
      needed = _most_database_positives(labels, num_queries, valid)
    if needed == 0:
      raise ValueError(NO_POSITIVE_MESSAGE)
    if slots is None:
      slots = needed
    elif needed > slots:
      raise ValueError(OVERFLOW_MESSAGE.format(needed=needed, slots=slots, source=source))
  elif slots is None:
    slots = num_rows - 1
    warnings.warn(
        f"labels are traced and no batch layout was given, so every query gets B - 1 = {slots} "
        "positive slots (right for any labels, but O(B^3) work); pass samples_per_class "
        "(rows per class) or max_positives", stacklevel=3)
  return max(1, min(slots, num_rows - 1))


def query_block_for(num_rows: int, slots: int, itemsize: int, memory_budget_bytes,
                    query_block, num_columns: int | None = None) -> int | None:
  """The query block: the caller's, or the largest whose temporaries fit the budget.

  A block of Q queries ranks P slots against N rows, so the backward pass holds about
  Q * N * (3 P + 2) elements. Blocks are balanced: B is split into the fewest blocks that fit,
  of equal size, so padding stays below one row per block. None means one block of all queries.
  `num_columns` is N when the B = `num_rows` queries rank against a larger database.
  """
  query_block = check_query_block(query_block)
  if query_block is not None:
    return None if query_block >= num_rows else query_block
  budget = positive_int("memory_budget_bytes", memory_budget_bytes)
  num_columns = num_rows if num_columns is None else num_columns
  per_query = num_columns * (_ARRAYS_PER_TERM * slots + _ARRAYS_PER_SIMILARITY) * itemsize
  largest = max(1, budget // per_query)
  if largest >= num_rows:
    return None
  num_blocks = -(-num_rows // largest)
  return -(-num_rows // num_blocks)


def class_groups(labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Groups rows by label without a (B, B) matrix.

  Args:
    labels: (B,) integers, any order.

  Returns:
    order: (B,) row indices sorted by label, stable (rows of a class keep their order).
    start: (B,) for each row, the position in `order` where its class begins.
    count: (B,) for each row, the number of rows of its class (itself included).
    position: (B,) for each row, its position within its class (0-based, by row index).
  """
  labels = jnp.asarray(labels)
  order = jnp.argsort(labels, stable=True)
  sorted_labels = labels[order]
  start = jnp.searchsorted(sorted_labels, labels, side="left")
  end = jnp.searchsorted(sorted_labels, labels, side="right")
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(labels.shape[0], dtype=order.dtype))
  return order, start, end - start, inverse - start


def positive_indices(labels: jax.Array, slots: int,
                     valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's positives (same label, other row), in row order, in `slots` static slots.

  Args:
    labels: (B,) integers.
    slots: P, the static number of slots.
    valid: (B,) bool or None. Invalid rows are nobody's positive: they are given one label
      above every label (so labels must stay below the dtype's largest value); their own slots
      are meaningless.

  Returns:
    indices: (B, P) int32 row indices of the positives; padding slots point at row 0.
    valid: (B, P) bool, False on padding slots. A row with more than P positives keeps its
      first P; `overflow` says so.
    num_positives: (B,) int, each row's true number of positives.
  """
  if valid is not None:
    labels = jnp.where(valid, labels, jnp.max(labels) + 1)
  order, start, count, position = class_groups(labels)
  slot = jnp.arange(slots)[None, :]
  # Skip the row itself: slots before its own position map to the same position, after it +1.
  within = slot + (slot >= position[:, None])
  valid = within < count[:, None]
  flat = jnp.where(valid, start[:, None] + within, 0)
  return order[flat].astype(jnp.int32), valid, count - 1


def map_query_blocks(block_fn: Callable[[jax.Array], jax.Array], num_rows: int,
                     query_block: int | None) -> jax.Array:
  """`block_fn(query_indices (Q,)) -> (Q,)` over all rows, `query_block` queries at a time.

  Each block is rematerialised in the backward pass (`jax.checkpoint`), so memory holds one
  block's intermediates; the last block is padded with rows from the start and the padding
  dropped.

  Returns:
    (num_rows,) per-query values in row order.
  """
  if query_block is None or query_block >= num_rows:
    return block_fn(jnp.arange(num_rows))
  num_blocks = -(-num_rows // query_block)
  padded = jnp.arange(num_blocks * query_block) % num_rows
  per_query = jax.lax.map(jax.checkpoint(block_fn), padded.reshape(num_blocks, query_block))
  return per_query.reshape(-1)[:num_rows]


def mean_over_queries(per_query_loss: jax.Array, num_positives: jax.Array,
                      slots: int) -> jax.Array:
  """Mean of `per_query_loss` over queries with a positive; NaN when there is none or some query
  has more positives than `slots` (the traced form of the ValueErrors of `positive_slots`)."""
  chex.assert_equal_shape([per_query_loss, num_positives])
  has_positive = num_positives > 0
  num_queries = jnp.sum(has_positive)
  loss = (jnp.sum(jnp.where(has_positive, per_query_loss, 0.0))
          / jnp.maximum(num_queries, 1).astype(per_query_loss.dtype))
  usable = (num_queries > 0) & ~jnp.any(num_positives > slots)
  return jnp.where(usable, loss, jnp.nan).astype(per_query_loss.dtype)


def unit_rows(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||_2, eps)` along the last axis in x's own dtype (torch's `F.normalize`).

  Unlike `numerics.l2_normalize` (float32 always), float64 stays float64, so the proxy losses
  can be compared with reference libraries in float64.
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def check_class_parameters(name: str, parameters, dim: int):
  """`parameters` as an array; ValueError unless (C, dim) floats with C >= 1."""
  parameters = as_array(parameters)
  if parameters.ndim != 2 or parameters.shape[0] < 1 or parameters.shape[1] != dim:
    raise ValueError(f"{name} must have shape (C, {dim}) (one row per class, the embedding "
                     f"size), got shape {parameters.shape}")
  if not jnp.issubdtype(parameters.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got dtype {parameters.dtype}")
  return parameters


def check_labels_below(labels, num_classes: int, name: str) -> None:
  """ValueError when concrete `labels` fall outside [0, num_classes) (traced ones are not read)."""
  if not is_concrete(labels):
    return
  values = np.asarray(labels)
  if values.min() < 0 or values.max() >= num_classes:
    raise ValueError(
        f"labels must lie in [0, {num_classes}) (one row of {name} per class), got labels from "
        f"{values.min()} to {values.max()}")


def nan_unless_labels_below(loss: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """`loss`, or NaN when some label lies outside [0, num_classes) (the traced form of
  `check_labels_below`, so a training loop's non-finite check stops)."""
  in_range = jnp.all((labels >= 0) & (labels < num_classes))
  return jnp.where(in_range, loss, jnp.nan).astype(loss.dtype)


def log1p_sum_exp(x: jax.Array, mask: jax.Array, axis: int = 1) -> jax.Array:
  """log(1 + sum_{mask} exp(x)) along `axis`, stable, exactly 0 where the mask is empty."""
  chex.assert_equal_shape([x, mask])
  x = jnp.where(mask, x, -jnp.inf)
  zeros = jnp.zeros_like(jnp.take(x, jnp.arange(1), axis=axis))
  return jax.nn.logsumexp(jnp.concatenate([x, zeros], axis=axis), axis=axis)


def cosine_to_classes(embeddings, labels, parameters, name: str) -> tuple[jax.Array, jax.Array]:
  """Validated labels and the (B, C) cosines of the embeddings to per-class parameters.

  Both sides are L2-normalised in their promoted compute dtype (float64 stays float64).

  Raises:
    ValueError: unless embeddings are (B, D) floats, labels (B,) integers, `parameters` (C, D)
      floats, and concrete labels lie in [0, C).
  """
  embeddings, labels = check_batch(embeddings, labels)
  parameters = check_class_parameters(name, parameters, embeddings.shape[1])
  check_labels_below(labels, parameters.shape[0], name)
  dtype = jnp.promote_types(compute_dtype(embeddings), compute_dtype(parameters))
  cosines = similarity(unit_rows(jnp.asarray(embeddings, dtype)),
                       unit_rows(jnp.asarray(parameters, dtype)))
  chex.assert_shape(cosines, (labels.shape[0], parameters.shape[0]))
  return jnp.asarray(labels), cosines


def check_database(queries, query_labels, database, database_labels, database_valid):
  """The arguments of a query/database loss as arrays, checked.

  The database's first B rows must be the B queries themselves (same labels; same embeddings
  and valid where concrete): that is how a query's own row is found and left out.

  Returns:
    (queries (B, D), query_labels (B,), database (N, D), database_labels (N,),
    database_valid (N,) bool or None).

  Raises:
    ValueError: on shapes or dtypes that do not fit, a database shorter than the queries, or
      (where concrete) a database whose first B rows are not the queries, or are masked out.
  """
  queries, query_labels = check_batch(queries, query_labels)
  database, database_labels = check_batch(database, database_labels)
  num_queries, dim = queries.shape
  if database.shape[1] != dim:
    raise ValueError(f"queries are {dim}-d but the database is {database.shape[1]}-d")
  if database.shape[0] < num_queries:
    raise ValueError(f"the database ({database.shape[0]} rows) must start with the "
                     f"{num_queries} queries")
  if database_valid is not None:
    database_valid = as_array(database_valid)
    if database_valid.shape != database_labels.shape or database_valid.dtype != bool:
      raise ValueError(f"database_valid must be a ({database.shape[0]},) bool mask, got "
                       f"{database_valid.dtype} of shape {database_valid.shape}")
  head = lambda x: np.asarray(x)[:num_queries]  # slicing a constant under jit would trace it
  if is_concrete(query_labels) and is_concrete(database_labels):
    if not np.array_equal(head(database_labels), np.asarray(query_labels)):
      raise ValueError("the database's first B labels must be the query labels (the database "
                       "starts with the queries)")
  if is_concrete(queries) and is_concrete(database):
    if not np.array_equal(head(database), np.asarray(queries), equal_nan=True):
      raise ValueError("the database's first B rows must be the queries themselves")
  if database_valid is not None and is_concrete(database_valid):
    if not head(database_valid).all():
      raise ValueError("the database's first B rows (the queries) must be valid")
  return queries, query_labels, database, database_labels, database_valid


def pair_masks(query_labels: jax.Array, database_labels: jax.Array,
               database_valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The positive and negative pairs of queries and a database that starts with the queries.

  Args:
    query_labels: (B,) integers.
    database_labels: (N,) integers, N >= B, the first B being `query_labels`.
    database_valid: (N,) bool or None (all rows valid).

  Returns:
    positive: (B, N) bool, same label, valid, and not the query's own row (row q of the
      database).
    negative: (B, N) bool, different label and valid.
  """
  num_queries, num_rows = query_labels.shape[0], database_labels.shape[0]
  same = query_labels[:, None] == database_labels[None, :]
  own_row = jnp.arange(num_queries)[:, None] == jnp.arange(num_rows)[None, :]
  valid = (jnp.ones((1, num_rows), bool) if database_valid is None
           else database_valid[None, :])
  chex.assert_shape(same, (num_queries, num_rows))
  return same & ~own_row & valid, ~same & valid


def database_pairs(queries, query_labels, database, database_labels,
                   database_valid) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(B, N) similarities of checked queries to a database starting with them, and the positive
  and negative pairs of `pair_masks`; float64 inputs stay float64, others compute in float32."""
  dtype = jnp.promote_types(compute_dtype(queries), compute_dtype(database))
  valid = None if database_valid is None else jnp.asarray(database_valid)
  positive, negative = pair_masks(jnp.asarray(query_labels), jnp.asarray(database_labels), valid)
  sim = similarity(jnp.asarray(queries, dtype), jnp.asarray(database, dtype))
  chex.assert_equal_shape([sim, positive, negative])
  return sim, positive, negative
