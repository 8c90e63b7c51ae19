"""Whole-image loaders: longer side kept, padded into buckets, the mask as the last channel."""

import io
import threading
import time
import warnings

import chex
import numpy as np
import PIL.Image
import pytest

from recall_jax import data
from recall_jax.data import aspect_buckets
from recall_jax.data import bucket_plan
from recall_jax.errors import ConfigError, DataError

# (height, width) of the source images: landscape, portrait, square.
SHAPES = [(30, 60), (64, 20), (40, 40), (10, 50), (50, 25), (33, 33), (20, 70), (45, 30)]


def _png(height, width, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


class _Source:
  name, split = "fixture", "train"

  def __init__(self):
    self.labels = np.repeat(np.arange(len(SHAPES) // 2), 2)
    self._records = [{"image": _png(h, w, n), "label": int(self.labels[n]), "id": str(n)}
                     for n, (h, w) in enumerate(SHAPES)]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[int(index)]


def test_mask_channel_round_trip():
  image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), np.uint8)
  mask = np.zeros((4, 5), bool)
  mask[:3, :2] = True
  packed = data.with_mask_channel(image, mask)
  assert packed.shape == (4, 5, 4) and packed.dtype == np.uint8
  pixels, unpacked = data.split_mask_channel(packed)
  np.testing.assert_array_equal(pixels, image)
  np.testing.assert_array_equal(unpacked, mask)


def _reference_pixels(encoded, image_size, upscale):
  """PIL's decode, then (only when the size changes) a bilinear resize to the longer side."""
  image = PIL.Image.open(io.BytesIO(encoded)).convert("RGB")
  longer = max(image.size)
  if longer <= image_size and not upscale:
    return np.asarray(image)
  scale = image_size / longer
  size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
  return np.asarray(image.resize(size, PIL.Image.BILINEAR))


@pytest.mark.parametrize("upscale", [False, True])
def test_eval_batches_hold_whole_images_in_their_bucket(upscale):
  source = _Source()
  image_size = 48  # some images are larger (downscaled), some smaller (kept unless upscale)
  batches = list(data.make_bucketed_eval_loader(source, image_size=image_size, batch_size=3,
                                                num_buckets=2, upscale=upscale, read_threads=0,
                                                prefetch_batches=0))
  shapes = aspect_buckets.bucket_shapes(image_size, num_buckets=2)
  assert len(batches) == 3
  kept = 0
  for number, batch in enumerate(batches):
    indices = batch["index"][batch["mask"]]
    np.testing.assert_array_equal(indices, np.arange(3 * number, min(3 * number + 3, 8)))
    assert tuple(batch["image"].shape[1:3]) in shapes
    pixels, masks = data.split_mask_channel(batch["image"])
    for k, index in enumerate(indices):
      expected = _reference_pixels(source[index]["image"], image_size, upscale)
      h, w = expected.shape[:2]
      native = max(SHAPES[index]) <= image_size and not upscale
      kept += native
      assert (h, w) == (SHAPES[index] if native else (h, w)) and (native or max(h, w) == image_size)
      np.testing.assert_array_equal(pixels[k, :h, :w], expected)
      assert masks[k, :h, :w].all() and masks[k].sum() == h * w
      assert not pixels[k][~masks[k]].any()
    # The batch's bucket is the smallest holding all of its images.
    sizes = [aspect_buckets.resized_shape(*SHAPES[i], image_size, upscale=upscale)
             for i in indices]
    need = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert tuple(batch["image"].shape[1:3]) == shapes[aspect_buckets.assign_bucket(*need, shapes)]
  assert kept == (0 if upscale else 3)  # (40, 40), (33, 33) and (45, 30) keep their pixels
  assert not batches[-1]["mask"][2] and batches[-1]["index"][2] == -1


def test_eval_loader_refuses_images_over_max_pixels_from_the_header(monkeypatch):
  source = _Source()
  largest = max(range(len(SHAPES)), key=lambda i: SHAPES[i][0] * SHAPES[i][1])
  height, width = SHAPES[largest]
  limit = height * width - 1
  decoded = []
  resize = aspect_buckets.resize_longer_side
  monkeypatch.setattr(aspect_buckets, "resize_longer_side",
                      lambda image, *a, **k: decoded.append(image) or resize(image, *a, **k))
  loader = data.make_bucketed_eval_loader(source, image_size=48, batch_size=3, max_pixels=limit,
                                          read_threads=0, prefetch_batches=0)
  with pytest.raises(DataError) as info:
    list(loader)
  assert str(info.value) == (f"record {largest} (id '{largest}') of fixture/train: the image has "
                             f"{width} x {height} pixels, more than the limit of {limit} "
                             f"(data.max_image_pixels)")
  assert source[largest]["image"] not in decoded  # refused from its header
  at_limit = data.make_bucketed_eval_loader(source, image_size=48, batch_size=3,
                                            max_pixels=limit + 1, read_threads=0,
                                            prefetch_batches=0)
  assert sum(int(b["mask"].sum()) for b in at_limit) == len(SHAPES)
  assert source[largest]["image"] in decoded  # the same image, decoded when allowed


def test_bad_arguments():
  with pytest.raises(ConfigError):
    data.make_bucketed_eval_loader(_Source(), image_size=64, batch_size=0)


# Landscape, portrait and square images, PNG and JPEG, for the per-bucket training loader.
MIXED = [(30, 60), (64, 20), (40, 40), (10, 50), (50, 25), (33, 33), (20, 70), (45, 30),
         (60, 61), (12, 40), (40, 12), (50, 52), (16, 64), (64, 40), (25, 50), (44, 44)]


def _encoded(height, width, seed, fmt):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


class _MixedSource(_Source):

  def __init__(self, sizes=MIXED, bad=None):
    self.labels = np.repeat(np.arange(len(sizes) // 2), 2)
    self._records = [{"image": _encoded(h, w, n, "JPEG" if n % 2 else "PNG"),
                      "label": int(self.labels[n]), "id": f"img{n}"}
                     for n, (h, w) in enumerate(sizes)]
    if bad is not None:
      self._records[bad]["image"] = b"broken"


BUCKET_SHAPES = aspect_buckets.bucket_shapes(64, num_buckets=2)  # (32, 64), (64, 32), square


def _bucketed(source, sampler, plan, **kwargs):
  kwargs = {"seed": 0, "read_threads": 0, "prefetch_batches": 0, **kwargs}
  return data.make_bucketed_train_loader(source, sampler, plan=plan, image_size=64, **kwargs)


def _check_bucketed_batch(batch, source, indices, plan, flipped=None):
  """Every image once, whole, in a slot whose shape holds it; empty slots zero with mask 255."""
  images = batch["image"]
  assert isinstance(images, data.BucketedImages)
  np.testing.assert_array_equal(batch["label"], source.labels[indices])
  assert batch["label"].dtype == np.int32 and len(images.bucket) == len(indices)
  assert all(c >= p for c, p in zip((len(b) for b in images.buckets), plan.capacities))
  used = set(zip(images.bucket.tolist(), images.position.tolist()))
  assert len(used) == len(indices)
  for k, index in enumerate(indices):
    array = images.buckets[images.bucket[k]]
    assert array.shape[1:] == (*plan.shapes[images.bucket[k]], 4) and array.dtype == np.uint8
    pixels, mask = data.split_mask_channel(array[images.position[k]])
    expected = aspect_buckets.resize_longer_side(source[index]["image"], 64)
    if flipped is not None and flipped[k]:
      expected = expected[:, ::-1]
    h, w = expected.shape[:2]
    np.testing.assert_array_equal(pixels[:h, :w], expected)
    assert mask[:h, :w].all() and mask.sum() == h * w
    assert not pixels[~mask].any()
  for b, array in enumerate(images.buckets):
    for position in range(len(array)):
      if (b, position) not in used:
        assert not array[position, ..., :-1].any() and (array[position, ..., -1] == 255).all()


def test_bucketed_train_batches_put_each_whole_image_in_one_slot():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=0)
  plan = data.BucketPlan(BUCKET_SHAPES, (2, 2, 8), 2)  # the square alone holds a batch
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the batches fit: no warning
    batches = list(_bucketed(source, sampler, plan, flip=False, num_steps=3))
  for step, batch in enumerate(batches):
    assert tuple(len(b) for b in batch["image"].buckets) == plan.capacities
    _check_bucketed_batch(batch, source, sampler.batch_indices(step), plan)
  # Small images sit in their own (non-square) buckets when those have room.
  assert any((b["image"].bucket < 2).any() for b in batches)


def test_bucketed_train_flips_follow_the_seed_and_are_deterministic():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=1)
  plan = data.estimate_bucket_plan(source, sampler, image_size=64, num_buckets=2, chunk_rows=2,
                                   margin=0.0)
  assert plan.capacities[0] > 0  # some images in their own, non-square bucket
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a tight plan may grow; that is tested elsewhere
    first = list(_bucketed(source, sampler, plan, seed=5, num_steps=3))
    again = list(_bucketed(source, sampler, plan, seed=5, num_steps=3))
    resumed = next(_bucketed(source, sampler, plan, seed=5, start_step=2, num_steps=1))
  chex.assert_trees_all_equal(first, again)
  chex.assert_trees_all_equal(first[2], resumed)
  flips = 0
  for step, batch in enumerate(first):
    indices = sampler.batch_indices(step)
    # The documented draw: flip when default_rng([seed, step, global position]) < 0.5.
    flipped = [np.random.default_rng([5, step, k]).random() < 0.5 for k in range(len(indices))]
    flips += sum(flipped)
    _check_bucketed_batch(batch, source, indices, plan, flipped=flipped)
  assert 0 < flips < 24


def test_bucketed_train_batch_beyond_the_plan_warns_and_grows():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=0)
  plan = data.BucketPlan(BUCKET_SHAPES, (0, 0, 2), 2)
  with pytest.warns(UserWarning, match=r"step 0: .*\(0, 0, 2\).*compiles once more"):
    batch = next(_bucketed(source, sampler, plan, flip=False, num_steps=1))
  capacities = tuple(len(b) for b in batch["image"].buckets)
  assert sum(capacities) >= 8 and capacities != plan.capacities
  assert all(c % 2 == 0 for c in capacities)
  _check_bucketed_batch(batch, source, sampler.batch_indices(0), plan)


def test_bucketed_train_warns_once_per_capacities():
  squares = _MixedSource([(s, s) for s in range(20, 36)])  # every batch needs (0, 0, 8)
  sampler = data.MPerClassSampler(squares.labels, 8, 2, seed=0)
  plan = data.BucketPlan(BUCKET_SHAPES, (0, 0, 2), 2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    batches = list(_bucketed(squares, sampler, plan, num_steps=3))
  assert [len(b) for b in batches[-1]["image"].buckets] == [0, 0, 8]
  assert len([w for w in caught if "compiles once more" in str(w.message)]) == 1


def test_bucketed_train_processes_share_global_slots():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=2)
  plan = data.BucketPlan(BUCKET_SHAPES, (0, 0, 2), 2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    local = [next(_bucketed(source, sampler, plan, flip=False, process_index=p, process_count=2,
                            num_steps=1)) for p in range(2)]
  used = [tuple(len(array) for array in b["image"].buckets) for b in local]
  assert used[0] != used[1]  # the processes grew different buckets: padding matters
  capacities = tuple(np.max(used, axis=0).tolist())
  padded = [data.pad_buckets(b["image"], capacities) for b in local]
  starts = np.concatenate([[0], np.cumsum(capacities)[:-1]]) * 2
  indices = sampler.batch_indices(0)
  for p, (images, batch) in enumerate(zip(padded, local)):
    np.testing.assert_array_equal(batch["label"], source.labels[indices[4 * p:4 * p + 4]])
    flat = data.flat_slots(images.bucket, images.position, capacities, process_index=p,
                           process_count=2)
    for k, (b, index) in enumerate(zip(images.bucket, flat)):
      global_bucket = np.concatenate([q.buckets[b] for q in padded])
      expected = aspect_buckets.resize_longer_side(source[indices[4 * p + k]]["image"], 64)
      h, w = expected.shape[:2]
      np.testing.assert_array_equal(global_bucket[index - starts[b], :h, :w, :3], expected)


def test_bucketed_train_rejects_bad_plans_and_records():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=0)
  small = data.BucketPlan(((32, 48), (48, 48)), (0, 8), 2)  # no (64, 64)
  with pytest.raises(ConfigError):
    _bucketed(source, sampler, small)
  plan = data.BucketPlan(BUCKET_SHAPES, (0, 0, 8), 2)
  with pytest.raises(ConfigError):
    _bucketed(source, sampler, plan, seed=-1)
  with pytest.raises(ConfigError):
    _bucketed(source, sampler, plan, process_count=3)
  bad = int(sampler.batch_indices(0)[3])
  with pytest.raises(DataError, match=f"img{bad}"):
    next(_bucketed(_MixedSource(bad=bad), sampler, plan))


def test_bucketed_train_refuses_images_over_max_pixels():
  source = _MixedSource()
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=0)
  plan = data.BucketPlan(BUCKET_SHAPES, (0, 0, 8), 2)
  indices = sampler.batch_indices(0)
  largest = max(indices, key=lambda i: MIXED[i][0] * MIXED[i][1])
  height, width = MIXED[largest]
  limit = height * width - 1
  with pytest.raises(DataError, match=rf"img{largest}.*{width} x {height} pixels, more than the "
                                      rf"limit of {limit} \(data.max_image_pixels\)"):
    next(_bucketed(source, sampler, plan, max_pixels=limit))
  at_limit = _bucketed(source, sampler, plan, max_pixels=limit + 1, flip=False)
  _check_bucketed_batch(next(at_limit), source, indices, plan)


class _OneElementPerStep:
  """The reference: the former training loader, which built a step's whole batch in one call.

  Headers first (every record's own bucket), the slots of the step, then each image resized,
  maybe flipped and padded to its slot's shape; a warning per new capacities tuple.
  """

  def __init__(self, source, sampler, plan, *, image_size, seed, flip, process_index=0,
               process_count=1, channels=3):
    self.source, self.sampler, self.plan, self.image_size = source, sampler, plan, image_size
    self.seed, self.flip, self.channels = seed, flip, channels
    self.process_index, self.process_count = process_index, process_count
    self.warned = set()

  def own_buckets(self, step):
    """This process's records of `step` and the bucket of each, from its header."""
    indices = self.sampler.local_slice(self.sampler.batch_indices(step), self.process_index,
                                       self.process_count)
    records = [self.source[i] for i in indices]
    return records, np.array([aspect_buckets.assign_bucket(
        *aspect_buckets.resized_shape(*data.image_hw(r["image"]), self.image_size),
        self.plan.shapes) for r in records], np.int64)

  def __call__(self, step):
    records, own = self.own_buckets(step)
    capacities, bucket, position = data.assign_slots(own, self.plan)
    if capacities != self.plan.capacities and capacities not in self.warned:
      self.warned.add(capacities)
      warnings.warn(f"step {step}: the batch needs bucket capacities {capacities}, more than the "
                    f"plan's {self.plan.capacities} for shapes {self.plan.shapes}; the training "
                    f"step compiles once more for this shape", stacklevel=2)
    arrays = tuple(bucket_plan.empty_slots(c, shape, self.channels)
                   for c, shape in zip(capacities, self.plan.shapes))
    offset = self.process_index * len(records)
    labels = np.empty(len(records), np.int32)
    for k, record in enumerate(records):
      resized = aspect_buckets.resize_longer_side(record["image"], self.image_size,
                                                  channels=self.channels)
      if self.flip and np.random.default_rng([self.seed, step, offset + k]).random() < 0.5:
        resized = resized[:, ::-1]
      arrays[bucket[k]][position[k]] = data.with_mask_channel(
          *aspect_buckets.pad_to_bucket(resized, self.plan.shapes[bucket[k]]))
      labels[k] = record["label"]
    return {"image": data.BucketedImages(arrays, bucket, position), "label": labels}


def _mixed_sizes(count, seed):
  """(height, width) of `count` images: many aspect ratios, longer side 12 .. 90 px."""
  rng = np.random.default_rng(seed)
  longer = rng.integers(12, 91, count)
  ratio = rng.choice([1.0, 0.75, 0.5, 0.3, 0.6], count)
  sizes = [(max(1, round(n * r)), int(n)) for n, r in zip(longer, ratio)]
  return [s[::-1] if rng.random() < 0.4 else s for s in sizes]


@pytest.mark.parametrize("worker_count, read_threads, prefetch_batches, start_step, process",
                         [(0, 0, 0, 0, (0, 1)), (0, 2, 2, 2, (1, 2)), (2, 2, 2, 0, (0, 1)),
                          (2, 1, 1, 1, (1, 2))])
def test_bucketed_train_batches_equal_the_one_element_per_step_reference(
    worker_count, read_threads, prefetch_batches, start_step, process):
  # 320 images of 160 classes, batches of 80 (per process 80 or 40: three or two grain groups).
  source = _MixedSource(_mixed_sizes(320, seed=3))
  sampler = data.MPerClassSampler(source.labels, 80, 2, seed=4)
  rows = 80 // process[1]
  shapes = aspect_buckets.bucket_shapes(96, num_buckets=3)  # 5 shapes
  reference = _OneElementPerStep(source, sampler, data.BucketPlan(shapes, (0,) * len(shapes), 4),
                                 image_size=96, seed=7, flip=True, process_index=process[0],
                                 process_count=process[1])
  # A tight plan (no margin, no slack) from the first step's own buckets, that others overflow.
  reference.plan = plan = data.estimate_plan(
      reference.own_buckets(start_step)[1], shapes=shapes, rows_per_step=rows, chunk_rows=4,
      samples_per_class=2, margin=0.0, slack_chunks=0)
  steps = range(start_step, start_step + 4)
  with warnings.catch_warnings(record=True) as expected_warnings:
    warnings.simplefilter("always")
    expected = [reference(step) for step in steps]
  grown = [b for b in expected if tuple(len(a) for a in b["image"].buckets) != plan.capacities]
  assert grown and grown[0] is not expected[0]  # the first step fits, a later one grows
  # Some images sit in a larger bucket than their own (pixels and mask 0 outside them).
  assert any((want["image"].bucket != reference.own_buckets(step)[1]).any()
             for step, want in zip(steps, expected))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loader = data.make_bucketed_train_loader(
        source, sampler, plan=plan, image_size=96, start_step=start_step, seed=7,
        worker_count=worker_count, read_threads=read_threads, prefetch_batches=prefetch_batches,
        process_index=process[0], process_count=process[1], num_steps=len(steps))
    batches = list(loader)
    loader.close()
  assert len(batches) == len(expected)
  for batch, want in zip(batches, expected):
    chex.assert_trees_all_equal(batch, want)
    assert batch["image"].bucket.dtype == np.int32 and batch["image"].position.dtype == np.int32
  messages = lambda ws: [str(w.message) for w in ws if "compiles once more" in str(w.message)]
  assert messages(caught) == messages(expected_warnings) and messages(caught)


class _SlowSource(_MixedSource):
  """Reads take 5 ms each, so that a step of 80 images (three groups) takes a while; counted."""

  reads = 0

  def __getitem__(self, index):
    time.sleep(0.005)
    self.reads += 1
    return super().__getitem__(index)


def _assembling_threads():
  return [t for t in threading.enumerate() if t.name == "batch-assembly" and t.is_alive()]


def test_bucketed_loader_closes_part_way_through_a_step_and_passes_errors_on():
  source = _SlowSource(_mixed_sizes(160, seed=5))
  sampler = data.MPerClassSampler(source.labels, 80, 2, seed=0)
  plan = data.BucketPlan(aspect_buckets.bucket_shapes(96, num_buckets=3), (0, 0, 0, 0, 80), 4)
  loader = data.make_bucketed_train_loader(source, sampler, plan=plan, image_size=96, seed=0,
                                           read_threads=0, prefetch_batches=1)
  assert len(next(loader)["label"]) == 80
  assert _assembling_threads()  # now reading step 1's groups, 0.4 s of reads
  time.sleep(0.1)
  loader.close()
  assert not _assembling_threads()
  assert 80 < source.reads < 160  # stopped part-way through step 1, not after it
  with pytest.raises(StopIteration):
    next(loader)
  # A record's error, raised in the assembling thread, reaches the caller.
  bad = int(sampler.batch_indices(1)[50])  # in the step's second group
  broken = _MixedSource(_mixed_sizes(160, seed=5), bad=bad)
  loader = data.make_bucketed_train_loader(broken, sampler, plan=plan, image_size=96, seed=0,
                                           read_threads=2, prefetch_batches=2)
  next(loader)
  with pytest.raises(DataError,
                     match=rf"img{bad}'\) of fixture/train: cannot read the image header"):
    next(loader)
  loader.close()
