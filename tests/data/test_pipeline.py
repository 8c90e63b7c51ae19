"""Tests of recall_jax.data.transforms and the grain loaders (worker_count=0)."""

import io
import math
import mmap
import threading
import time

import numpy as np
import PIL.Image
import pytest

from recall_jax import data
from recall_jax import errors
from recall_jax.data import pipeline
from recall_jax.data import transforms


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
  """uint8 (H, W, 3): smooth and asymmetric, so crops, flips and resizes are all visible."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                   np.full_like(x, 40 * seed % 256)], -1).astype(np.uint8)


def _source(sizes=(6, 5, 8, 4, 7, 4), fmt="PNG"):
  """An in-memory source: a list of records, class c's images tinted by c."""
  records = []
  for c, n in enumerate(sizes):
    for k in range(n):
      records.append({"image": _encode(_gradient(30 + 3 * k, 22 + k, seed=c), fmt), "label": c,
                      "id": f"{c}-{k}"})
  return records


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  for _ in range(500):
    width, height = int(rng.integers(20, 400)), int(rng.integers(20, 400))
    left, top, right, bottom = transforms.random_resized_crop_box(width, height, rng)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    in_ratio = w / h
    # Either a valid draw or the clamped-ratio center-crop fallback.
    assert 3 / 4 - 0.1 <= in_ratio <= 4 / 3 + 0.1 or (w, h) in ((width, height),)
    assert w * h <= width * height


def test_full_crop_without_flip_is_a_plain_resize():
  image = _gradient(40, 30)
  out = transforms.train_augment(_encode(image), np.random.default_rng(0), image_size=16,
                                 crop_scale=(1.0, 1.0), flip=False)
  reference = np.asarray(PIL.Image.fromarray(image).resize((16, 16), PIL.Image.BILINEAR))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, reference)


def test_flip_is_random_and_optional():
  encoded = _encode(_gradient(40, 30))
  flipped = 0
  for seed in range(20):
    a = transforms.train_augment(encoded, np.random.default_rng(seed), image_size=16,
                                 crop_scale=(1.0, 1.0))
    b = transforms.train_augment(encoded, np.random.default_rng(seed), image_size=16,
                                 crop_scale=(1.0, 1.0), flip=False)
    if not np.array_equal(a, b):
      np.testing.assert_array_equal(a, b[:, ::-1])
      flipped += 1
  assert 3 <= flipped <= 17


def test_jpeg_draft_decode_close_to_full_decode():
  image = np.asarray(PIL.Image.fromarray(_gradient(480, 360)).resize((480, 360)))
  encoded = _encode(image, "JPEG")
  out = transforms.eval_transform(encoded, image_size=56, resize_size=64)
  full = PIL.Image.open(io.BytesIO(encoded)).convert("RGB").resize((85, 64), PIL.Image.BILINEAR)
  reference = np.asarray(full)[4:60, 14:70]
  assert out.shape == (56, 56, 3)
  assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3.0


def test_eval_transform_center_crop_matches_two_step_reference():
  image = _gradient(60, 30)
  out = transforms.eval_transform(_encode(image), image_size=16, resize_size=20)
  reference = np.asarray(
      PIL.Image.fromarray(image).resize((40, 20), PIL.Image.BILINEAR))[2:18, 12:28]
  assert np.abs(out.astype(int) - reference.astype(int)).max() <= 8


def test_one_bit_png_to_grayscale_and_rgb():
  bits = np.zeros((105, 105), bool)
  bits[30:70, 40:65] = True
  buffer = io.BytesIO()
  PIL.Image.fromarray(bits).convert("1").save(buffer, "PNG")
  gray = transforms.eval_transform(buffer.getvalue(), image_size=28, resize_size=28, channels=1)
  rgb = transforms.eval_transform(buffer.getvalue(), image_size=28, resize_size=28, channels=3)
  assert gray.shape == (28, 28, 1) and rgb.shape == (28, 28, 3)
  np.testing.assert_array_equal(rgb, np.repeat(gray, 3, -1))
  assert len(np.unique(gray)) > 2  # Bilinear, not nearest, resampling of the 1-bit image.
  assert gray[14, 14, 0] > 200 and gray[2, 2, 0] == 0


def test_corrupt_image_names_the_record():
  source = _source()
  source[3] = {**source[3], "image": b"garbage"}
  with pytest.raises(ValueError, match=r"record 3 \(id '0-3'\)"):
    list(data.make_eval_loader(source, image_size=8, resize_size=8, batch_size=4))
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    transforms.eval_transform(source[0]["image"], image_size=8, resize_size=8, channels=2)


def test_images_over_max_pixels_are_refused_from_the_header_naming_the_record():
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  big = int(sampler.batch_indices(0)[2])
  source[big] = {**source[big], "image": _encode(_gradient(100, 60))}  # 6,000 pixels.
  others = max(transforms.decode_image(r["image"]).shape[0] * transforms.decode_image(
      r["image"]).shape[1] for k, r in enumerate(source) if k != big)
  limit = 5_000
  assert others <= limit
  message = rf"record {big} \(id .*100 x 60 pixels, more than the limit of 5000"
  with pytest.raises(errors.DataError, match=message):
    next(data.make_train_loader(source, sampler, image_size=12, seed=0, max_pixels=limit))
  with pytest.raises(errors.DataError, match=message):
    list(data.make_eval_loader(source, image_size=10, resize_size=12, batch_size=8,
                               max_pixels=limit))
  # At the limit, the same image is used.
  batch = next(data.make_train_loader(source, sampler, image_size=12, seed=0, max_pixels=6_000))
  assert batch["image"].shape == (8, 12, 12, 3)


def _loader(source, sampler, **kw):
  return data.make_train_loader(source, sampler, image_size=12, seed=3, **kw)


def test_train_loader_follows_sampler_and_is_deterministic():
  source = _source()
  labels = np.array([r["label"] for r in source])
  sampler = data.MPerClassSampler(labels, 8, 2, seed=0)
  batches = [b for _, b in zip(range(5), _loader(source, sampler))]
  again = [b for _, b in zip(range(5), _loader(source, sampler))]
  for step, (batch, other) in enumerate(zip(batches, again)):
    assert batch["image"].shape == (8, 12, 12, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], labels[sampler.batch_indices(step)])
    np.testing.assert_array_equal(batch["image"], other["image"])
  # Same record, same step, different positions/steps: different augmentations.
  assert not np.array_equal(batches[0]["image"][0], batches[0]["image"][1])
  other_seed = next(data.make_train_loader(source, sampler, image_size=12, seed=4))
  assert not np.array_equal(other_seed["image"], batches[0]["image"])


def _reference_batch(source, sampler, step, *, seed=3, image_size=12, process_index=0,
                     process_count=1):
  """The documented batch, image by image: record `batch_indices(step)[p]` augmented with
  `default_rng([seed, step, p])`, for global positions p of the process's slice."""
  indices = sampler.batch_indices(step)
  local = len(indices) // process_count
  positions = range(process_index * local, (process_index + 1) * local)
  images = [transforms.train_augment(source[indices[p]]["image"],
                                     np.random.default_rng([seed, step, p]),
                                     image_size=image_size) for p in positions]
  return np.stack(images), np.array([source[indices[p]]["label"] for p in positions], np.int32)


@pytest.mark.parametrize("worker_count", [0, 2])
def test_train_batches_match_a_per_image_reference_from_the_seeds(worker_count):
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  # Two epochs (steps_per_epoch is 3), resumed mid-epoch, as two processes.
  for process_index in (0, 1):
    loader = _loader(source, sampler, start_step=2, num_steps=3, worker_count=worker_count,
                     process_index=process_index, process_count=2)
    for step, batch in enumerate(loader, start=2):
      images, labels = _reference_batch(source, sampler, step, process_index=process_index,
                                        process_count=2)
      np.testing.assert_array_equal(batch["image"], images)
      np.testing.assert_array_equal(batch["label"], labels)
      assert batch["label"].dtype == np.int32


@pytest.mark.parametrize("batch_size, worker_count", [(72, 0), (40, 2)])
def test_batches_of_several_image_groups_match_the_reference(batch_size, worker_count):
  # 72 images are three groups of 24, 40 are two of 20 (at most 32 images per grain element).
  source = _source(sizes=(5, 6, 4, 7) * 5)
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), batch_size, 4, seed=1)
  loader = _loader(source, sampler, start_step=1, num_steps=2, worker_count=worker_count)
  batches = list(loader)
  assert len(batches) == 2
  for step, batch in enumerate(batches, start=1):
    images, labels = _reference_batch(source, sampler, step)
    np.testing.assert_array_equal(batch["image"], images)
    np.testing.assert_array_equal(batch["label"], labels)


def test_an_image_error_reaches_the_caller_through_the_assembling_thread():
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  bad = int(sampler.batch_indices(1)[5])
  source[bad] = {**source[bad], "image": b"garbage"}
  loader = _loader(source, sampler, prefetch_batches=2)
  next(loader)  # Step 0 is whole; step 1 holds the corrupt record.
  with pytest.raises(errors.DataError, match=rf"record {bad} \(id"):
    next(loader)
  with pytest.raises(StopIteration):
    next(loader)
  loader.close()


def test_train_loader_resume_and_process_slices():
  source = _source()
  labels = np.array([r["label"] for r in source])
  sampler = data.MPerClassSampler(labels, 8, 2, seed=0)
  full = [b for _, b in zip(range(6), _loader(source, sampler))]
  resumed = [b for _, b in zip(range(2), _loader(source, sampler, start_step=4))]
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  for count in (2, 4):
    parts = [next(_loader(source, sampler, start_step=2, process_index=p, process_count=count))
             for p in range(count)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full[2]["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), full[2]["label"])
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    _loader(source, sampler, process_count=3)


def test_train_loader_num_steps_and_grayscale():
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 4, 2, seed=0)
  batches = list(_loader(source, sampler, num_steps=3, channels=1, flip=False))
  assert len(batches) == 3 and batches[0]["image"].shape == (4, 12, 12, 1)


def test_eval_loader_pads_last_batch():
  source = _source()
  n = len(source)
  batches = list(data.make_eval_loader(source, image_size=10, resize_size=12, batch_size=8))
  assert len(batches) == math.ceil(n / 8)
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == n and mask[:n].all()
  np.testing.assert_array_equal(index[:n], np.arange(n))
  assert (index[n:] == -1).all() and (label[n:] == -1).all()
  np.testing.assert_array_equal(label[:n], [r["label"] for r in source])
  assert batches[-1]["image"][n % 8:].max() == 0
  first = transforms.eval_transform(source[9]["image"], image_size=10, resize_size=12)
  np.testing.assert_array_equal(batches[1]["image"][1], first)
  # Re-iterable, identical.
  again = list(data.make_eval_loader(source, image_size=10, resize_size=12, batch_size=8))
  np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])


def test_omniglot_end_to_end(omniglot_root):
  source = data.load_split("omniglot", "test", data_root=omniglot_root)
  sampler = data.MPerClassSampler(source.labels, 16, 4, seed=0)
  batch = next(data.make_train_loader(source, sampler, image_size=28, seed=0, channels=1,
                                      flip=False))
  assert batch["image"].shape == (16, 28, 28, 1)
  np.testing.assert_array_equal(batch["label"], source.labels[sampler.batch_indices(0)])
  # Omniglot strokes are dark on white.
  assert batch["image"].max() == 255 and batch["image"].min() < 64


class _CountingSource(list):
  """A list source that counts the records read, to see batches being built ahead."""

  def __init__(self, records):
    super().__init__(records)
    self.reads = 0
    self._lock = threading.Lock()

  def __getitem__(self, index):
    with self._lock:
      self.reads += 1
    return super().__getitem__(index)


def _wait_for(condition, timeout_s=20.0):
  deadline = time.monotonic() + timeout_s
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


def _prefetch_threads():
  return [t for t in threading.enumerate()
          if t.name == "batch-assembly" and t.is_alive()]


@pytest.mark.parametrize("read_threads, prefetch_batches", [(0, 2), (2, 0), (2, 2), (1, 1)])
def test_read_ahead_keeps_the_batches(read_threads, prefetch_batches):
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  serial = list(_loader(source, sampler, num_steps=4, read_threads=0, prefetch_batches=0))
  ahead = list(_loader(source, sampler, num_steps=4, read_threads=read_threads,
                       prefetch_batches=prefetch_batches))
  assert len(ahead) == 4
  for a, b in zip(serial, ahead):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_batches_are_built_in_the_background_while_the_caller_works():
  source = _CountingSource(_source())
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  loader = _loader(source, sampler, read_threads=0, prefetch_batches=2)
  next(loader)
  # Nobody asks for batch 2 or 3, yet their records are read: 1 returned + 2 queued (+ 1 held).
  assert _wait_for(lambda: source.reads >= 3 * 8)
  assert _prefetch_threads()
  loader.close()
  assert _wait_for(lambda: not _prefetch_threads())
  # Dropping an unbounded loader without closing it also stops its thread.
  dropped = _loader(source, sampler, read_threads=0, prefetch_batches=2)
  next(dropped)
  assert _prefetch_threads()
  del dropped
  assert _wait_for(lambda: not _prefetch_threads())
  # Without read-ahead, nothing is read beyond the batch asked for.
  source.reads = 0
  serial = _loader(source, sampler, read_threads=0, prefetch_batches=0)
  next(serial)
  time.sleep(0.3)
  assert source.reads == 8
  serial.close()


def test_negative_prefetch_is_refused():
  source = _source()
  sampler = data.MPerClassSampler(np.array([r["label"] for r in source]), 8, 2, seed=0)
  with pytest.raises(errors.ConfigError, match="must be non-negative"):
    _loader(source, sampler, prefetch_batches=-1)


@pytest.mark.parametrize("shape,dtype", [((3, 4), np.int32), ((64, 224, 224, 3), np.uint8)])
def test_fresh_zeros_are_writable_zeros_of_the_shape_and_dtype(shape, dtype):
  array = pipeline.fresh_zeros(shape, dtype)
  assert array.shape == shape and array.dtype == dtype and array.flags.writeable
  assert not array.any()
  array[-1] = 7
  assert int(array.reshape(-1)[-1]) == 7
  large = array.nbytes >= 2 << 20
  # Large arrays live in their own anonymous mapping (huge pages asked for), small ones not.
  root = array
  while isinstance(root, np.ndarray) and root.base is not None:
    root = root.base
  root = root.obj if isinstance(root, memoryview) else root
  assert isinstance(root, mmap.mmap) == (large and hasattr(mmap, "MADV_HUGEPAGE"))


def test_stacked_groups_equal_numpy_stack():
  images = [{"image": np.full((224, 224, 3), i, np.uint8), "label": np.int32(i)}
            for i in range(40)]
  stacked = pipeline.stack_images(images)
  np.testing.assert_array_equal(stacked["image"], np.stack([x["image"] for x in images]))
  np.testing.assert_array_equal(stacked["label"], np.arange(40, dtype=np.int32))
