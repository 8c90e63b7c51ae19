"""Fixtures for the serve tests: a tiny embedder and folders of real image files."""

from __future__ import annotations

import io
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest

from recall_jax.models import get_model, init_variables
from recall_jax.serve.gallery import ImageTransform



class CountingEmbedder:
  """A jitted small-CNN embedder that counts how many images it was called on."""

  transform = ImageTransform(image_size=28, resize_size=32, channels=3)

  def __init__(self, seed: int = 0):
    model = get_model("small_cnn", embedding_dim=16)
    self.variables = init_variables(model, jax.random.key(seed), self.transform.image_size, 3)
    self.apply = jax.jit(lambda x: model.apply(self.variables, x, train=False))
    self.images_seen = 0

  def __call__(self, images):
    self.images_seen += images.shape[0]
    return self.apply(images)


@pytest.fixture(scope="module")
def embedder():
  return CountingEmbedder()


def _image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (40, 48)) -> bytes:
  """An encoded image of coloured blocks, different for each seed."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  pixels = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 5 + 1, 1), np.uint8))
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels[:size[1], :size[0]]).save(buffer, format=fmt)
  return buffer.getvalue()


def _write_gallery(root: pathlib.Path, num_images: int = 12) -> list[pathlib.Path]:
  """Images in nested folders (PNG and JPEG); returns their paths."""
  paths = []
  for i in range(num_images):
    fmt = "JPEG" if i % 3 == 0 else "PNG"
    path = root / f"group{i % 2}" / ("deeper" if i % 4 == 1 else "") / f"img{i:02d}.{fmt.lower()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(i, fmt))
    paths.append(path)
  return paths


def _write_bad_files(root: pathlib.Path) -> list[pathlib.Path]:
  """A truncated JPEG, a zero-byte file and a text file."""
  root.mkdir(parents=True, exist_ok=True)
  corrupt = root / "corrupt.jpg"
  corrupt.write_bytes(_image_bytes(99, "JPEG")[:200])
  empty = root / "empty.png"
  empty.write_bytes(b"")
  text = root / "notes.txt"
  text.write_text("not an image\n")
  return [corrupt, empty, text]


@pytest.fixture
def make_gallery():
  """`make_gallery(root, num_images=12) -> paths`: real PNG and JPEG files in nested folders."""
  return _write_gallery


@pytest.fixture
def make_bad_files():
  """`make_bad_files(root) -> paths`: a truncated JPEG, a zero-byte file and a text file."""
  return _write_bad_files
