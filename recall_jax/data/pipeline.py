"""grain input pipelines (both tasks): images decoded by all workers, batched after.

The images are numbered: the training loader's image `t * b + k` is position k of this process's
slice of global step t, the evaluation loader's image i is record i (or padding). Each is read
from the source, decoded and augmented (or resized) with PIL, as uint8 HWC (normalisation happens
on the device). A grain element is a group of up to `_MAX_GROUP_IMAGES` consecutive images of one
batch, stacked by the worker that decodes them: moving an element out of a worker process costs
about the same whatever its size, so a group pays it once for a few dozen images, and every
worker still decodes part of every step (a step's first images are ready after one group, not a
whole batch). The consumer's side copies a batch's groups into one fresh array per key (the
whole-image loader of `bucketed_pipeline` packs and places its groups its own way). The
augmentation RNG of a record is `np.random.default_rng([seed, step, global position])`, so a
batch depends only on (seed, step, sampler), never on worker count, grouping, thread timing,
process count or where a run was resumed. A record's own decoded-image transform (set by a source
wrapper, see `source.DECODED_TRANSFORM`) is applied to its augmented or resized image.

Batches are built ahead of the consumer, in the background, so that building batch t + 1
overlaps the training step on batch t instead of following it: `read_threads` threads each build
one image group at a time (grain's threaded prefetch, in each worker process when
`worker_count > 0`: `mp_prefetch`, which deals the groups out to the workers in turn), and a
background thread copies the groups into batches, holding at most `prefetch_batches` of them
(ready or being filled): with the batch the caller holds, the loader's host memory stays near
`prefetch_batches + 1` batches. All keep the element order, so the batches are the same with or
without them; `prefetch_batches=0` and `read_threads=0` build each batch on demand, in series
with the caller. Closing (or dropping) the iterator stops the thread and the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import functools
import math
import mmap
import queue
import threading
import weakref
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
# Images per grain element: enough that moving an element out of a worker process (a shared
# memory block per array) costs little per image, few enough that all workers share each batch.
_MAX_GROUP_IMAGES = 32
# One transparent huge page: smaller arrays gain nothing from a mapping of their own.
_HUGE_PAGE_BYTES = 2 << 20
# Image groups each read thread (and each worker's output buffer, per thread) may hold ahead of
# the batching: a few MB at 224 px.
_GROUPS_AHEAD_PER_THREAD = 2


def _record_name(source: Source, index: int, record: dict[str, Any]) -> str:
  """Names a record in error messages; cheap, as it is built for every record."""
  where = f"{source.name}/{source.split}" if hasattr(source, "split") else type(source).__name__
  return f"{index} (id {record.get('id', '?')!r}) of {where}"


class _TrainImage:
  """Maps element `t * b + k` to image k of this process's slice of global step t, augmented."""

  def __init__(self, source: Source, sampler: sampler_lib.MPerClassSampler, *, image_size: int,
               seed: int, process_index: int, process_count: int, channels: int,
               crop_scale: tuple[float, float], flip: bool, max_pixels: int):
    self.source, self.sampler, self.max_pixels = source, sampler, max_pixels
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
        crop_scale=self.crop_scale, flip=self.flip, max_pixels=self.max_pixels,
        record=_record_name(self.source, index, record))
    return {"image": apply_decoded_transform(record, image), "label": np.int32(record["label"])}


class _EvalImage:
  """Maps element i to record i resized and center-cropped, or to padding past the source."""

  def __init__(self, source: Source, *, image_size: int, resize_size: int, channels: int,
               max_pixels: int):
    self.source, self.image_size, self.resize_size = source, image_size, resize_size
    self.channels, self.max_pixels = channels, max_pixels

  def __call__(self, element: int) -> dict[str, Any]:
    index = int(element)
    if index >= len(self.source):
      return {"image": np.zeros((self.image_size, self.image_size, self.channels), np.uint8),
              "label": np.int32(-1), "mask": np.False_, "index": np.int64(-1)}
    record = read_records(self.source, [index])[0]
    image = transforms.eval_transform(
        record["image"], image_size=self.image_size, resize_size=self.resize_size,
        channels=self.channels, max_pixels=self.max_pixels,
        record=_record_name(self.source, index, record))
    return {"image": apply_decoded_transform(record, image), "label": np.int32(record["label"]),
            "mask": np.True_, "index": np.int64(index)}


def ahead(batches: grain.MapDataset, *, worker_count: int, read_threads: int,
          prefetch_batches: int) -> grain.IterDataset:
  """Builds `batches` (elements that are whole batches) ahead of the consumer, in order.

  Args:
    batches: one element per batch.
    worker_count, read_threads, prefetch_batches: as in `make_train_loader`.

  Returns:
    The batches, in element order.
  """
  _check_read_ahead(worker_count, read_threads, prefetch_batches)
  dataset = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
  if worker_count > 0:
    dataset = _in_workers(dataset, worker_count, max(prefetch_batches, 1))
  if prefetch_batches > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch_batches)
  return dataset


def _check_read_ahead(worker_count: int, read_threads: int, prefetch_batches: int) -> None:
  if worker_count < 0 or read_threads < 0 or prefetch_batches < 0:
    raise ConfigError(f"worker_count {worker_count}, read_threads {read_threads} and "
                      f"prefetch_batches {prefetch_batches} must be non-negative")


def _in_workers(dataset: grain.IterDataset, worker_count: int,
                buffered: int) -> grain.IterDataset:
  """`dataset` read in `worker_count` processes, each keeping `buffered` elements ready."""
  # grain 0.2.x reads an Abseil flag in mp_prefetch and fails in programs that do not parse
  # flags with absl.app (google/grain#1355); the flags' defaults are what such programs want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=buffered))


def stack_images(images: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """A group's images (`image_fn`'s outputs, in order) stacked per key, into `fresh_zeros`
  (a group of 224 px crops is about 5 MB, new for every group): `batched`'s default."""
  stacked = {}
  for key in images[0]:
    first = np.asarray(images[0][key])
    stacked[key] = np.stack([image[key] for image in images],
                            out=fresh_zeros((len(images), *first.shape), first.dtype))
  return stacked


class _ImageGroup:
  """Maps element g to up to `group_size` consecutive images of one batch, packed by `pack`.

  Element `n * groups_per_batch + j` is images `j * group_size ...` of batch n, which are the
  images `n * batch_size + i` of `image_fn`.
  """

  def __init__(self, image_fn: Callable[[int], dict[str, Any]], *, batch_size: int,
               group_size: int,
               pack: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]] = stack_images):
    self.image_fn, self.batch_size, self.group_size = image_fn, batch_size, group_size
    self.pack = pack
    self.groups_per_batch = -(-batch_size // group_size)

  def __call__(self, element: int) -> dict[str, np.ndarray]:
    batch, j = divmod(int(element), self.groups_per_batch)
    first = batch * self.batch_size + j * self.group_size
    last = min(first + self.group_size, (batch + 1) * self.batch_size)
    return self.pack([self.image_fn(i) for i in range(first, last)])


def _group_size(batch_size: int) -> int:
  """Images per element: at most `_MAX_GROUP_IMAGES`, the batch split into equal groups."""
  groups = -(-batch_size // _MAX_GROUP_IMAGES)
  return -(-batch_size // groups)


class _End:
  """What the assembling thread queues after the last batch (or with the error that ended it)."""

  def __init__(self, error: BaseException | None = None):
    self.error = error


class _Stopped(Exception):
  """Ends a batch's `combine` when the loader is closed part-way through the batch."""


def fresh_zeros(shape: tuple[int, ...], dtype: np.dtype = np.uint8) -> np.ndarray:
  """Zeros in fresh anonymous memory that asks for transparent huge pages, if large.

  A batch's arrays are hundreds of MB, allocated anew each step (the caller may keep a batch);
  touching them page by page is most of the copying's cost, and where the first touch of fresh
  memory is slow (virtual machines that hand freed memory back to their host) about as much as
  decoding the images. Huge pages cut the faults 512-fold. Plain `np.zeros` below 2 MiB (one
  huge page) or where the system has no `MADV_HUGEPAGE`.
  """
  size = math.prod(shape) * np.dtype(dtype).itemsize
  if size < _HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
    return np.zeros(shape, dtype)
  memory = mmap.mmap(-1, size)  # Anonymous: zero-filled, unmapped when the array goes.
  memory.madvise(mmap.MADV_HUGEPAGE)
  return np.frombuffer(memory, dtype).reshape(shape)


def stacked_batch(groups: Iterator[dict[str, np.ndarray]], *,
                  batch_size: int) -> dict[str, np.ndarray]:
  """Copies a batch's stacked groups, as they arrive, into one fresh array per key
  (`fresh_zeros`): the default `combine` of `batched`."""
  batch, row = None, 0
  for group in groups:
    if batch is None:
      batch = {key: fresh_zeros((batch_size, *value.shape[1:]), value.dtype)
               for key, value in group.items()}
    size = len(next(iter(group.values())))
    for key, value in group.items():
      batch[key][row:row + size] = value
    row += size
  return batch


class _Assembler:
  """Combines each run of `groups_per_batch` consecutive image groups into a batch."""

  def __init__(self, groups: Iterator[dict[str, np.ndarray]], *, groups_per_batch: int,
               combine: Callable[[Iterator[dict[str, np.ndarray]]], Any]):
    self.groups, self.groups_per_batch, self.combine = groups, groups_per_batch, combine

  def __call__(self, stopped: Callable[[], bool] = lambda: False) -> Any:
    """The next batch; None when stopped part-way. StopIteration after the last one."""
    first = next(self.groups)

    def batch_groups() -> Iterator[dict[str, np.ndarray]]:
      yield first
      for _ in range(self.groups_per_batch - 1):
        if stopped():
          raise _Stopped
        yield next(self.groups)

    try:
      return self.combine(batch_groups())
    except _Stopped:
      return None


def _fill(assemble: _Assembler, slots: threading.Semaphore, ready: queue.SimpleQueue,
          stop: threading.Event) -> None:
  """The assembling thread: a batch per free slot, until the end, an error or `stop`."""
  try:
    while True:
      while not slots.acquire(timeout=0.1):
        if stop.is_set():
          return
      batch = assemble(stop.is_set)
      if batch is None or stop.is_set():
        return
      ready.put(batch)
  except StopIteration:
    ready.put(_End())
  except BaseException as e:  # pylint: disable=broad-except
    ready.put(_End(e))  # Raised in the caller's thread, with its traceback.


class _BatchIterator:
  """Batches assembled from image groups, in order.

  With `prefetch_batches > 0`, a background thread assembles the batches; at most
  `prefetch_batches` of them (ready or being filled) are held by the iterator at any time, so
  the loader's host memory is that many batches plus what the caller keeps. The thread stops
  when the iterator is closed or dropped.
  """

  def __init__(self, groups: grain.IterDataset, *, groups_per_batch: int,
               combine: Callable[[Iterator[dict[str, np.ndarray]]], Any], prefetch_batches: int):
    self._groups = iter(groups)
    self._assemble = _Assembler(self._groups, groups_per_batch=groups_per_batch, combine=combine)
    self._thread, self._done = None, False
    if prefetch_batches > 0:
      self._slots = threading.Semaphore(prefetch_batches)
      self._ready: queue.SimpleQueue = queue.SimpleQueue()
      self._stop = threading.Event()
      # The thread holds no reference to the iterator, so dropping the iterator stops it.
      self._thread = threading.Thread(
          target=_fill, args=(self._assemble, self._slots, self._ready, self._stop),
          name="batch-assembly", daemon=True)
      weakref.finalize(self, self._stop.set)
      self._thread.start()

  def __iter__(self) -> _BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    if self._thread is None:
      return self._assemble()
    item = self._ready.get()
    self._slots.release()
    if isinstance(item, _End):
      self._done = True
      if item.error is not None:
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the thread (within one image group, or a batch's final copy) and the workers."""
    self._done = True
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    if hasattr(self._groups, "close"):
      self._groups.close()


class _GroupedBatches:
  """Re-iterable batches, each combined from its image groups (see `batched`)."""

  def __init__(self, groups: grain.IterDataset, *, groups_per_batch: int,
               combine: Callable[[Iterator[dict[str, np.ndarray]]], Any], prefetch_batches: int):
    self._groups, self._prefetch_batches = groups, prefetch_batches
    self._groups_per_batch, self._combine = groups_per_batch, combine

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._groups, groups_per_batch=self._groups_per_batch,
                          combine=self._combine, prefetch_batches=self._prefetch_batches)


def batched(image_fn: Callable[[int], dict[str, Any]], *, batches: range, batch_size: int,
            worker_count: int, read_threads: int, prefetch_batches: int,
            pack: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]] = stack_images,
            combine: Callable[[Iterator[dict[str, np.ndarray]]], Any] | None = None
            ) -> _GroupedBatches:
  """Batches n in `batches` of images `image_fn(n * batch_size + i)`, built ahead, in order.

  The grain elements are groups of up to `_MAX_GROUP_IMAGES` consecutive images of a batch,
  packed by the worker that decodes them (so moving them out of a worker process costs once per
  group, not once per image, and every worker still decodes part of every batch); the consumer's
  side combines the groups of a batch into the batch.

  Args:
    image_fn: image number -> `{key: value}`.
    batches: the batch numbers to build.
    batch_size: images per batch.
    worker_count, read_threads, prefetch_batches: as in `make_train_loader`.
    pack: a group's images (`image_fn`'s outputs, in order) -> its grain element, a dict of
      NumPy arrays (each moved out of a worker process as one shared-memory block); runs where
      the images are decoded, so it must pickle. Default: each key stacked, which needs the same
      keys, shapes and dtypes for all images.
    combine: an iterator over a batch's groups (in order, as they arrive) -> the batch; runs in
      this process. Default: the stacked groups copied into one fresh (batch_size, ...) array per
      key (`stacked_batch`).

  Returns:
    Re-iterable batches (by default `{key: (batch_size, ...) array}`); each iterator has
    `close()`.
  """
  _check_read_ahead(worker_count, read_threads, prefetch_batches)
  group_fn = _ImageGroup(image_fn, batch_size=batch_size, group_size=_group_size(batch_size),
                         pack=pack)
  per_batch = group_fn.groups_per_batch
  groups = grain.MapDataset.range(batches.start * per_batch, batches.stop * per_batch).map(
      group_fn).to_iter_dataset(grain.ReadOptions(
          num_threads=read_threads, prefetch_buffer_size=read_threads * _GROUPS_AHEAD_PER_THREAD))
  if worker_count > 0:
    groups = _in_workers(groups, worker_count, max(read_threads, 1) * _GROUPS_AHEAD_PER_THREAD)
  if combine is None:
    combine = functools.partial(stacked_batch, batch_size=batch_size)
  return _GroupedBatches(groups, groups_per_batch=per_batch, combine=combine,
                         prefetch_batches=prefetch_batches)


def _check_seed(seed: int) -> None:
  if seed < 0:
    raise ConfigError(f"seed must be non-negative, got {seed}")


def make_train_loader(source: Source, sampler: sampler_lib.MPerClassSampler, *, image_size: int,
                      start_step: int = 0, seed: int, worker_count: int = 0, process_index: int = 0,
                      process_count: int = 1, channels: int = 3,
                      crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                      num_steps: int | None = None, read_threads: int = 2,
                      prefetch_batches: int = 2,
                      max_pixels: int = transforms.DEFAULT_MAX_PIXELS
                      ) -> Iterator[dict[str, np.ndarray]]:
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
    prefetch_batches: batches a background thread keeps ready or in progress, so that building
      them overlaps the caller's training step; 0: none (built when asked for, unless
      read_threads).
    max_pixels: refuse (DataError, naming the record) an image with more pixels than this, from
      its header, before decoding it (`data.max_image_pixels`).

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
                         channels=channels, crop_scale=crop_scale, flip=flip,
                         max_pixels=max_pixels)
  return iter(batched(image_fn, batches=range(start_step, stop), batch_size=image_fn.local_batch,
                      worker_count=worker_count, read_threads=read_threads,
                      prefetch_batches=prefetch_batches))


def make_eval_loader(source: Source, *, image_size: int, resize_size: int, batch_size: int,
                     channels: int = 3, worker_count: int = 0, read_threads: int = 2,
                     prefetch_batches: int = 2, max_pixels: int = transforms.DEFAULT_MAX_PIXELS
                     ) -> Iterable[dict[str, np.ndarray]]:
  """An iterable over the whole source in order, in fixed-size batches (last one padded).

  Args:
    source: records `{'image': encoded bytes, 'label': int, ...}`.
    image_size: center-crop side in pixels.
    resize_size: the shorter side is first resized to this (>= image_size).
    batch_size: images per batch.
    channels: 1 or 3.
    worker_count: grain worker processes (0: in this process).
    read_threads, prefetch_batches: read-ahead, as in `make_train_loader`.
    max_pixels: refuse larger images, as in `make_train_loader`.

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
                        channels=channels, max_pixels=max_pixels)
  return batched(image_fn, batches=range(num_batches), batch_size=batch_size,
                 worker_count=worker_count, read_threads=read_threads,
                 prefetch_batches=prefetch_batches)
