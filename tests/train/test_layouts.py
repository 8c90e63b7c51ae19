"""Input layouts (recall_jax.train.layouts): square crops and whole images in aspect buckets.

Serves both tasks. The trainer's use of each layout is tested end to end in test_trainer.py
(square crops) and test_landmarks.py (aspect buckets).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax.train import batch_assembly
from recall_jax.train import cold_start
from recall_jax.train import components
from recall_jax.train import layouts


def _normalise(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _recording(table: np.ndarray):
  """An embedding function reading each image's row number from pixel (0, 0), recording the
  chunk sizes it is called with."""
  sizes = []

  def embed(images):
    sizes.append(len(images))
    return table[np.asarray(images)[:, 0, 0, 0]]

  return embed, sizes


def test_make_layout_picks_the_layout_from_the_config():
  c = config_lib.base_config()
  layout = layouts.make_layout(c, None, None)  # square crops need neither source nor sampler
  assert type(layout) is layouts.SquareCrops and layout.bucket_plan is None
  assert not layout.masked
  plan = data.BucketPlan(((32, 64), (64, 64)), (8, 8), 8)
  buckets = layouts.AspectBuckets(c, plan)
  assert buckets.masked and buckets.bucket_plan is plan


def test_square_crops_embed_a_batch_in_row_order_and_in_chunks():
  rng = np.random.default_rng(0)
  table = _normalise(rng.normal(size=(20, 4)))
  embed, sizes = _recording(table)
  images = np.zeros((20, 3, 3, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(20)
  got = layouts.SquareCrops(config_lib.base_config()).embed_rows(embed, images, chunk_size=8)
  np.testing.assert_array_equal(np.asarray(got), table)
  assert sizes == [8, 8, 4]


def _bucketed_batch(rng, labels, table_rows: int):
  """Rows held in two bucket arrays at shuffled slots, with empty slots (row number `table_rows`
  - 1)."""
  b = len(labels)
  bucket = (np.arange(b) % 3 == 0).astype(np.int32)
  capacities = (int(np.sum(bucket == 0)) + 4, int(np.sum(bucket == 1)) + 2)
  buckets = [np.full((cap, h, w, 2), table_rows - 1, np.uint8)
             for cap, (h, w) in zip(capacities, ((4, 8), (8, 8)))]
  position = np.zeros(b, np.int32)
  for k in (0, 1):
    rows = np.flatnonzero(bucket == k)
    position[rows] = rng.permutation(capacities[k])[:len(rows)]
    buckets[k][position[rows], 0, 0, 0] = rows
  return data.BucketedImages(tuple(buckets), bucket, position), bucket, position


def test_aspect_buckets_embed_a_batch_in_row_order():
  """The cold-start check sees a bucketed batch's rows in row order, not slot order."""
  labels = np.repeat(np.arange(16), 4)
  b = len(labels)
  rng = np.random.default_rng(11)
  centres = _normalise(rng.normal(size=(16, 16)))
  table = _normalise(np.concatenate([centres[labels] + 0.3 * rng.normal(size=(b, 16)),
                                     rng.normal(size=(1, 16))]))  # last row: empty slots
  images, bucket, position = _bucketed_batch(rng, labels, len(table))
  layout = layouts.AspectBuckets(config_lib.base_config())
  embed, sizes = _recording(table)
  np.testing.assert_array_equal(np.asarray(layout.embed_rows(embed, images, chunk_size=16)),
                                table[:b])
  assert max(sizes) <= 16

  # Through the cold-start monitor: the same diagnosis as the rows given in order; the rows in
  # slot order give another one.
  def monitor(embed_batch):
    return cold_start.ColdStartMonitor(lambda params: embed_batch, k_values=(1, 2, 4, 8, 16),
                                       steps=(0,), say=lambda _: None, max_positives=3)
  got = monitor(lambda im: layout.embed_rows(_recording(table)[0], im, 16))(
      0, None, images, labels)
  want = monitor(lambda rows: table[rows])(0, None, np.arange(b), labels)
  assert got == pytest.approx(want)
  slot_order = np.argsort(bucket * 1000 + position, kind="stable")
  assert monitor(lambda rows: table[rows])(0, None, slot_order, labels) != pytest.approx(want)


class _MaskedMean(nn.Module):
  """Sums the valid pixels of each image times a weight: (B, 1); the mask keyword is optional."""

  @nn.compact
  def __call__(self, images, train: bool = False, mask=None):
    del train
    w = self.param("w", nn.initializers.ones, (1,))
    x = images.astype(jnp.float32)[..., 0]
    if mask is not None:
      x = x * mask
    return jnp.sum(x, axis=(1, 2))[:, None] * w


def test_layouts_feed_the_model_pixels_and_mask():
  c = config_lib.base_config()
  model = _MaskedMean()
  params = {"w": jnp.ones((1,))}
  pixels = np.full((2, 3, 4, 1), 2, np.uint8)
  mask = np.zeros((2, 3, 4), bool)
  mask[0, :, :2] = True  # image 0: 6 valid pixels; image 1: none
  # The mask channel holds 255 for valid pixels (`data.split_mask_channel`).
  with_mask = np.concatenate([pixels, 255 * mask[..., None].astype(np.uint8)], axis=-1)
  square = layouts.SquareCrops(c).train_embed_fn(model, {})(params, pixels, None)
  np.testing.assert_array_equal(np.asarray(square), [[24.0], [24.0]])
  bucketed = layouts.AspectBuckets(c).train_embed_fn(model, {})(params, with_mask, None)
  np.testing.assert_array_equal(np.asarray(bucketed), [[12.0], [0.0]])
  inference = components.make_embed_fn(model, {}, masked=True)(params)(with_mask)
  np.testing.assert_array_equal(np.asarray(inference), np.asarray(bucketed))
  got_pixels, extra = components.model_inputs(jnp.asarray(with_mask), masked=True)
  np.testing.assert_array_equal(np.asarray(got_pixels), pixels)
  np.testing.assert_array_equal(np.asarray(extra["mask"]), mask)


def test_each_layout_assembles_its_own_global_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  c = config_lib.base_config()
  labels = np.arange(4, dtype=np.int32)
  square = layouts.SquareCrops(c).global_batch(
      {"image": np.zeros((4, 3, 3, 1), np.uint8), "label": labels}, mesh)
  np.testing.assert_array_equal(np.asarray(square["label"]), labels)
  images = data.BucketedImages((np.zeros((2, 3, 4, 2), np.uint8), np.zeros((2, 4, 4, 2),
                                                                            np.uint8)),
                               np.array([0, 1, 1, 0], np.int32), np.array([0, 0, 1, 1], np.int32))
  bucketed = layouts.AspectBuckets(c).global_batch({"image": images, "label": labels}, mesh)
  want = batch_assembly.global_bucketed_batch({"image": images, "label": labels}, mesh)
  np.testing.assert_array_equal(np.asarray(bucketed["image"].slots),
                                np.asarray(want["image"].slots))
  np.testing.assert_array_equal(np.asarray(bucketed["image"].slots), [0, 2, 3, 1])
