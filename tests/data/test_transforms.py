"""Tests of recall_jax.data.transforms' decoding: every PIL mode to 1 or 3 uint8 channels,
image by image against NumPy references."""

import io

import numpy as np
import PIL.Image
import pytest

from recall_jax.data import transforms

_H, _W = 6, 8  # W - H even: the center crop starts on a whole pixel.


def _encode(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _rng():
  return np.random.default_rng(0)


def _luma(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma in PIL's fixed point: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  c, a = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
  return np.rint((c * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def _grey_to(grey: np.ndarray, channels: int) -> np.ndarray:
  return np.repeat(grey[..., None], channels, -1)


def _rgb_to(rgb: np.ndarray, channels: int) -> np.ndarray:
  return rgb if channels == 3 else _luma(rgb)[..., None]


def _case_16bit_png():
  values = _rng().integers(0, 65536, (_H, _W)).astype(np.uint16)
  values[0, :3] = (0, 65535, 256)
  image = PIL.Image.fromarray(values)
  return _encode(image), lambda ch: _grey_to((values >> 8).astype(np.uint8), ch)


def _case_16bit_big_endian_tiff():
  values = _rng().integers(0, 65536, (_H, _W)).astype(">u2")
  image = PIL.Image.frombytes("I;16B", (_W, _H), values.tobytes())
  return _encode(image, "TIFF"), lambda ch: _grey_to(
      (values.astype(np.int64) >> 8).astype(np.uint8), ch)


def _case_32bit_int_tiff():
  values = _rng().integers(-1000, 70000, (_H, _W)).astype(np.int32)
  image = PIL.Image.fromarray(values, "I")
  expected = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
  return _encode(image, "TIFF"), lambda ch: _grey_to(expected, ch)


def _case_float_tiff():
  values = _rng().uniform(-0.2, 1.2, (_H, _W)).astype(np.float32)
  image = PIL.Image.fromarray(values, "F")
  expected = np.rint(np.clip(values.astype(np.float64), 0, 1) * 255).astype(np.uint8)
  return _encode(image, "TIFF"), lambda ch: _grey_to(expected, ch)


def _case_cmyk_tiff():
  cmyk = _rng().integers(0, 256, (_H, _W, 4)).astype(np.uint8)
  image = PIL.Image.fromarray(cmyk, "CMYK")
  c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
  rgb = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
  return _encode(image, "TIFF"), lambda ch: _rgb_to(rgb, ch)


def _case_rgba_png():
  rgba = _rng().integers(0, 256, (_H, _W, 4)).astype(np.uint8)
  rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
  rgb = _on_white(rgba[..., :3], rgba[..., 3])
  return _encode(PIL.Image.fromarray(rgba, "RGBA")), lambda ch: _rgb_to(rgb, ch)


def _case_la_png():
  la = _rng().integers(0, 256, (_H, _W, 2)).astype(np.uint8)
  grey = _on_white(la[..., :1], la[..., 1])[..., 0]
  return _encode(PIL.Image.fromarray(la, "LA")), lambda ch: _grey_to(grey, ch)


def _palette_image(transparent: bool):
  palette = _rng().integers(0, 256, (16, 3)).astype(np.uint8)
  index = _rng().integers(0, 16, (_H, _W)).astype(np.uint8)
  image = PIL.Image.fromarray(index, "P")
  image.putpalette(palette.ravel().tolist())
  rgb = palette[index]
  if transparent:
    image.info["transparency"] = 3
    rgb = np.where((index == 3)[..., None], np.uint8(255), rgb)
  return image, rgb


def _case_palette_png():
  image, rgb = _palette_image(False)
  return _encode(image), lambda ch: _rgb_to(rgb, ch)


def _case_palette_with_transparency_png():
  image, rgb = _palette_image(True)
  buffer = io.BytesIO()
  image.save(buffer, "PNG", transparency=3)
  return buffer.getvalue(), lambda ch: _rgb_to(rgb, ch)


def _case_one_bit_png():
  bits = _rng().integers(0, 2, (_H, _W)).astype(bool)
  grey = np.where(bits, 255, 0).astype(np.uint8)
  return _encode(PIL.Image.fromarray(bits).convert("1")), lambda ch: _grey_to(grey, ch)


def _case_grey_png():
  grey = _rng().integers(0, 256, (_H, _W)).astype(np.uint8)
  return _encode(PIL.Image.fromarray(grey, "L")), lambda ch: _grey_to(grey, ch)


def _case_rgb_png():
  rgb = _rng().integers(0, 256, (_H, _W, 3)).astype(np.uint8)
  return _encode(PIL.Image.fromarray(rgb, "RGB")), lambda ch: _rgb_to(rgb, ch)


CASES = {
    "I;16 png": _case_16bit_png,
    "I;16B tiff": _case_16bit_big_endian_tiff,
    "I tiff": _case_32bit_int_tiff,
    "F tiff": _case_float_tiff,
    "CMYK tiff": _case_cmyk_tiff,
    "RGBA png": _case_rgba_png,
    "LA png": _case_la_png,
    "P png": _case_palette_png,
    "P png with transparency": _case_palette_with_transparency_png,
    "1 png": _case_one_bit_png,
    "L png": _case_grey_png,
    "RGB png": _case_rgb_png,
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_matches_numpy_reference(case, channels):
  encoded, reference = CASES[case]()
  expected = reference(channels)
  decoded = transforms.decode_image(encoded, channels)
  assert decoded.dtype == np.uint8 and decoded.shape == (_H, _W, channels)
  np.testing.assert_array_equal(decoded, expected)
  # The loaders use the same conversion: a full-image box at the image's own size is the identity.
  side = min(_H, _W)
  crop = transforms.eval_transform(encoded, image_size=side, resize_size=side, channels=channels)
  top, left = (_H - side) // 2, (_W - side) // 2
  np.testing.assert_array_equal(crop, expected[top:top + side, left:left + side])


def test_sixteen_bit_png_is_not_saturated():
  """A dark 16-bit PNG (values < 2^15) must stay dark, not become all white."""
  values = np.full((_H, _W), 3000, np.uint16)
  decoded = transforms.decode_image(_encode(PIL.Image.fromarray(values)), 1)
  np.testing.assert_array_equal(decoded, np.full((_H, _W, 1), 3000 >> 8, np.uint8))


def test_decoded_array_augments_like_the_encoded_image():
  encoded, _ = _case_rgb_png()
  decoded = transforms.decode_image(encoded, 3)
  for seed in range(3):
    a = transforms.train_augment(encoded, np.random.default_rng(seed), image_size=5)
    b = transforms.train_augment(decoded, np.random.default_rng(seed), image_size=5)
    np.testing.assert_array_equal(a, b)


def test_bad_input():
  with pytest.raises(ValueError, match=r"Cannot decode image of record x"):
    transforms.decode_image(b"not an image", 3, record="x")
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    transforms.decode_image(_case_rgb_png()[0], 4)


def _phone_photo(width: int, height: int, orientation: int) -> tuple[bytes, np.ndarray]:
  """A JPEG stored sideways with an EXIF orientation tag, and its stored pixels as decoded."""
  y, x = np.mgrid[0:height, 0:width]
  # Asymmetric in both axes (a bright left band, a gradient downwards): a rotation shows.
  pixels = np.stack([np.where(x < width // 3, 250, 20), (y * 200 // height), x * 0 + 90],
                    -1).astype(np.uint8)
  exif = PIL.Image.Exif()
  exif[0x0112] = orientation
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif)
  data = buffer.getvalue()
  stored = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
  return data, stored


# The stored pixels turned upright, by the EXIF specification (independent of PIL.ImageOps).
_UPRIGHT = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, k=-1),
            8: lambda a: np.rot90(a, k=1), 5: lambda a: np.swapaxes(a, 0, 1)}


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_exif_orientation_is_applied_in_every_decode_path(orientation):
  data, stored = _phone_photo(48, 32, orientation)
  upright = np.ascontiguousarray(_UPRIGHT[orientation](stored))
  np.testing.assert_array_equal(transforms.decode_image(data, 3), upright)
  np.testing.assert_array_equal(
      transforms.eval_transform(data, image_size=20, resize_size=24),
      transforms.eval_transform(upright, image_size=20, resize_size=24))
  for seed in range(3):
    np.testing.assert_array_equal(
        transforms.train_augment(data, np.random.default_rng(seed), image_size=16),
        transforms.train_augment(upright, np.random.default_rng(seed), image_size=16))


def test_exif_orientation_with_reduced_scale_jpeg_decode():
  # 640 x 400 stored, 400 x 640 upright, decoded at 1/8 scale for a 28 px output.
  data, stored = _phone_photo(640, 400, 6)
  upright = np.ascontiguousarray(_UPRIGHT[6](stored))
  got = transforms.eval_transform(data, image_size=28, resize_size=32).astype(np.float64)
  want = transforms.eval_transform(upright, image_size=28, resize_size=32).astype(np.float64)
  assert np.abs(got - want).mean() < 4
  sideways = transforms.eval_transform(stored, image_size=28, resize_size=32).astype(np.float64)
  assert np.abs(sideways - want).mean() > 40


def test_images_over_the_pixel_limit_are_refused_before_decoding():
  data, _ = _case_rgb_png()
  for decode in (lambda **kw: transforms.decode_image(data, 3, **kw),
                 lambda **kw: transforms.eval_transform(data, image_size=4, resize_size=5, **kw),
                 lambda **kw: transforms.train_augment(data, _rng(), image_size=4, **kw)):
    with pytest.raises(ValueError, match=f"{_W} x {_H} pixels, more than the limit of 47"):
      decode(max_pixels=_H * _W - 1)
    assert decode(max_pixels=_H * _W).dtype == np.uint8
