"""Image decoding and augmentation with PIL: RandomResizedCrop + flip (train), resize + center crop (test).

All functions take encoded bytes and return uint8 (H, W, C) arrays; normalisation happens on the
device. JPEGs are decoded with PIL's DCT-domain downscaling (`draft`) by at most the factor that
keeps the region of interest at least as large as the output, so a 224 px crop of a large photo
does not pay for a full-resolution decode; the bilinear (antialiased) resize then does the rest.
"""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image

_MODES = {1: "L", 3: "RGB"}


def _open(data: bytes, record: str) -> PIL.Image.Image:
  try:
    return PIL.Image.open(io.BytesIO(data))
  except Exception as e:
    raise ValueError(f"Cannot decode image of record {record}: {type(e).__name__}: {e}") from e


def _check_channels(channels: int) -> str:
  if channels not in _MODES:
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  return _MODES[channels]


def _resize(image: PIL.Image.Image, channels: int, box: tuple[float, float, float, float],
            size: int, record: str) -> PIL.Image.Image:
  """Decodes (in L / RGB, so 1-bit and palette images are resampled bilinearly too) and resizes."""
  try:
    box = _draft(image, channels, box, (size, size))
    if image.mode != _MODES[channels]:
      image = image.convert(_MODES[channels])
    return image.resize((size, size), PIL.Image.BILINEAR, box=box)
  except Exception as e:
    raise ValueError(f"Cannot decode image of record {record}: {type(e).__name__}: {e}") from e


def _to_array(image: PIL.Image.Image, channels: int) -> np.ndarray:
  """uint8 (H, W, channels)."""
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def _draft(image: PIL.Image.Image, channels: int, box: tuple[float, float, float, float],
           out_size: tuple[int, int]) -> tuple[float, float, float, float]:
  """Lets a JPEG decode at 1/2, 1/4 or 1/8 scale when `box` still covers `out_size` pixels.

  Returns `box` in the coordinates of the (possibly smaller) decoded image.
  """
  if image.format != "JPEG":
    return box
  width, height = image.size
  bw, bh = box[2] - box[0], box[3] - box[1]
  # The smallest full-image size at which the box is still >= the output size.
  need = (math.ceil(width * out_size[0] / bw), math.ceil(height * out_size[1] / bh))
  image.draft(_MODES[channels], need)
  sx, sy = image.size[0] / width, image.size[1] / height
  return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box `(left, top, right, bottom)` in pixels.

  Tries 10 times to draw an area fraction uniform in `scale` and a log-uniform aspect ratio in
  `ratio` that fits; else falls back to the largest center crop with the ratio clamped to `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def train_augment(data: bytes, rng: np.random.Generator, *, image_size: int, channels: int = 3,
                  crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                  record: str = "?") -> np.ndarray:
  """Decode -> RandomResizedCrop (bilinear) -> random horizontal flip.

  Args:
    data: encoded image bytes (JPEG, PNG, ...).
    rng: the record's generator; the output is a pure function of (data, rng state).
    image_size: output side in pixels.
    channels: 1 (grayscale) or 3 (RGB).
    crop_scale: range of the crop's area as a fraction of the image.
    flip: flip left-right with probability 1/2.
    record: names the record in error messages.

  Returns:
    uint8 (image_size, image_size, channels).
  """
  _check_channels(channels)
  image = _open(data, record)
  box = random_resized_crop_box(*image.size, rng, scale=crop_scale)
  do_flip = flip and rng.random() < 0.5
  image = _resize(image, channels, box, image_size, record)
  if do_flip:
    image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
  return _to_array(image, channels)


def eval_transform(data: bytes, *, image_size: int, resize_size: int, channels: int = 3,
                   record: str = "?") -> np.ndarray:
  """Decode -> resize the shorter side to `resize_size` (bilinear) -> center crop `image_size`.

  The resize and crop are done as one resampling of the matching box of the original image.

  Returns:
    uint8 (image_size, image_size, channels).
  """
  _check_channels(channels)
  if image_size > resize_size:
    raise ValueError(f"image_size {image_size} exceeds resize_size {resize_size}")
  image = _open(data, record)
  width, height = image.size
  scale = resize_size / min(width, height)
  left = (width * scale - image_size) / 2 / scale
  top = (height * scale - image_size) / 2 / scale
  box = (left, top, left + image_size / scale, top + image_size / scale)
  return _to_array(_resize(image, channels, box, image_size, record), channels)
