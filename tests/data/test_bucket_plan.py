"""Bucket capacities per step, slot assignment, padding to agreed capacities, global slots."""

import io
import itertools
import math

import numpy as np
import PIL.Image
import pytest

from recall_jax import data
from recall_jax.data import aspect_buckets
from recall_jax.errors import ConfigError, DataError

# Two chains below the square: (32, 96) < (64, 96) landscape, (96, 32) < (96, 64) portrait.
SHAPES = aspect_buckets.bucket_shapes(96, num_buckets=3)


def _encoded(height, width, seed, fmt="PNG"):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


def _holds(outer, inner):
  return outer[0] >= inner[0] and outer[1] >= inner[1]


def _feasible(rows, shapes, capacities):
  """Brute force: can every row sit in a shape holding its own within the capacities?"""
  options = [[j for j, s in enumerate(shapes) if _holds(s, shapes[r])] for r in rows]
  for choice in itertools.product(*options):
    if all(np.bincount(choice, minlength=len(shapes)) <= capacities):
      return True
  return False


def test_plan_validates_and_normalises():
  plan = data.BucketPlan([[32, 96], (96, 96)], [4, np.int64(8)], 4)
  assert plan.shapes == ((32, 96), (96, 96)) and plan.capacities == (4, 8)
  assert data.BucketPlan(SHAPES, (0,) * len(SHAPES), 2).capacities == (0,) * 5
  bad = [
      ((), (), 2),                              # no shapes
      (((0, 96), (96, 96)), (0, 0), 2),         # a non-positive side
      (((96, 96), (32, 96)), (0, 0), 2),        # not sorted by area
      (((32, 96), (32, 96)), (0, 0), 2),        # repeated
      (((32, 96), (96, 64)), (0, 0), 2),        # the last does not hold the first
      (((32, 96), (96, 96)), (0,), 2),          # capacities of the wrong length
      (((32, 96), (96, 96)), (0, 3), 2),        # not a multiple of chunk_rows
      (((32, 96), (96, 96)), (-2, 4), 2),       # negative
      (((32, 96), (96, 96)), (0, 4), 0),        # chunk_rows
      (((32, 96), (96, 96)), (0, 4.0), 2),      # not an integer
  ]
  for shapes, capacities, chunk in bad:
    with pytest.raises(ConfigError):
      data.BucketPlan(shapes, capacities, chunk)


def test_image_hw_reads_headers_and_arrays():
  assert data.image_hw(_encoded(30, 50, 0)) == (30, 50)
  assert data.image_hw(_encoded(64, 17, 1, "JPEG")) == (64, 17)
  assert data.image_hw(np.zeros((7, 9), np.uint8)) == (7, 9)
  assert data.image_hw(np.zeros((7, 9, 3), np.uint8)) == (7, 9)
  with pytest.raises(DataError):
    data.image_hw(b"not an image")
  with pytest.raises(DataError):
    data.image_hw(np.zeros(5, np.uint8))


def test_estimate_plan_matches_hand_computed_capacities():
  shapes = ((32, 64), (64, 32), (64, 64))
  rows = np.array([0, 0, 1, 2] * 10)  # p = 0.5, 0.25, 0.25
  # margin 1, R 64, m 4: bucket 0: 32 - sqrt(4 64 .25) = 24; bucket 1: 16 - sqrt(48) = 9.07 -> 8;
  # last: round_up(64 - 32, 8) + 8 = 40.
  plan = data.estimate_plan(rows, shapes=shapes, rows_per_step=64, chunk_rows=8,
                            samples_per_class=4, margin=1.0)
  assert plan == data.BucketPlan(shapes, (24, 8, 40), 8)
  plan = data.estimate_plan(rows, shapes=shapes, rows_per_step=64, chunk_rows=8,
                            samples_per_class=4, margin=0.0, slack_chunks=2)
  assert plan.capacities == (32, 16, 16 + 16)
  # A large margin leaves everything to the last bucket; rows_per_step rounds up to chunks.
  plan = data.estimate_plan(rows, shapes=shapes, rows_per_step=20, chunk_rows=8,
                            samples_per_class=4, margin=50.0, slack_chunks=0)
  assert plan.capacities == (0, 0, 24)


@pytest.mark.parametrize("seed", range(4))
def test_estimate_plan_matches_float64_reference(seed):
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(SHAPES), size=400, p=rng.dirichlet(np.ones(len(SHAPES))))
  r, chunk, m, margin, slack = 512, 16, 4, 2.0, 1
  plan = data.estimate_plan(rows, shapes=SHAPES, rows_per_step=r, chunk_rows=chunk,
                            samples_per_class=m, margin=margin, slack_chunks=slack)
  p = np.bincount(rows, minlength=len(SHAPES)).astype(np.float64) / rows.size
  low = np.maximum(0, r * p - margin * np.sqrt(m * r * p * (1 - p)))[:-1]
  expected = list(chunk * np.floor(low / chunk).astype(int))
  expected.append(chunk * (math.ceil((r - sum(expected)) / chunk) + slack))
  assert plan.capacities == tuple(expected)
  assert all(c % chunk == 0 for c in plan.capacities)


def test_estimated_plan_fits_sampled_batches_of_correlated_classes():
  # Classes of m images share one bucket (the worst correlation m bounds); the plan, estimated
  # from two batches, fits every one of many fresh batches at margin 5.
  rng = np.random.default_rng(0)
  m, rows_per_step = 4, 2048
  class_bucket = rng.choice(len(SHAPES), size=5000, p=[0.3, 0.25, 0.2, 0.15, 0.1])

  def batch():
    return np.repeat(class_bucket[rng.choice(5000, rows_per_step // m, replace=False)], m)

  plan = data.estimate_plan(np.concatenate([batch(), batch()]), shapes=SHAPES,
                            rows_per_step=rows_per_step, chunk_rows=8, samples_per_class=m)
  assert sum(plan.capacities[:-1]) > 0  # not everything in the square
  for _ in range(200):
    assert data.assign_slots(batch(), plan)[0] == plan.capacities


def test_estimate_plan_rejects_bad_arguments():
  good = dict(shapes=SHAPES, rows_per_step=8, chunk_rows=2, samples_per_class=2)
  rows = np.array([0, 1, 4])
  for change in [dict(rows_per_step=0), dict(chunk_rows=0), dict(samples_per_class=0),
                 dict(margin=-1.0), dict(margin=float("nan")), dict(slack_chunks=-1),
                 dict(shapes=SHAPES[::-1])]:
    with pytest.raises(ConfigError):
      data.estimate_plan(rows, **{**good, **change})
  for bad_rows in [np.array([], np.int64), np.array([0, 5]), np.array([-1]),
                   np.array([0.0, 1.0]), np.zeros((2, 2), np.int64)]:
    with pytest.raises(ConfigError):
      data.estimate_plan(bad_rows, **good)


class _Source:
  name, split = "fixture", "train"

  def __init__(self, sizes, bad=None):
    self.labels = np.repeat(np.arange(len(sizes) // 2), 2)
    self._records = [{"image": _encoded(h, w, n, "JPEG" if n % 3 else "PNG"),
                      "label": int(self.labels[n]), "id": f"img{n}"}
                     for n, (h, w) in enumerate(sizes)]
    if bad is not None:
      self._records[bad]["image"] = b"broken"

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[int(index)]


SIZES = [(30, 60), (64, 20), (40, 40), (10, 50), (50, 25), (33, 33), (20, 70), (45, 30),
         (60, 61), (12, 40), (40, 12), (50, 52)]


def test_estimate_bucket_plan_uses_the_buckets_of_sampled_global_batches():
  source = _Source(SIZES)
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=3)
  shapes = aspect_buckets.bucket_shapes(48, num_buckets=3)
  # Reference: the buckets of the decoded, resized images.
  rows = [aspect_buckets.bucket_image(source[i]["image"], 48, shapes).bucket
          for step in range(3) for i in sampler.batch_indices(step)]
  for process_count in (1, 2):
    plan = data.estimate_bucket_plan(source, sampler, image_size=48, num_buckets=3, chunk_rows=2,
                                     process_count=process_count, margin=1.0, sample_steps=3)
    expected = data.estimate_plan(np.array(rows), shapes=shapes, rows_per_step=8 // process_count,
                                  chunk_rows=2, samples_per_class=2, margin=1.0)
    assert plan == expected


def test_estimate_bucket_plan_rejects_bad_arguments_and_records():
  source = _Source(SIZES)
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=0)
  kwargs = dict(image_size=48, num_buckets=2, chunk_rows=2)
  with pytest.raises(ConfigError):
    data.estimate_bucket_plan(source, sampler, process_count=3, **kwargs)
  with pytest.raises(ConfigError):
    data.estimate_bucket_plan(source, sampler, sample_steps=0, **kwargs)
  broken = _Source(SIZES, bad=int(sampler.batch_indices(0)[0]))
  with pytest.raises(DataError, match=f"img{sampler.batch_indices(0)[0]}"):
    data.estimate_bucket_plan(broken, sampler, **kwargs)


def _check_assignment(rows, plan, capacities, bucket, position):
  assert bucket.dtype == np.int32 and position.dtype == np.int32
  assert len(bucket) == len(position) == len(rows)
  assert all(c >= p and c % plan.chunk_rows == 0 for c, p in zip(capacities, plan.capacities))
  for own, b, pos in zip(rows, bucket, position):
    assert _holds(plan.shapes[b], plan.shapes[own])
    assert 0 <= pos < capacities[b]
  assert len(set(zip(bucket.tolist(), position.tolist()))) == len(rows)
  # Positions fill each bucket array from its first row.
  for b in range(len(capacities)):
    np.testing.assert_array_equal(np.sort(position[bucket == b]), np.arange((bucket == b).sum()))


@pytest.mark.parametrize("chunk", [1, 2])
def test_assign_slots_fits_the_plan_whenever_brute_force_finds_a_way(chunk):
  rng = np.random.default_rng(chunk)
  fitted = grown = 0
  for _ in range(300):
    rows = rng.integers(0, len(SHAPES), rng.integers(0, 7))
    plan = data.BucketPlan(SHAPES, tuple(chunk * rng.integers(0, 3, len(SHAPES))), chunk)
    capacities, bucket, position = data.assign_slots(rows, plan)
    _check_assignment(rows, plan, capacities, bucket, position)
    if _feasible(rows, SHAPES, np.array(plan.capacities)):
      assert capacities == plan.capacities
      fitted += 1
    else:
      assert capacities != plan.capacities
      grown += 1
  assert fitted > 30 and grown > 30  # both branches exercised


def test_assign_slots_is_greedy_in_bucket_order():
  # Shapes 0 (32, 96) and 2 (64, 96) are landscape, 1 (96, 32) portrait, 4 the square.
  plan = data.BucketPlan(SHAPES, (1, 0, 1, 0, 1), 1)
  capacities, bucket, position = data.assign_slots(np.array([2, 0, 0, 1, 0]), plan)
  # Rows 1, 2, 4 (bucket 0) take shape 0, then 2, then the square; row 0 (bucket 2) finds its
  # shape and the square full and grows bucket 2; row 3 (portrait) grows bucket 1.
  assert capacities == (1, 1, 2, 0, 1)
  np.testing.assert_array_equal(bucket, [2, 0, 2, 1, 4])
  np.testing.assert_array_equal(position, [1, 0, 0, 0, 0])


def test_assign_slots_rejects_bad_buckets():
  plan = data.BucketPlan(SHAPES, (0,) * 5, 1)
  for rows in [np.array([5]), np.array([-1]), np.zeros((1, 1), np.int64), np.array([0.5])]:
    with pytest.raises(ConfigError):
      data.assign_slots(rows, plan)


def _images(capacities, channels=1):
  rng = np.random.default_rng(0)
  buckets = tuple(rng.integers(0, 256, (c, h // 16, w // 16, channels + 1), np.uint8)
                  for c, (h, w) in zip(capacities, SHAPES))
  return data.BucketedImages(buckets, np.zeros(0, np.int32), np.zeros(0, np.int32))


def test_pad_buckets_appends_empty_slots():
  images = _images((2, 0, 1, 0, 3))
  padded = data.pad_buckets(images, (2, 2, 3, 0, 4))
  assert tuple(len(b) for b in padded.buckets) == (2, 2, 3, 0, 4)
  for old, new in zip(images.buckets, padded.buckets):
    assert new.shape[1:] == old.shape[1:] and new.dtype == np.uint8
    np.testing.assert_array_equal(new[:len(old)], old)
    added = new[len(old):]
    assert not added[..., :-1].any() and (added[..., -1] == 255).all()
  assert padded.bucket is images.bucket and padded.position is images.position
  with pytest.raises(ConfigError):
    data.pad_buckets(images, (1, 0, 1, 0, 3))
  with pytest.raises(ConfigError):
    data.pad_buckets(images, (2, 0, 1, 0))


def test_flat_slots_index_the_process_order_concatenation():
  rng = np.random.default_rng(0)
  process_count, capacities = 3, (2, 0, 4, 2, 6)
  plan = data.BucketPlan(SHAPES, capacities, 2)
  # Each process fills its local buckets with tags (process, row); the global array of bucket k
  # stacks the processes' bucket k, and the buckets follow one another.
  local, tags = [], []
  for process in range(process_count):
    rows = rng.integers(0, len(SHAPES), 7)
    caps, bucket, position = data.assign_slots(rows, plan)
    assert caps == capacities
    buckets = [np.full(c, -1) for c in capacities]
    for row, (b, p) in enumerate(zip(bucket, position)):
      buckets[b][p] = 100 * process + row
    local.append(buckets)
    tags.append((bucket, position, 100 * process + np.arange(7)))
  flat = np.concatenate([np.concatenate([local[p][k] for p in range(process_count)])
                         for k in range(len(capacities))])
  for process, (bucket, position, tag) in enumerate(tags):
    index = data.flat_slots(bucket, position, capacities, process_index=process,
                            process_count=process_count)
    assert index.dtype == np.int32
    np.testing.assert_array_equal(flat[index], tag)


def test_flat_slots_rejects_bad_input():
  bucket, position = np.array([0, 2]), np.array([1, 0])
  with pytest.raises(ConfigError):
    data.flat_slots(bucket, position, (2, 0, 2), process_index=2, process_count=2)
  with pytest.raises(ConfigError):
    data.flat_slots(bucket, np.array([2, 0]), (2, 0, 2))  # past the capacity
  with pytest.raises(ConfigError):
    data.flat_slots(np.array([3, 0]), position, (2, 0, 2))
  with pytest.raises(ConfigError):
    data.flat_slots(bucket, position[:1], (2, 0, 2))
