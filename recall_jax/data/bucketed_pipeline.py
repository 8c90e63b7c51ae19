"""Input pipelines for full-resolution images that keep their aspect ratio (landmark retrieval).

Images are resized so that their longer side is `image_size` and padded at the bottom and right
(`aspect_buckets`), never cropped. The validity mask of the real pixels travels with the pixels
as one more uint8 channel (255 on real pixels, 0 on padding): a batch stays a single uint8 array,
so the training step, the mega-batch chunking and `extract_embeddings` carry it unchanged, and
the model's input function splits it off again (`split_mask_channel`) to pass `mask=` to the
ResNet, whose GeM then pools the real pixels only.

- Training (`make_bucketed_train_loader`): a batch is one array per aspect bucket, of the fixed
  capacities of a `bucket_plan.BucketPlan`, and where each batch row sits; the mega-batch step
  cuts its chunks within each bucket, so every chunk has one fixed shape and the step compiles
  once. No crop; random horizontal flips. As in the square-crop loader (`pipeline.batched`), the
  grain elements are groups of consecutive images of a step, so every worker decodes part of
  every step: a worker reads each record once, takes its own bucket from the image's header,
  and returns it resized, maybe flipped, with its mask channel, unpadded (its slot is not known
  yet); a thread of this process waits for a step's groups, assigns the slots from the own
  buckets (`bucket_plan.assign_slots`) and copies each image into its slot.
- Evaluation (`make_bucketed_eval_loader`): consecutive images in fixed-size batches, only
  downscaled by default (an image no larger than `image_size` keeps its size, as the reference
  code of the revisited benchmarks does; `upscale=True` resizes every image); a batch is padded
  to the smallest bucket of `bucket_shapes(image_size, num_buckets=...)` that holds all of its
  images, so each bucket shape compiles once.

Serves instance-level retrieval.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from recall_jax.data import aspect_buckets
from recall_jax.data import bucket_plan
from recall_jax.data import pipeline
from recall_jax.data import sampler as sampler_lib
from recall_jax.data import transforms
from recall_jax.data.source import Source, read_records
from recall_jax.errors import ConfigError, DataError


def with_mask_channel(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 (H, W, C) pixels and a bool (H, W) mask -> uint8 (H, W, C + 1), mask as 0 / 255."""
  return np.concatenate([image, np.where(mask, 255, 0).astype(np.uint8)[..., None]], axis=-1)


def split_mask_channel(images: Any) -> tuple[Any, Any]:
  """(..., H, W, C + 1) -> pixels (..., H, W, C) and the bool (..., H, W) mask (NumPy or JAX)."""
  return images[..., :-1], images[..., -1] > 127


def _name(source: Source, index: int, record: dict[str, Any]) -> str:
  where = f"{source.name}/{source.split}" if hasattr(source, "split") else type(source).__name__
  return f"{index} (id {record.get('id', '?')!r}) of {where}"


def _checked_hw(image: bytes | np.ndarray, max_pixels: int) -> tuple[int, int]:
  """(height, width) from the header (`bucket_plan.image_hw`); refuses more than `max_pixels`."""
  height, width = bucket_plan.image_hw(image)
  if height * width > max_pixels:  # Refused before decoding, as `transforms` does.
    raise DataError(f"the image has {width} x {height} pixels, more than the limit of "
                    f"{max_pixels} (data.max_image_pixels)")
  return height, width


class _TrainImage:
  """Maps element `t * b + k` to image k of this process's slice of global step t, whole.

  The image is resized to the longer side `image_size` and maybe flipped, but not padded: the
  slot it goes to depends on the whole step. Its own bucket comes from the header of the record
  read for decoding (no second read).
  """

  def __init__(self, source: Source, sampler: sampler_lib.MPerClassSampler, *,
               plan: bucket_plan.BucketPlan, image_size: int, seed: int, process_index: int,
               process_count: int, channels: int, flip: bool, max_pixels: int):
    self.source, self.sampler, self.plan, self.image_size = source, sampler, plan, image_size
    self.seed, self.channels, self.flip, self.max_pixels = seed, channels, flip, max_pixels
    self.local_batch = sampler.batch_size // process_count
    self.offset = process_index * self.local_batch

  def __call__(self, element: int) -> dict[str, Any]:
    step, k = divmod(int(element), self.local_batch)
    position = self.offset + k  # In the global batch: what the seed names.
    index = self.sampler.record_index(step, position)
    record = read_records(self.source, [index])[0]
    try:
      size = aspect_buckets.resized_shape(*_checked_hw(record["image"], self.max_pixels),
                                          self.image_size)
      own = aspect_buckets.assign_bucket(*size, self.plan.shapes)
      resized = aspect_buckets.resize_longer_side(record["image"], self.image_size,
                                                  channels=self.channels)
    except DataError as e:
      raise DataError(f"record {_name(self.source, index, record)}: {e}") from None
    if self.flip and np.random.default_rng([self.seed, step, position]).random() < 0.5:
      resized = resized[:, ::-1]
    return {"image": resized, "own": own, "label": record["label"], "step": step}


def _pack(images: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """A group's images of several shapes as one flat buffer (one shared-memory block out of a
  worker), with each image's (h, w), own bucket and label, and the step.

  The buffer holds each uint8 (h, w, C) image with its mask channel, all 255: (h, w, C + 1).
  """
  sizes = [image["image"].shape for image in images]
  pixels = np.empty(sum(h * w * (c + 1) for h, w, c in sizes), np.uint8)
  start = 0
  for image, (h, w, c) in zip(images, sizes):
    with_mask = pixels[start:start + h * w * (c + 1)].reshape(h, w, c + 1)
    with_mask[..., :c] = image["image"]
    with_mask[..., c] = 255
    start += h * w * (c + 1)
  return {"pixels": pixels, "hw": np.array([s[:2] for s in sizes], np.int64),
          "own": np.array([image["own"] for image in images], np.int64),
          "label": np.array([image["label"] for image in images], np.int32),
          "step": np.int64(images[0]["step"])}


class _IntoSlots:
  """Combines a step's packed groups into per-bucket arrays (in the consumer's process)."""

  def __init__(self, plan: bucket_plan.BucketPlan, channels: int):
    self.plan, self.channels = plan, channels
    # Capacities already warned about: the warning comes once per loader and tuple.
    self.warned: set[tuple[int, ...]] = set()

  def __call__(self, groups: Iterator[dict[str, np.ndarray]]) -> dict[str, Any]:
    groups = collections.deque(groups)  # The slots need every own bucket of the step.
    step = int(groups[0]["step"])
    capacities, bucket, position = bucket_plan.assign_slots(
        np.concatenate([group["own"] for group in groups]), self.plan)
    if capacities != self.plan.capacities and capacities not in self.warned:
      self.warned.add(capacities)
      warnings.warn(f"step {step}: the batch needs bucket capacities {capacities}, more than the "
                    f"plan's {self.plan.capacities} for shapes {self.plan.shapes}; the training "
                    f"step compiles once more for this shape", stacklevel=2)
    labels = np.concatenate([group["label"] for group in groups])
    # Zero pixels and mask wherever no image lands (in a larger slot: outside its own shape).
    arrays = tuple(pipeline.fresh_zeros((c, *shape, self.channels + 1))
                   for c, shape in zip(capacities, self.plan.shapes))
    row = 0
    while groups:
      group = groups.popleft()  # Dropped once copied: the step's groups shrink as its batch fills.
      start = 0
      for height, width in group["hw"]:
        end = start + height * width * (self.channels + 1)
        arrays[bucket[row]][position[row], :height, :width] = (
            group["pixels"][start:end].reshape(height, width, self.channels + 1))
        start, row = end, row + 1
    # Each bucket's images fill its first slots; the rest are empty slots (`empty_slots`).
    for array, used in zip(arrays, np.bincount(bucket, minlength=len(arrays))):
      array[used:, ..., -1] = 255
    return {"image": bucket_plan.BucketedImages(arrays, bucket, position), "label": labels}


def make_bucketed_train_loader(source: Source, sampler: sampler_lib.MPerClassSampler, *,
                               plan: bucket_plan.BucketPlan, image_size: int, start_step: int = 0,
                               seed: int, worker_count: int = 0, process_index: int = 0,
                               process_count: int = 1, channels: int = 3,
                               crop_scale: tuple[float, float] | None = None, flip: bool = True,
                               num_steps: int | None = None, read_threads: int = 2,
                               prefetch_batches: int = 2,
                               max_pixels: int = transforms.DEFAULT_MAX_PIXELS
                               ) -> Iterator[dict[str, Any]]:
  """Training batches of whole images (longer side `image_size`) in per-bucket arrays.

  Each image of this process's slice of the global batch is resized, maybe flipped, and padded
  into the shape of the slot `bucket_plan.assign_slots` gives it (its own bucket or a larger
  one). A batch that does not fit `plan` grows a bucket, with a warning once per new capacities
  tuple (the training step compiles once more for it). Flips are drawn from
  `default_rng([seed, step, global position])`, so batches depend only on (seed, step, sampler,
  plan), never on worker count, read threads, grouping or where a run was resumed. Takes the
  arguments of `pipeline.make_train_loader` (so either serves the training loop), plus `plan`.

  The workers decode groups of consecutive images of a step (`pipeline.batched`); a thread of
  this process holds a step's groups until the last one arrives (the slots depend on every
  image's bucket), then copies them into the step's bucket arrays, dropping each group once
  copied: the host memory is near `prefetch_batches + 1` batches and the groups in flight.

  Args:
    source: records `{'image': encoded bytes or uint8 pixels, 'label': int, ...}`.
    sampler: the global batch order; resume = pass the saved step as `start_step`.
    plan: the bucket shapes and capacities (`bucket_plan.estimate_bucket_plan`); its last shape
      must hold an (image_size, image_size) image.
    image_size: the longer side of every image, in pixels.
    start_step, seed, worker_count, process_index, process_count, channels, flip, num_steps,
      read_threads, prefetch_batches, max_pixels: as in `pipeline.make_train_loader`.
    crop_scale: ignored, as nothing is cropped.

  Returns:
    An iterator of `{'image': BucketedImages, 'label': int32 (b,)}`, rows in the sampler's
    order; bucket k of the images is uint8 (capacity_k, H_k, W_k, channels + 1), the last channel
    the validity mask (`split_mask_channel`), empty slots zero with the mask 255.

  Raises:
    ConfigError: a negative seed or start_step, a batch not splitting over the processes, or a
      plan whose last shape cannot hold a whole image.
  """
  del crop_scale  # Whole images: nothing is cropped.
  if seed < 0 or start_step < 0:
    raise ConfigError(f"seed {seed} and start_step {start_step} must be non-negative")
  if plan.shapes[-1][0] < image_size or plan.shapes[-1][1] < image_size:
    raise ConfigError(f"the plan's largest bucket {plan.shapes[-1]} cannot hold a whole image "
                      f"of longer side {image_size}")
  sampler.local_slice(np.zeros(sampler.batch_size, np.int64), process_index, process_count)
  stop = start_step + (1 << 40 if num_steps is None else int(num_steps))
  image_fn = _TrainImage(source, sampler, plan=plan, image_size=image_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         channels=channels, flip=flip, max_pixels=max_pixels)
  return iter(pipeline.batched(image_fn, batches=range(start_step, stop),
                               batch_size=image_fn.local_batch, worker_count=worker_count,
                               read_threads=read_threads, prefetch_batches=prefetch_batches,
                               pack=_pack, combine=_IntoSlots(plan, channels)))


class _BucketedEvalBatch:
  """Maps a batch number to consecutive whole images padded to one bucket (rows padded too)."""

  def __init__(self, source: Source, *, image_size: int, batch_size: int, num_buckets: int,
               channels: int, upscale: bool, max_pixels: int):
    self.source, self.image_size, self.batch_size = source, image_size, batch_size
    self.shapes = aspect_buckets.bucket_shapes(image_size, num_buckets=num_buckets)
    self.channels, self.upscale, self.max_pixels = channels, upscale, max_pixels

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    start = int(batch) * self.batch_size
    indices = np.arange(start, min(start + self.batch_size, len(self.source)), dtype=np.int64)
    records = read_records(self.source, indices)
    resized, labels = [], []
    for index, record in zip(indices, records):
      try:
        _checked_hw(record["image"], self.max_pixels)
        resized.append(aspect_buckets.resize_longer_side(
            record["image"], self.image_size, channels=self.channels, upscale=self.upscale))
      except DataError as e:
        raise DataError(f"record {_name(self.source, index, record)}: {e}") from None
      labels.append(record["label"])
    height = max(r.shape[0] for r in resized)
    width = max(r.shape[1] for r in resized)
    shape = self.shapes[aspect_buckets.assign_bucket(height, width, self.shapes)]
    b = self.batch_size
    out = {"image": np.zeros((b, *shape, self.channels + 1), np.uint8),
           "label": np.full(b, -1, np.int32), "mask": np.zeros(b, bool),
           "index": np.full(b, -1, np.int64)}
    for k, image in enumerate(resized):
      out["image"][k] = with_mask_channel(*aspect_buckets.pad_to_bucket(image, shape))
    out["label"][:len(labels)] = labels
    out["mask"][:len(indices)] = True
    out["index"][:len(indices)] = indices
    return out


def make_bucketed_eval_loader(source: Source, *, image_size: int, batch_size: int,
                              num_buckets: int = 4, channels: int = 3, upscale: bool = False,
                              worker_count: int = 0, read_threads: int = 2,
                              prefetch_batches: int = 2,
                              max_pixels: int = transforms.DEFAULT_MAX_PIXELS
                              ) -> grain.IterDataset:
  """Every image of `source` in order, whole (longer side `image_size`), in bucketed batches.

  Args:
    source: records `{'image': encoded bytes, 'label': int, ...}`.
    image_size: the longer side of every image larger than that, in pixels.
    upscale: also enlarge smaller images to a longer side of `image_size` (False: they keep
      their size, the revisited benchmarks' convention).
    batch_size: images per batch (the last batch is padded with empty rows).
    num_buckets: short-side steps per orientation (`aspect_buckets.bucket_shapes`).
    channels: 1 or 3.
    worker_count, read_threads, prefetch_batches: as in `pipeline.make_eval_loader`.
    max_pixels: refuse (DataError, naming the record) an image with more pixels than this, from
      its header, before decoding it (`data.max_image_pixels`).

  Returns:
    Re-iterable batches `{'image': uint8 (batch_size, H_b, W_b, channels + 1), 'label',
    'mask', 'index'}` as `pipeline.make_eval_loader` gives, (H_b, W_b) the batch's bucket and
    the last channel the pixels' validity mask (`split_mask_channel`).
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be positive, got {batch_size}")
  num_batches = -(-len(source) // batch_size)
  batch_fn = _BucketedEvalBatch(source, image_size=image_size, batch_size=batch_size,
                                num_buckets=num_buckets, channels=channels, upscale=upscale,
                                max_pixels=max_pixels)
  batches = grain.MapDataset.range(num_batches).map(batch_fn)
  return pipeline.ahead(batches, worker_count=worker_count, read_threads=read_threads,
                        prefetch_batches=prefetch_batches)
