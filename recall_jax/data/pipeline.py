"""grain input pipelines (both tasks): one element per image, batched after.

The elements are images: the training loader's element `t * b + k` is position k of this
process's slice of global step t, the evaluation loader's element i is record i (or padding).
Each is read from the source, decoded and augmented (or resized) with PIL, as uint8 HWC
(normalisation happens on the device); grain's own batching then stacks `b` consecutive elements.
So every worker decodes part of every step, and a step's first images are ready after a few
decodes, not after a whole batch. The augmentation RNG of a record is
`np.random.default_rng([seed, step, global position])`, so a batch depends only on (seed, step,
sampler), never on worker count, thread timing, process count or where a run was resumed. A
record's own decoded-image transform (set by a source wrapper, see `source.DECODED_TRANSFORM`) is
applied to its augmented or resized image.

Elements are built ahead of the consumer, in the background, so that building batch t + 1
overlaps the training step on batch t instead of following it: `read_threads` threads each decode
one image at a time (grain's threaded prefetch, in each worker process when `worker_count > 0`:
`mp_prefetch`, which deals the images out to the workers in turn), and `prefetch_batches` stacked
batches wait in a queue filled by a background thread (grain's `ThreadPrefetchIterDataset`),
which also does the stacking and takes the copy out of the worker processes off the consumer's
thread. All keep the element order, so the batches are the same with or without them;
`prefetch_batches=0` and `read_threads=0` build each batch on demand, in series with the caller.
Closing the iterator stops the threads and workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from absl import flags
import grain
import numpy as np

from recall_jax.data import sampler as sampler_lib
from recall_jax.data import transforms
from recall_jax.data.source import Source, apply_decoded_transform, read_records
from recall_jax.errors import ConfigError

# Steps a training iterator covers when `num_steps` is not given (effectively unbounded).
_UNBOUNDED_STEPS = 1 << 40
# Decoded images each read thread may hold ahead of the batching (a few MB at 224 px).
_IMAGES_AHEAD_PER_THREAD = 4


def _record_name(source: Source, index: int, record: dict[str, Any]) -> str:
  """Names a record in error messages; cheap, as it is built for every record."""
  where = f"{source.name}/{source.split}" if hasattr(source, "split") else type(source).__name__
  return f"{index} (id {record.get('id', '?')!r}) of {where}"


class _TrainImage:
  """Maps element `t * b + k` to image k of this process's slice of global step t, augmented."""

  def __init__(self, source: Source, sampler: sampler_lib.MPerClassSampler, *, image_size: int,
               seed: int, process_index: int, process_count: int, channels: int,
               crop_scale: tuple[float, float], flip: bool):
    self.source, self.sampler = source, sampler
    self.image_size, self.seed, self.channels = image_size, seed, channels
    self.local_batch = sampler.batch_size // process_count
    self.offset = process_index * self.local_batch
    self.crop_scale, self.flip = tuple(crop_scale), flip

  def __call__(self, element: int) -> dict[str, np.ndarray]:
    step, k = divmod(int(element), self.local_batch)
    position = self.offset + k  # In the global batch: what the seed names.
    index = self.sampler.record_index(step, position)
    record = read_records(self.source, [index])[0]
    rng = np.random.default_rng([self.seed, step, position])
    image = transforms.train_augment(
        record["image"], rng, image_size=self.image_size, channels=self.channels,
        crop_scale=self.crop_scale, flip=self.flip,
        record=_record_name(self.source, index, record))
    return {"image": apply_decoded_transform(record, image), "label": np.int32(record["label"])}


class _EvalImage:
  """Maps element i to record i resized and center-cropped, or to padding past the source."""

  def __init__(self, source: Source, *, image_size: int, resize_size: int, channels: int):
    self.source, self.image_size, self.resize_size = source, image_size, resize_size
    self.channels = channels

  def __call__(self, element: int) -> dict[str, Any]:
    index = int(element)
    if index >= len(self.source):
      return {"image": np.zeros((self.image_size, self.image_size, self.channels), np.uint8),
              "label": np.int32(-1), "mask": np.False_, "index": np.int64(-1)}
    record = read_records(self.source, [index])[0]
    image = transforms.eval_transform(
        record["image"], image_size=self.image_size, resize_size=self.resize_size,
        channels=self.channels, record=_record_name(self.source, index, record))
    return {"image": apply_decoded_transform(record, image), "label": np.int32(record["label"]),
            "mask": np.True_, "index": np.int64(index)}


def ahead(elements: grain.MapDataset, *, worker_count: int, read_threads: int,
          prefetch_batches: int, batch_size: int | None = None) -> grain.IterDataset:
  """Builds `elements` ahead of the consumer (see the module docstring), in order.

  Args:
    elements: images (with `batch_size`) or whole batches (without).
    worker_count, read_threads, prefetch_batches: as in `make_train_loader`.
    batch_size: stack this many consecutive elements into a batch, after the workers; None: the
      elements are batches already.

  Returns:
    The batches, in element order.
  """
  if worker_count < 0 or read_threads < 0 or prefetch_batches < 0:
    raise ConfigError(f"worker_count {worker_count}, read_threads {read_threads} and "
                      f"prefetch_batches {prefetch_batches} must be non-negative")
  # Images are small: a worker keeps a few per thread ready, to ride out uneven decode times.
  per_thread = 1 if batch_size is None else _IMAGES_AHEAD_PER_THREAD
  dataset = elements.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads * per_thread))
  if worker_count > 0:
    # grain 0.2.x reads an Abseil flag in mp_prefetch and fails in programs that do not parse
    # flags with absl.app (google/grain#1355); the flags' defaults are what such programs want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    buffered = max(prefetch_batches, 1) * (1 if batch_size is None else
                                           max(read_threads, 1) * _IMAGES_AHEAD_PER_THREAD)
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=buffered))
  if batch_size is not None:
    dataset = dataset.batch(batch_size, drop_remainder=True)
  if prefetch_batches > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch_batches)
  return dataset


def _check_seed(seed: int) -> None:
  if seed < 0:
    raise ConfigError(f"seed must be non-negative, got {seed}")


def make_train_loader(source: Source, sampler: sampler_lib.MPerClassSampler, *, image_size: int,
                      start_step: int = 0, seed: int, worker_count: int = 0, process_index: int = 0,
                      process_count: int = 1, channels: int = 3,
                      crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                      num_steps: int | None = None, read_threads: int = 2,
                      prefetch_batches: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This process's training batches for global steps `start_step, start_step + 1, ...`.

  Args:
    source: records `{'image': encoded bytes, 'label': int, ...}` indexed by the sampler.
    sampler: the global batch order (`MPerClassSampler`); resume = pass the saved step.
    image_size: output side in pixels (RandomResizedCrop target).
    start_step: the first global step.
    seed: augmentation seed (non-negative).
    worker_count: grain worker processes (0: decode in this process, for tests and debugging).
    process_index, process_count: this host's contiguous slice of each global batch.
    channels: 1 (grayscale, e.g. Omniglot) or 3 (RGB).
    crop_scale: RandomResizedCrop's area range (ratio is 3/4-4/3).
    flip: random horizontal flips (off makes sense for characters).
    num_steps: steps to yield; default effectively unbounded.
    read_threads: threads per worker (or in this process), each decoding one image at a time
      ahead of the consumer (PIL releases the GIL); 0: one image at a time, when asked for.
    prefetch_batches: finished batches a background thread keeps ready, so that building them
      overlaps the caller's training step; 0: none (built when asked for, unless read_threads).

  Returns:
    An iterator (close it to stop its threads and workers) of
    `{'image': uint8 (b, image_size, image_size, channels), 'label': int32 (b,)}` with
    b = sampler.batch_size / process_count, in sampler order.
  """
  _check_seed(seed)
  if start_step < 0:
    raise ValueError(f"start_step must be non-negative, got {start_step}")
  # Validates.
  sampler.local_slice(np.zeros(sampler.batch_size, np.int64), process_index, process_count)
  stop = start_step + (_UNBOUNDED_STEPS if num_steps is None else int(num_steps))
  image_fn = _TrainImage(source, sampler, image_size=image_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         channels=channels, crop_scale=crop_scale, flip=flip)
  b = image_fn.local_batch
  images = grain.MapDataset.range(start_step * b, stop * b).map(image_fn)
  return iter(ahead(images, worker_count=worker_count, read_threads=read_threads,
                    prefetch_batches=prefetch_batches, batch_size=b))


def make_eval_loader(source: Source, *, image_size: int, resize_size: int, batch_size: int,
                     channels: int = 3, worker_count: int = 0, read_threads: int = 2,
                     prefetch_batches: int = 2) -> grain.IterDataset:
  """An iterable over the whole source in order, in fixed-size batches (last one padded).

  Args:
    source: records `{'image': encoded bytes, 'label': int, ...}`.
    image_size: center-crop side in pixels.
    resize_size: the shorter side is first resized to this (>= image_size).
    batch_size: images per batch.
    channels: 1 or 3.
    worker_count: grain worker processes (0: in this process).
    read_threads, prefetch_batches: read-ahead, as in `make_train_loader`.

  Returns:
    Re-iterable batches `{'image': uint8 (batch_size, image_size, image_size, channels),
    'label': int32 (batch_size,), 'mask': bool (batch_size,), 'index': int64 (batch_size,)}`;
    padding rows (only in the last batch) have mask False, label -1, index -1 and zero images.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be positive, got {batch_size}")
  if image_size > resize_size:
    raise ConfigError(f"image_size {image_size} exceeds resize_size {resize_size}")
  num_batches = -(-len(source) // batch_size)
  image_fn = _EvalImage(source, image_size=image_size, resize_size=resize_size,
                        channels=channels)
  images = grain.MapDataset.range(num_batches * batch_size).map(image_fn)
  return ahead(images, worker_count=worker_count, read_threads=read_threads,
               prefetch_batches=prefetch_batches, batch_size=batch_size)
