"""grain input pipelines: one element per training step (sampler order) or per evaluation batch.

Each element is built by one worker: the records of the step are read from the source, decoded
and augmented with PIL, and stacked as uint8 NHWC (normalisation happens on the device). The
augmentation RNG of a record is `np.random.default_rng([seed, step, global position])`, so a
batch depends only on (seed, step, sampler), never on worker count, thread timing, process
count or where a run was resumed. A record's own decoded-image transform (set by a source wrapper,
see `source.DECODED_TRANSFORM`) is applied to its augmented or resized image.

Batches are built ahead of the consumer, in the background, so that building batch t + 1 overlaps
the training step on batch t instead of following it: `read_threads` threads each build one batch
(grain's threaded prefetch, in the worker processes when `worker_count > 0`: `mp_prefetch`), and
`prefetch_batches` finished batches wait in a queue filled by a background thread (grain's
`ThreadPrefetchIterDataset`), which also takes the copy out of the worker processes off the
consumer's thread. Both keep the element order, so the batches are the same with or without them;
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


def _record_name(source: Source, index: int, record: dict[str, Any]) -> str:
  """Names a record in error messages; cheap, as it is built for every record."""
  where = f"{source.name}/{source.split}" if hasattr(source, "split") else type(source).__name__
  return f"{index} (id {record.get('id', '?')!r}) of {where}"


class _TrainStep:
  """Maps a global step to this process's augmented batch."""

  def __init__(self, source: Source, sampler: sampler_lib.MPerClassSampler, *, image_size: int,
               seed: int, process_index: int, process_count: int, channels: int,
               crop_scale: tuple[float, float], flip: bool):
    self.source, self.sampler = source, sampler
    self.image_size, self.seed, self.channels = image_size, seed, channels
    self.process_index, self.process_count = process_index, process_count
    self.crop_scale, self.flip = tuple(crop_scale), flip

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    indices = self.sampler.local_slice(self.sampler.batch_indices(step), self.process_index,
                                       self.process_count)
    offset = self.process_index * len(indices)
    images = np.empty((len(indices), self.image_size, self.image_size, self.channels), np.uint8)
    labels = np.empty(len(indices), np.int32)
    for k, (index, record) in enumerate(zip(indices, read_records(self.source, indices))):
      rng = np.random.default_rng([self.seed, step, offset + k])
      image = transforms.train_augment(
          record["image"], rng, image_size=self.image_size, channels=self.channels,
          crop_scale=self.crop_scale, flip=self.flip,
          record=_record_name(self.source, index, record))
      images[k] = apply_decoded_transform(record, image)
      labels[k] = record["label"]
    return {"image": images, "label": labels}


class _EvalBatch:
  """Maps a batch number to resized, center-cropped images of consecutive records (padded)."""

  def __init__(self, source: Source, *, image_size: int, resize_size: int, batch_size: int,
               channels: int):
    self.source, self.image_size, self.resize_size = source, image_size, resize_size
    self.batch_size, self.channels = batch_size, channels

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    start = int(batch) * self.batch_size
    indices = np.arange(start, min(start + self.batch_size, len(self.source)), dtype=np.int64)
    b = self.batch_size
    out = {
        "image": np.zeros((b, self.image_size, self.image_size, self.channels), np.uint8),
        "label": np.full(b, -1, np.int32),
        "mask": np.zeros(b, bool),
        "index": np.full(b, -1, np.int64),
    }
    for k, (index, record) in enumerate(zip(indices, read_records(self.source, indices))):
      image = transforms.eval_transform(
          record["image"], image_size=self.image_size, resize_size=self.resize_size,
          channels=self.channels, record=_record_name(self.source, index, record))
      out["image"][k] = apply_decoded_transform(record, image)
      out["label"][k] = record["label"]
    out["mask"][:len(indices)] = True
    out["index"][:len(indices)] = indices
    return out


def ahead(batches: grain.MapDataset, *, worker_count: int, read_threads: int,
           prefetch_batches: int) -> grain.IterDataset:
  """Builds `batches` ahead of the consumer (see the module docstring), in order."""
  if worker_count < 0 or read_threads < 0 or prefetch_batches < 0:
    raise ConfigError(f"worker_count {worker_count}, read_threads {read_threads} and "
                      f"prefetch_batches {prefetch_batches} must be non-negative")
  dataset = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
  if worker_count > 0:
    # grain 0.2.x reads an Abseil flag in mp_prefetch and fails in programs that do not parse
    # flags with absl.app (google/grain#1355); the flags' defaults are what such programs want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(prefetch_batches, 1)))
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
    read_threads: threads per worker (or in this process), each building one batch ahead of
      the consumer (PIL releases the GIL); 0: one batch at a time.
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
  step_fn = _TrainStep(source, sampler, image_size=image_size, seed=seed,
                       process_index=process_index, process_count=process_count,
                       channels=channels, crop_scale=crop_scale, flip=flip)
  batches = grain.MapDataset.range(start_step, stop).map(step_fn)
  return iter(ahead(batches, worker_count=worker_count, read_threads=read_threads,
                     prefetch_batches=prefetch_batches))


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
    read_threads, prefetch_batches: batches built ahead, as in `make_train_loader`.

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
  batch_fn = _EvalBatch(source, image_size=image_size, resize_size=resize_size,
                        batch_size=batch_size, channels=channels)
  batches = grain.MapDataset.range(num_batches).map(batch_fn)
  return ahead(batches, worker_count=worker_count, read_threads=read_threads,
                prefetch_batches=prefetch_batches)
