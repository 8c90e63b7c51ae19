"""Full-resolution images of any aspect ratio as a few fixed shapes: aspect buckets.

Serves instance-level retrieval (landmarks).

An image is resized so that its longer side is `image_size` (1024 px for landmark retrieval),
keeping its aspect ratio, and padded at the bottom and right to the smallest of a few fixed
bucket shapes that holds it, with a (H, W) validity mask. For evaluation (`upscale=False`) an
image whose longer side is already at most `image_size` keeps its size, as the revisited
benchmarks' reference code (PIL `thumbnail`) only ever downscales. A model compiles once per
bucket; the ResNet trunk zeroes the padding after input normalisation (so it is zero in
normalised space whatever the stored pixels, which are 0 here) and GeM pools the real cells only.

A training mega-batch holds each bucket's images in an array of fixed capacity
(`bucket_plan`), so every chunk of the two-pass step has one fixed shape.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image

from recall_jax import errors

_MODES = {1: "L", 3: "RGB"}


@dataclasses.dataclass(frozen=True)
class BucketedImage:
  """An image resized and padded to a bucket.

  Attributes:
    image: uint8 (H_b, W_b, C); the real image is the top-left `size`, the rest is 0.
    mask: bool (H_b, W_b), True on the real image.
    bucket: index into the bucket shapes.
    size: (h, w) of the real image.
  """

  image: np.ndarray
  mask: np.ndarray
  bucket: int
  size: tuple[int, int]


def _round_up(n: float, multiple: int) -> int:
  return int(math.ceil(n / multiple)) * multiple


def bucket_shapes(image_size: int, *, num_buckets: int = 4,
                  multiple: int = 32) -> tuple[tuple[int, int], ...]:
  """The bucket shapes (H, W) for images whose longer side is `image_size`.

  Landscape buckets are (short, S) and portrait ones (S, short), with S = `image_size` and the
  short side at k / num_buckets of S (k = 1 .. num_buckets), all rounded up to `multiple`.

  Args:
    image_size: the longer side of every resized image, in pixels.
    num_buckets: short-side steps per orientation (2 num_buckets - 1 shapes, the square once).
    multiple: every side is a multiple of this (32: whole cells of a ResNet feature map).

  Returns:
    Shapes sorted by area, then height.

  Raises:
    ConfigError: a non-positive argument.
  """
  if image_size < 1 or num_buckets < 1 or multiple < 1:
    raise errors.ConfigError(f"image_size, num_buckets and multiple must be positive, got "
                             f"{image_size}, {num_buckets}, {multiple}")
  side = _round_up(image_size, multiple)
  shapes = set()
  for k in range(1, num_buckets + 1):
    short = min(side, _round_up(image_size * k / num_buckets, multiple))
    shapes.update({(short, side), (side, short)})
  return tuple(sorted(shapes, key=lambda s: (s[0] * s[1], s[0])))


def resized_shape(height: int, width: int, image_size: int, *,
                  upscale: bool = True) -> tuple[int, int]:
  """(h, w) with max(h, w) = image_size and the aspect ratio kept.

  With `upscale=False` an image whose longer side is at most `image_size` keeps its size (only
  downscaling, as PIL's `thumbnail` and the revisited benchmarks' reference code do).
  """
  if min(height, width) < 1:
    raise errors.DataError(f"image has no pixels: {height} x {width}")
  if not upscale and max(height, width) <= image_size:
    return height, width
  scale = image_size / max(height, width)
  return (max(1, min(image_size, round(height * scale))),
          max(1, min(image_size, round(width * scale))))


def resize_longer_side(image: np.ndarray | bytes, image_size: int, *, channels: int = 3,
                       upscale: bool = True) -> np.ndarray:
  """Decodes (if bytes) and resizes an image so that its longer side is `image_size`.

  Args:
    image: encoded bytes (any format PIL reads), or uint8 (H, W) / (H, W, C) pixels.
    image_size: target longer side, in pixels.
    channels: 1 (grey) or 3 (RGB) output channels.
    upscale: False: an image no larger than `image_size` keeps its pixels (`resized_shape`).

  Returns:
    uint8 (h, w, channels), (h, w) = `resized_shape(H, W, image_size, upscale=upscale)`;
    bilinear, antialiased when shrinking; unresampled when the size is kept.

  Raises:
    DataError: undecodable bytes or a bad array.
    ConfigError: channels not 1 or 3.
  """
  if channels not in _MODES:
    raise errors.ConfigError(f"channels must be 1 or 3, got {channels}")
  try:
    if isinstance(image, (bytes, bytearray)):
      pil = PIL.Image.open(io.BytesIO(image))
      target = resized_shape(pil.height, pil.width, image_size, upscale=upscale)
      pil.draft(_MODES[channels], (target[1], target[0]))  # JPEG: decode at 1/2-1/8 if large.
    else:
      array = np.asarray(image)
      if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise errors.DataError(f"image must be uint8 (H, W) or (H, W, C), got {array.dtype} "
                               f"{array.shape}")
      pil = PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1
                                else array)
      target = resized_shape(pil.height, pil.width, image_size, upscale=upscale)
    pil = pil.convert(_MODES[channels])
    if pil.size != (target[1], target[0]):
      pil = pil.resize((target[1], target[0]), PIL.Image.BILINEAR)
  except errors.DataError:
    raise
  except Exception as e:  # PIL.UnidentifiedImageError, OSError, ...
    raise errors.DataError(f"cannot decode image: {type(e).__name__}: {e}") from e
  out = np.asarray(pil, np.uint8)
  return out[..., None] if channels == 1 else out


def assign_bucket(height: int, width: int, shapes: Sequence[tuple[int, int]]) -> int:
  """Index of the smallest-area shape holding an (height, width) image.

  Raises:
    DataError: no shape holds it.
  """
  fits = [i for i, (h, w) in enumerate(shapes) if height <= h and width <= w]
  if not fits:
    raise errors.DataError(f"an image of {height} x {width} fits none of the buckets {shapes}")
  return min(fits, key=lambda i: (shapes[i][0] * shapes[i][1], i))


def pad_to_bucket(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Pads (h, w, C) at the bottom and right with 0 to `shape`; returns (padded, mask).

  Raises:
    DataError: the image is larger than `shape`.
  """
  h, w = image.shape[:2]
  if h > shape[0] or w > shape[1]:
    raise errors.DataError(f"an image of {h} x {w} does not fit the bucket {shape}")
  padded = np.zeros(tuple(shape) + image.shape[2:], image.dtype)
  padded[:h, :w] = image
  mask = np.zeros(shape, bool)
  mask[:h, :w] = True
  return padded, mask


def bucket_image(image: np.ndarray | bytes, image_size: int,
                 shapes: Sequence[tuple[int, int]], *, channels: int = 3,
                 upscale: bool = True) -> BucketedImage:
  """`resize_longer_side`, then `pad_to_bucket` into the bucket from `assign_bucket`."""
  resized = resize_longer_side(image, image_size, channels=channels, upscale=upscale)
  size = resized.shape[:2]
  bucket = assign_bucket(*size, shapes)
  padded, mask = pad_to_bucket(resized, shapes[bucket])
  return BucketedImage(padded, mask, bucket, (int(size[0]), int(size[1])))
