"""Tests for recall_jax.data.aspect_buckets: resizing, bucket choice, padding, chunking."""

import io

import numpy as np
import PIL.Image
import pytest

from recall_jax import errors
from recall_jax.data import aspect_buckets as ab


def test_bucket_shapes_are_multiples_and_hold_every_resized_image():
  shapes = ab.bucket_shapes(1024, num_buckets=4)
  assert shapes == ((256, 1024), (1024, 256), (512, 1024), (1024, 512), (768, 1024), (1024, 768),
                    (1024, 1024))
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(1, 5000, size=2)
    size = ab.resized_shape(h, w, 1024)
    bucket = shapes[ab.assign_bucket(*size, shapes)]
    assert size[0] <= bucket[0] and size[1] <= bucket[1]
    # No smaller bucket would do.
    assert all(s[0] * s[1] >= bucket[0] * bucket[1] for s in shapes
               if size[0] <= s[0] and size[1] <= s[1])
  assert ab.bucket_shapes(100, num_buckets=2) == ((64, 128), (128, 64), (128, 128))
  with pytest.raises(errors.ConfigError):
    ab.bucket_shapes(0)


@pytest.mark.parametrize("hw,want", [((3000, 4000), (768, 1024)), ((4000, 3000), (1024, 768)),
                                     ((100, 50), (1024, 512)), ((1024, 1), (1024, 1))])
def test_resized_shape_keeps_aspect_ratio_and_longer_side(hw, want):
  assert ab.resized_shape(*hw, 1024) == want


@pytest.mark.parametrize("hw,want", [((3000, 4000), (768, 1024)), ((300, 200), (300, 200)),
                                     ((1024, 700), (1024, 700)), ((1025, 10), (1024, 10))])
def test_without_upscaling_only_larger_images_shrink(hw, want):
  # PIL's thumbnail, which the revisited benchmarks' reference code uses, never enlarges.
  assert ab.resized_shape(*hw, 1024, upscale=False) == want
  image = np.random.default_rng(0).integers(0, 256, (*hw, 3), np.uint8)
  if max(hw) <= 1024:
    np.testing.assert_array_equal(ab.resize_longer_side(image, 1024, upscale=False), image)


def test_bucket_image_from_array_and_bytes():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(90, 60, 3), dtype=np.uint8)
  shapes = ab.bucket_shapes(64, num_buckets=2)
  out = ab.bucket_image(image, 64, shapes)
  assert out.size == (64, 43) and shapes[out.bucket] == (64, 64)
  assert out.image.shape == (64, 64, 3) and out.mask.shape == (64, 64)
  assert out.mask[:64, :43].all() and out.mask.sum() == 64 * 43
  np.testing.assert_array_equal(out.image[:, 43:], 0)
  want = np.asarray(PIL.Image.fromarray(image).resize((43, 64), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out.image[:, :43], want)
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  from_bytes = ab.bucket_image(buffer.getvalue(), 64, shapes)
  np.testing.assert_array_equal(from_bytes.image, out.image)
  grey = ab.bucket_image(buffer.getvalue(), 64, shapes, channels=1)
  assert grey.image.shape == (64, 64, 1)


def test_bad_images_raise_data_errors():
  shapes = ab.bucket_shapes(64)
  with pytest.raises(errors.DataError, match="cannot decode"):
    ab.bucket_image(b"not an image", 64, shapes)
  with pytest.raises(errors.DataError, match="uint8"):
    ab.resize_longer_side(np.zeros((4, 4, 3), np.float32), 64)
  with pytest.raises(errors.DataError, match="fits none"):
    ab.assign_bucket(65, 10, shapes)
  with pytest.raises(errors.DataError, match="does not fit"):
    ab.pad_to_bucket(np.zeros((65, 10, 3), np.uint8), (64, 64))
  with pytest.raises(errors.ConfigError):
    ab.resize_longer_side(np.zeros((4, 4, 3), np.uint8), 64, channels=2)
