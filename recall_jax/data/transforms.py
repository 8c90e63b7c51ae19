"""Image decoding and augmentation with PIL: RandomResizedCrop + flip (train), resize + center crop
(test). Serves both tasks (square crops; the landmark task's evaluation transform of a gallery).

All functions take encoded bytes (or an image `decode_image` already decoded) and return uint8
(H, W, C) arrays; normalisation happens on the device. Images are used upright: the EXIF
orientation tag (phone photos) is applied in every path (`PIL.ImageOps.exif_transpose`), and crop
boxes are in the upright image's coordinates. An image with more than `max_pixels` pixels
(`data.max_image_pixels`) is refused from its header, before anything is decoded. JPEGs are
decoded with PIL's DCT-domain downscaling (`draft`) by at most the factor that keeps the region of
interest at least as large as the output, so a 224 px crop of a large photo does not pay for a
full-resolution decode; the bilinear (antialiased) resize then does the rest.

Every mode PIL opens becomes the configured channels (1: "L", 3: "RGB") as uint8, with these rules:

- 16-bit and 32-bit integer grey ("I;16", "I;16B", "I;16L", "I"): the value, clipped to
  0..65535, shifted right by 8 (the high byte), so 65535 -> 255 and 256 -> 1.
- 32-bit float grey ("F"): the range 0..1 mapped to 0..255 (rounded; NaN -> 0, clipped).
- Transparency ("RGBA", "LA", "PA", "RGBa", palette or grey/RGB images with a transparent
  colour): composited on white, `round((c * a + 255 * (255 - a)) / 255)`, so fully transparent
  pixels are white.
- CMYK, YCbCr and the other colour modes: PIL's conversion to RGB (CMYK:
  `round((255 - c) * (255 - k) / 255)`).
- Colour to one channel: PIL's ITU-R 601-2 luma; grey to three channels: the grey value repeated.
"""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image
import PIL.ImageOps

from recall_jax.errors import ConfigError, DataError

_MODES = {1: "L", 3: "RGB"}
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
# Default `max_pixels`: a 48-megapixel phone photo decodes, a pixel bomb does not (~256 MB as RGBA).
DEFAULT_MAX_PIXELS = 64_000_000
_EXIF_ORIENTATION = 0x0112
# EXIF orientations whose upright image is the stored one transposed (width and height swapped).
_SWAPS_AXES = (5, 6, 7, 8)


def _open(data: bytes | np.ndarray, record: str,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
  """Opens (reads the header, decodes nothing) and refuses images over `max_pixels` pixels."""
  if isinstance(data, np.ndarray):  # Already decoded (`decode_image`): uint8 (H, W, 1 or 3).
    return PIL.Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
  try:
    image = PIL.Image.open(io.BytesIO(data))
  except Exception as e:
    raise DataError(f"Cannot decode image of record {record}: {type(e).__name__}: {e}") from e
  if image.size[0] * image.size[1] > max_pixels:
    raise DataError(f"Image of record {record} has {image.size[0]} x {image.size[1]} pixels, "
                    f"more than the limit of {max_pixels} (data.max_image_pixels)")
  return image


def _orientation(image: PIL.Image.Image) -> int:
  """The EXIF orientation (1..8; 1 = stored upright), 1 when absent or unreadable."""
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except
    return 1  # A damaged EXIF block does not make the pixels unusable.
  return orientation if orientation in range(1, 9) else 1


def upright_size(image: PIL.Image.Image) -> tuple[int, int]:
  """(width, height) of `image` once its EXIF orientation is applied."""
  width, height = image.size
  return (height, width) if _orientation(image) in _SWAPS_AXES else (width, height)


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
  return PIL.ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def _on_white(pixels: np.ndarray) -> np.ndarray:
  """uint8 (H, W, C + 1) colour + alpha -> uint8 (H, W, C) composited on white, rounded."""
  colour, alpha = pixels[..., :-1].astype(np.uint32), pixels[..., -1:].astype(np.uint32)
  # round(x / 255) as (x + 127) // 255: x / 255 is never exactly k + 1/2 (255 is odd).
  return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _convert(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
  """`image` in mode "L" (channels 1) or "RGB" (3), by the rules in the module docstring."""
  target = _MODES[channels]
  mode = image.mode
  if mode in _HIGH_DEPTH:
    high = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
    image = PIL.Image.fromarray(high.astype(np.uint8), "L")
  elif mode == "F":
    unit = np.clip(np.nan_to_num(np.asarray(image, np.float64), nan=0.0), 0.0, 1.0)
    image = PIL.Image.fromarray(np.rint(unit * 255).astype(np.uint8), "L")
  elif mode in _WITH_ALPHA or "transparency" in image.info:
    if mode in ("LA", "La") or (mode in ("L", "1") and "transparency" in image.info):
      image = PIL.Image.fromarray(_on_white(np.asarray(image.convert("LA")))[..., 0], "L")
    else:
      image = PIL.Image.fromarray(_on_white(np.asarray(image.convert("RGBA"))), "RGB")
  elif mode not in ("1", "L", "P", "RGB"):  # CMYK, YCbCr, LAB, HSV, RGBX, ...
    image = image.convert("RGB")
  return image if image.mode == target else image.convert(target)


def decode_image(data: bytes, channels: int = 3, *, record: str = "?",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image at full resolution, upright, to the configured channels.

  Args:
    data: encoded image bytes (any format and mode PIL opens).
    channels: 1 (grey) or 3 (RGB); modes are converted by the rules in the module docstring.
    record: names the record in error messages.
    max_pixels: refuse (DataError) images with more pixels than this.

  Returns:
    uint8 (H, W, channels), H and W upright (EXIF orientation applied).

  Raises:
    ValueError: the bytes cannot be decoded, or channels is not 1 or 3.
  """
  _check_channels(channels)
  image = _open(data, record, max_pixels)
  try:
    return _to_array(_convert(_upright(image), channels), channels)
  except Exception as e:
    raise DataError(f"Cannot decode image of record {record}: {type(e).__name__}: {e}") from e


def _check_channels(channels: int) -> str:
  if channels not in _MODES:
    raise ConfigError(f"channels must be 1 or 3, got {channels}")
  return _MODES[channels]


def _resize(image: PIL.Image.Image, channels: int, box: tuple[float, float, float, float],
            size: int, record: str) -> PIL.Image.Image:
  """Decodes (in L / RGB, so 1-bit and palette images are resampled bilinearly too), turns upright
  and resizes `box` (upright coordinates)."""
  try:
    box = _draft(image, channels, box, (size, size))
    image = _convert(_upright(image), channels)
    return image.resize((size, size), PIL.Image.BILINEAR, box=box)
  except Exception as e:
    raise DataError(f"Cannot decode image of record {record}: {type(e).__name__}: {e}") from e


def _to_array(image: PIL.Image.Image, channels: int) -> np.ndarray:
  """uint8 (H, W, channels)."""
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def _draft(image: PIL.Image.Image, channels: int, box: tuple[float, float, float, float],
           out_size: tuple[int, int]) -> tuple[float, float, float, float]:
  """Lets a JPEG decode at 1/2, 1/4 or 1/8 scale when `box` still covers `out_size` pixels.

  `box` and `out_size` are in upright coordinates (EXIF orientation applied); returns `box` in the
  upright coordinates of the (possibly smaller) decoded image.
  """
  if image.format != "JPEG":
    return box
  swap = _orientation(image) in _SWAPS_AXES
  stored = image.size
  width, height = stored[::-1] if swap else stored
  bw, bh = box[2] - box[0], box[3] - box[1]
  # The smallest full-image size at which the box is still >= the output size.
  need = (math.ceil(width * out_size[0] / bw), math.ceil(height * out_size[1] / bh))
  image.draft(_MODES[channels], need[::-1] if swap else need)
  sx, sy = image.size[0] / stored[0], image.size[1] / stored[1]
  if swap:
    sx, sy = sy, sx
  return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
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


def train_augment(data: bytes | np.ndarray, rng: np.random.Generator, *, image_size: int,
                  channels: int = 3,
                  crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                  record: str = "?", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decode -> RandomResizedCrop (bilinear) -> random horizontal flip.

  Args:
    data: encoded image bytes (JPEG, PNG, ...), or `decode_image`'s array of them.
    rng: the record's generator; the output is a pure function of (data, rng state).
    image_size: output side in pixels.
    channels: 1 (grayscale) or 3 (RGB).
    crop_scale: range of the crop's area as a fraction of the image.
    flip: flip left-right with probability 1/2.
    record: names the record in error messages.
    max_pixels: refuse (DataError) images with more pixels than this.

  Returns:
    uint8 (image_size, image_size, channels), cropped from the upright image.
  """
  _check_channels(channels)
  image = _open(data, record, max_pixels)
  box = random_resized_crop_box(*upright_size(image), rng, scale=crop_scale)
  do_flip = flip and rng.random() < 0.5
  image = _resize(image, channels, box, image_size, record)
  if do_flip:
    image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
  return _to_array(image, channels)


def eval_transform(data: bytes | np.ndarray, *, image_size: int, resize_size: int,
                   channels: int = 3, record: str = "?",
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decode -> turn upright -> resize the shorter side to `resize_size` (bilinear) -> center crop
  `image_size`.

  The resize and crop are done as one resampling of the matching box of the original image.
  `max_pixels` refuses (DataError) larger images before they are decoded.

  Returns:
    uint8 (image_size, image_size, channels).
  """
  _check_channels(channels)
  if image_size > resize_size:
    raise ConfigError(f"image_size {image_size} exceeds resize_size {resize_size}")
  image = _open(data, record, max_pixels)
  width, height = upright_size(image)
  scale = resize_size / min(width, height)
  left = (width * scale - image_size) / 2 / scale
  top = (height * scale - image_size) / 2 / scale
  box = (left, top, left + image_size / scale, top + image_size / scale)
  return _to_array(_resize(image, channels, box, image_size, record), channels)
