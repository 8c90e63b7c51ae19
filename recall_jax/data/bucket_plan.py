"""Fixed per-step capacities of the aspect buckets, and the rows of a batch assigned to them.

A training batch of whole images is a set of per-bucket arrays (`BucketedImages`). The jitted
step compiles once per tuple of array shapes, so every step should have the same capacities: a
`BucketPlan`, estimated once from a few sampled batches (`estimate_bucket_plan`). A batch's rows
are then assigned to slots (`assign_slots`): a row may sit in a larger bucket than its own, and
when a batch needs more than the plan, a bucket grows (that step compiles once more).

An empty slot holds zero pixels with the mask channel at 255 everywhere: it is a valid input (a
masked GeM of zeros is finite), and nothing reads its embedding.

Serves the instance-level task (landmark retrieval).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from recall_jax.data import aspect_buckets
from recall_jax.data import sampler as sampler_lib
from recall_jax.data.source import Source, read_records
from recall_jax.errors import ConfigError, DataError


class BucketedImages(NamedTuple):
  """A batch of whole images as per-bucket arrays, and where each batch row sits.

  Attributes:
    buckets: bucket k is uint8 (capacity_k, H_k, W_k, C + 1), the last channel the validity mask
      (255 real pixel, 0 padding); an empty slot is zero pixels with the mask 255 everywhere.
    bucket: int32 (b,) the bucket array holding batch row i (rows in the sampler's order).
    position: int32 (b,) the row of that bucket array holding batch row i.
  """

  buckets: tuple[np.ndarray, ...]
  bucket: np.ndarray
  position: np.ndarray


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Rows of each aspect bucket per process per step.

  Attributes:
    shapes: (H, W) of each bucket, sorted by area (`aspect_buckets.bucket_shapes`); the last
      holds every other (it holds any image).
    capacities: rows of each bucket per process per step, each a multiple of `chunk_rows`
      (0 allowed).
    chunk_rows: rows per chunk of the two-pass step on this process.

  Raises:
    ConfigError: non-positive or unsorted shapes, a last shape not holding all others,
      capacities of the wrong length, negative or not multiples of a positive `chunk_rows`.
  """

  shapes: tuple[tuple[int, int], ...]
  capacities: tuple[int, ...]
  chunk_rows: int

  def __post_init__(self):
    shapes = tuple(tuple(s) for s in self.shapes)
    if not shapes or any(len(s) != 2 or not all(_is_int(x) and x > 0 for x in s) for s in shapes):
      raise ConfigError(f"shapes must be a non-empty sequence of positive (H, W), got "
                        f"{self.shapes}")
    shapes = tuple((int(h), int(w)) for h, w in shapes)
    areas = [h * w for h, w in shapes]
    if areas != sorted(areas) or len(set(shapes)) != len(shapes):
      raise ConfigError(f"shapes must be distinct and sorted by area, got {shapes}")
    last = shapes[-1]
    if any(h > last[0] or w > last[1] for h, w in shapes):
      raise ConfigError(f"the last shape {last} must hold every other shape of {shapes}")
    if not _is_int(self.chunk_rows) or self.chunk_rows < 1:
      raise ConfigError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")
    capacities = tuple(self.capacities)
    if (len(capacities) != len(shapes)
        or any(not _is_int(c) or c < 0 or c % self.chunk_rows for c in capacities)):
      raise ConfigError(f"capacities {capacities} must be {len(shapes)} non-negative multiples "
                        f"of chunk_rows {self.chunk_rows}")
    object.__setattr__(self, "shapes", shapes)
    object.__setattr__(self, "capacities", tuple(int(c) for c in capacities))
    object.__setattr__(self, "chunk_rows", int(self.chunk_rows))


def image_hw(image: bytes | np.ndarray) -> tuple[int, int]:
  """(height, width) of an image: the header of encoded bytes, the shape of decoded pixels.

  Args:
    image: encoded bytes (any format PIL reads), or uint8 (H, W) / (H, W, C) pixels.

  Raises:
    DataError: undecodable bytes, or an array that is not (H, W) / (H, W, C).
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    try:
      with PIL.Image.open(io.BytesIO(image)) as pil:
        width, height = pil.size
    except Exception as e:  # PIL.UnidentifiedImageError, OSError, ...
      raise DataError(f"cannot read the image header: {type(e).__name__}: {e}") from e
    return int(height), int(width)
  shape = np.shape(image)
  if len(shape) not in (2, 3):
    raise DataError(f"image must be (H, W) or (H, W, C), got shape {shape}")
  return int(shape[0]), int(shape[1])


def _check_rows(buckets_of_rows: Any, num_buckets: int, *, allow_empty: bool) -> np.ndarray:
  rows = np.asarray(buckets_of_rows)
  if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
    raise ConfigError(f"buckets_of_rows must be a 1-D integer array, got {rows.dtype} "
                      f"{rows.shape}")
  if not allow_empty and rows.size == 0:
    raise ConfigError("buckets_of_rows is empty")
  if rows.size and (rows.min() < 0 or rows.max() >= num_buckets):
    raise ConfigError(f"bucket indices must lie in [0, {num_buckets}), got {rows.min()} .. "
                      f"{rows.max()}")
  return rows.astype(np.int64)


def estimate_plan(buckets_of_rows: np.ndarray, *, shapes: Sequence[tuple[int, int]],
                  rows_per_step: int, chunk_rows: int, samples_per_class: int,
                  margin: float = 5.0, slack_chunks: int = 1) -> BucketPlan:
  """Capacities from the bucket of every row of a few sampled batches.

  With p_k the observed fraction of rows in bucket k, R = `rows_per_step` and
  m = `samples_per_class`, every bucket but the last gets
  `chunk_rows * floor(max(0, R p_k - margin sqrt(m R p_k (1 - p_k))) / chunk_rows)` rows, and the
  last (which holds any image) gets `round_up(R - sum(others), chunk_rows) + slack_chunks *
  chunk_rows`. The m images of a class are correlated (a landmark's photos share an aspect), so
  a batch's count varies up to m times more than a binomial's: m bounds the inflation.

  Why it fits: the other capacities sit below their expected counts, so their overflow moves to
  larger buckets; a batch needs more than the plan only when those buckets together are under-
  filled by more than the slack, a more than `margin`-sigma event.

  Args:
    buckets_of_rows: int (n,) the bucket of every row of the sampled batches, n >= 1.
    shapes: (H, W) of each bucket, sorted by area, the last holding all others.
    rows_per_step: R, rows per process per step.
    chunk_rows: rows per chunk on this process; every capacity is a multiple of it.
    samples_per_class: m, images per class in a batch.
    margin: standard deviations kept below each expected count.
    slack_chunks: extra chunks of the last bucket.

  Returns:
    The plan.

  Raises:
    ConfigError: a non-positive size, a negative or non-finite margin, negative slack, bucket
      indices outside the shapes, or bad shapes.
  """
  shapes = tuple(shapes)
  if not all(_is_int(x) and x >= 1 for x in (rows_per_step, chunk_rows, samples_per_class)):
    raise ConfigError(f"rows_per_step {rows_per_step}, chunk_rows {chunk_rows} and "
                      f"samples_per_class {samples_per_class} must be positive integers")
  if not math.isfinite(margin) or margin < 0:
    raise ConfigError(f"margin must be finite and non-negative, got {margin}")
  if not _is_int(slack_chunks) or slack_chunks < 0:
    raise ConfigError(f"slack_chunks must be a non-negative integer, got {slack_chunks!r}")
  rows = _check_rows(buckets_of_rows, len(shapes), allow_empty=False)
  fraction = np.bincount(rows, minlength=len(shapes)) / rows.size
  capacities = []
  for p in fraction[:-1]:
    mean = rows_per_step * p
    low = mean - margin * math.sqrt(samples_per_class * rows_per_step * p * (1 - p))
    capacities.append(chunk_rows * math.floor(max(0.0, low) / chunk_rows))
  rest = max(0, rows_per_step - sum(capacities))
  capacities.append(chunk_rows * (-(-rest // chunk_rows) + slack_chunks))
  return BucketPlan(shapes, tuple(capacities), chunk_rows)


def _record_name(source: Source, index: int, record: dict[str, Any]) -> str:
  where = f"{source.name}/{source.split}" if hasattr(source, "split") else type(source).__name__
  return f"{index} (id {record.get('id', '?')!r}) of {where}"


def estimate_bucket_plan(source: Source, sampler: sampler_lib.MPerClassSampler, *,
                         image_size: int, num_buckets: int, chunk_rows: int,
                         process_count: int = 1, margin: float = 5.0, sample_steps: int = 2,
                         slack_chunks: int = 1) -> BucketPlan:
  """`estimate_plan` from the global batches of steps 0 .. sample_steps - 1 (headers only).

  Every process reads the same global batches, so all compute the same plan.

  Args:
    source: records `{'image': encoded bytes or uint8 pixels, 'label': int, ...}`.
    sampler: the training sampler; rows per process per step = batch_size / process_count.
    image_size: the longer side of every resized image, in pixels.
    num_buckets: short-side steps per orientation (`aspect_buckets.bucket_shapes`).
    chunk_rows: rows per chunk on one process.
    process_count: processes sharing a global batch.
    margin, slack_chunks: as in `estimate_plan`.
    sample_steps: global batches read.

  Returns:
    The plan for `bucket_shapes(image_size, num_buckets=num_buckets)`.

  Raises:
    ConfigError: bad arguments (a batch not divisible by process_count, sample_steps < 1, ...).
    DataError: a record whose image header cannot be read, naming it.
  """
  if not _is_int(sample_steps) or sample_steps < 1:
    raise ConfigError(f"sample_steps must be a positive integer, got {sample_steps!r}")
  if not _is_int(process_count) or process_count < 1 or sampler.batch_size % process_count:
    raise ConfigError(f"the global batch {sampler.batch_size} must split evenly over "
                      f"process_count {process_count}")
  shapes = aspect_buckets.bucket_shapes(image_size, num_buckets=num_buckets)
  rows = []
  for step in range(sample_steps):
    indices = sampler.batch_indices(step)
    for index, record in zip(indices, read_records(source, indices)):
      try:
        size = aspect_buckets.resized_shape(*image_hw(record["image"]), image_size)
      except DataError as e:
        raise DataError(f"record {_record_name(source, index, record)}: {e}") from None
      rows.append(aspect_buckets.assign_bucket(*size, shapes))
  return estimate_plan(np.asarray(rows, np.int64), shapes=shapes,
                       rows_per_step=sampler.batch_size // process_count, chunk_rows=chunk_rows,
                       samples_per_class=sampler.samples_per_class, margin=margin,
                       slack_chunks=slack_chunks)


def assign_slots(buckets_of_rows: np.ndarray, plan: BucketPlan
                 ) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
  """Assigns each row of a batch to a slot of a bucket array that holds it.

  Greedy and deterministic: rows in increasing bucket order (stable) each take the first free
  slot of the smallest-area shape holding their own bucket's shape; a row finding none grows its
  own bucket by one chunk. When the shapes that hold a shape form a chain (as for
  `aspect_buckets.bucket_shapes`: landscape and portrait chains below the square), this fits the
  plan whenever any assignment does.

  Args:
    buckets_of_rows: int (b,) the bucket of each batch row (`aspect_buckets.assign_bucket`).
    plan: the capacities to fill.

  Returns:
    (capacities, bucket, position): the capacities used (each >= the plan's, equal when the batch
    fits it; multiples of `plan.chunk_rows`), and int32 (b,) the bucket array and row of each
    batch row.

  Raises:
    ConfigError: bucket indices outside the plan's shapes, or not a 1-D integer array.
  """
  rows = _check_rows(buckets_of_rows, len(plan.shapes), allow_empty=True)
  holders = [[j for j, (h, w) in enumerate(plan.shapes) if h >= hk and w >= wk]
             for hk, wk in plan.shapes]
  capacities = list(plan.capacities)
  used = [0] * len(capacities)
  bucket = np.empty(rows.size, np.int32)
  position = np.empty(rows.size, np.int32)
  for row in np.argsort(rows, kind="stable"):
    own = int(rows[row])
    target = next((j for j in holders[own] if used[j] < capacities[j]), None)
    if target is None:
      target = own
      capacities[own] += plan.chunk_rows
    bucket[row], position[row] = target, used[target]
    used[target] += 1
  return tuple(capacities), bucket, position


def empty_slots(rows: int, shape: tuple[int, int], channels: int) -> np.ndarray:
  """uint8 (rows, H, W, channels + 1) empty slots: zero pixels, the mask channel 255."""
  slots = np.zeros((rows, *shape, channels + 1), np.uint8)
  slots[..., -1] = 255
  return slots


def pad_buckets(images: BucketedImages, capacities: Sequence[int]) -> BucketedImages:
  """`images` with empty slots appended so that bucket k has `capacities[k]` rows.

  Used when the processes agree on the largest capacities of a step; positions are unchanged.

  Raises:
    ConfigError: a capacity below the current rows, or the wrong number of capacities.
  """
  capacities = tuple(capacities)
  current = tuple(len(b) for b in images.buckets)
  if len(capacities) != len(current) or any(
      not _is_int(c) or c < n for c, n in zip(capacities, current)):
    raise ConfigError(f"capacities {capacities} must be {len(current)} integers no smaller than "
                      f"the current rows {current}")
  buckets = tuple(
      b if c == len(b) else np.concatenate(
          [b, empty_slots(c - len(b), b.shape[1:3], b.shape[3] - 1)])
      for b, c in zip(images.buckets, capacities))
  return images._replace(buckets=buckets)


def flat_slots(bucket: np.ndarray, position: np.ndarray, capacities: Sequence[int], *,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Index of each row in the concatenation of the global bucket arrays.

  The global bucket k array is the process-order concatenation of every process's bucket k, each
  of `capacities[k]` rows, so row i of this process sits at
  `sum_{k' < k} capacities[k'] process_count + process_index capacities[k] + position[i]`.

  Args:
    bucket: int (b,) bucket of each row on this process (`BucketedImages.bucket`).
    position: int (b,) its row in this process's bucket array.
    capacities: rows of each bucket per process (the same on every process).
    process_index: this process, in [0, process_count).
    process_count: processes.

  Returns:
    int32 (b,) indices into the concatenated global arrays.

  Raises:
    ConfigError: bad process numbers, mismatched shapes, or a row outside its bucket.
  """
  capacities = np.asarray(capacities, np.int64)
  bucket, position = np.asarray(bucket), np.asarray(position)
  if not (_is_int(process_count) and _is_int(process_index)
          and 0 <= process_index < process_count):
    raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
  if (capacities.ndim != 1 or bucket.shape != position.shape or bucket.ndim != 1
      or (bucket.size and not (np.issubdtype(bucket.dtype, np.integer)
                               and np.issubdtype(position.dtype, np.integer)))):
    raise ConfigError(f"bucket {bucket.shape} and position {position.shape} must be 1-D integer "
                      f"arrays of one length, capacities 1-D, got {capacities.shape}")
  if bucket.size and (bucket.min() < 0 or bucket.max() >= capacities.size or position.min() < 0
                      or (position >= capacities[bucket]).any()):
    raise ConfigError(f"rows outside the buckets of capacities {tuple(capacities)}")
  offsets = np.concatenate([[0], np.cumsum(capacities)[:-1]]) * process_count
  flat = offsets[bucket] + process_index * capacities[bucket] + position
  return flat.astype(np.int32)
