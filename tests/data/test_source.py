"""Tests of recall_jax.data.source: the decoded-image transform records carry, applied by both
loaders, stacked by nested wrappers."""

import io

import numpy as np
import PIL.Image

from recall_jax import data
from recall_jax.data import source as source_lib
from recall_jax.data import transforms


class _AddOne:
  """A transform whose effect and order are visible: adds 1, wrapping at 256."""

  def __call__(self, image):
    return (image.astype(np.int64) + 1).astype(np.uint8)


class _Invert:
  def __call__(self, image):
    return 255 - image


def _png(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _records(num_classes=3, per_class=4, size=10):
  rng = np.random.default_rng(1)
  return [{"image": _png(rng.integers(0, 255, (size, size + 2), np.uint8)), "label": c,
           "id": f"{c}-{k}"}
          for c in range(num_classes) for k in range(per_class)]


class _ListSource:
  def __init__(self, records):
    self.records, self.labels = records, np.array([r["label"] for r in records])

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def test_transforms_compose_in_wrapping_order():
  image = np.arange(12, dtype=np.uint8).reshape(2, 3, 2)
  record = {"image": b"", "label": 0}
  assert source_lib.apply_decoded_transform(record, image) is image
  once = source_lib.with_decoded_transform(record, _AddOne())
  twice = source_lib.with_decoded_transform(once, _Invert())
  assert source_lib.DECODED_TRANSFORM not in record  # The input record is left alone.
  np.testing.assert_array_equal(source_lib.apply_decoded_transform(twice, image), 255 - (image + 1))
  np.testing.assert_array_equal(
      source_lib.apply_decoded_transform(source_lib.with_decoded_transform(
          source_lib.with_decoded_transform(record, _Invert()), _AddOne()), image),
      (255 - image) + 1)


def test_eval_loader_applies_the_records_transform():
  base = _ListSource(_records())
  rotated = data.RotatedClasses(base, 2)
  n = len(base)
  batch = next(iter(data.make_eval_loader(rotated, image_size=8, resize_size=8, batch_size=2 * n,
                                          channels=1)))
  for i in range(n):
    plain = transforms.eval_transform(base.records[i]["image"], image_size=8, resize_size=8,
                                      channels=1)
    np.testing.assert_array_equal(batch["image"][i], plain)
    np.testing.assert_array_equal(batch["image"][n + i], np.rot90(plain, 1, axes=(0, 1)))


def test_nested_wrappers_stack_their_turns():
  base = _ListSource(_records())
  n = len(base)
  nested = data.RotatedClasses(data.RotatedClasses(base, 2), 2)
  sampler = data.MPerClassSampler(nested.labels, 8, 2, seed=0)
  batch = next(data.make_train_loader(nested, sampler, image_size=8, seed=5, channels=1,
                                      crop_scale=(0.5, 1.0)))
  for k, index in enumerate(sampler.batch_indices(0)):
    outer, inner_index = divmod(int(index), 2 * n)
    inner, base_index = divmod(inner_index, n)
    augmented = transforms.train_augment(base.records[base_index]["image"],
                                         np.random.default_rng([5, 0, k]), image_size=8, channels=1,
                                         crop_scale=(0.5, 1.0))
    np.testing.assert_array_equal(batch["image"][k],
                                  np.rot90(augmented, inner + outer, axes=(0, 1)))
