"""Whole-image loaders: longer side kept, padded into buckets, the mask as the last channel."""

import io

import numpy as np
import PIL.Image
import pytest

from recall_jax import data
from recall_jax.data import aspect_buckets
from recall_jax.errors import ConfigError

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


def test_eval_batches_hold_whole_images_in_their_bucket():
  source = _Source()
  batches = list(data.make_bucketed_eval_loader(source, image_size=64, batch_size=3,
                                                num_buckets=2, read_threads=0,
                                                prefetch_batches=0))
  shapes = aspect_buckets.bucket_shapes(64, num_buckets=2)
  assert len(batches) == 3
  for number, batch in enumerate(batches):
    indices = batch["index"][batch["mask"]]
    np.testing.assert_array_equal(indices, np.arange(3 * number, min(3 * number + 3, 8)))
    assert tuple(batch["image"].shape[1:3]) in shapes
    pixels, masks = data.split_mask_channel(batch["image"])
    for k, index in enumerate(indices):
      expected = aspect_buckets.resize_longer_side(source[index]["image"], 64)
      h, w = expected.shape[:2]
      assert max(h, w) == 64
      np.testing.assert_array_equal(pixels[k, :h, :w], expected)
      assert masks[k, :h, :w].all() and masks[k].sum() == h * w
      assert not pixels[k][~masks[k]].any()
    # The batch's bucket is the smallest holding all of its images.
    sizes = [aspect_buckets.resized_shape(*SHAPES[i], 64) for i in indices]
    need = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert tuple(batch["image"].shape[1:3]) == shapes[aspect_buckets.assign_bucket(*need, shapes)]
  assert not batches[-1]["mask"][2] and batches[-1]["index"][2] == -1


def test_train_batches_are_square_padded_deterministic_and_flipped_by_seed():
  source = _Source()
  sampler = data.MPerClassSampler(source.labels, 4, 2, seed=0)

  def first(seed):
    loader = data.make_padded_train_loader(source, sampler, image_size=48, seed=seed,
                                           num_steps=1, read_threads=0, prefetch_batches=0)
    return next(loader)

  batch = first(1)
  assert batch["image"].shape == (4, 48, 48, 4)
  np.testing.assert_array_equal(batch["image"], first(1)["image"])
  indices = sampler.batch_indices(0)
  np.testing.assert_array_equal(batch["label"], source.labels[indices])
  pixels, masks = data.split_mask_channel(batch["image"])
  for k, index in enumerate(indices):
    expected = aspect_buckets.resize_longer_side(source[index]["image"], 48)
    h, w = expected.shape[:2]
    real = pixels[k, :h, :w]
    assert masks[k].sum() == h * w and masks[k, :h, :w].all()
    if not np.array_equal(real, expected):
      np.testing.assert_array_equal(real, expected[:, ::-1])
  unflipped = data.make_padded_train_loader(source, sampler, image_size=48, seed=1, flip=False,
                                            num_steps=1, read_threads=0, prefetch_batches=0)
  pixels, _ = data.split_mask_channel(next(unflipped)["image"])
  for k, index in enumerate(indices):
    expected = aspect_buckets.resize_longer_side(source[index]["image"], 48)
    np.testing.assert_array_equal(pixels[k, :expected.shape[0], :expected.shape[1]], expected)


def test_bad_arguments():
  with pytest.raises(ConfigError):
    data.make_bucketed_eval_loader(_Source(), image_size=64, batch_size=0)
  sampler = data.MPerClassSampler(_Source().labels, 4, 2, seed=0)
  with pytest.raises(ConfigError):
    data.make_padded_train_loader(_Source(), sampler, image_size=48, seed=-1)
