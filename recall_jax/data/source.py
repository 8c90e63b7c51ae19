"""The random-access source interface the loaders and source wrappers read through.

A record is `{'image': bytes, 'label': int, 'id': str, ...}`. A source wrapper that changes the
decoded pixels (a quarter-turn, say) does not ask the loaders to know about it: it puts a
callable under `DECODED_TRANSFORM` in the record, and the loaders apply it to the decoded,
augmented (or resized and cropped) uint8 (H, W, C) image, so the batch stays a function of the
augmentation draw and the record alone. Wrappers stack: `with_decoded_transform` runs the wrapped
source's transform first.

Serves both tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

# Record key of a callable uint8 (H, W, C) -> uint8 (H', W', C) the loaders apply after decoding.
DECODED_TRANSFORM = "decoded_transform"

ImageTransform = Callable[[np.ndarray], np.ndarray]


class Source(Protocol):
  """`len()` and `source[i] -> {'image': bytes, 'label': int, 'id': ...}`; optionally a batched
  `__getitems__(indices)` (one ArrayRecord read instead of one per record) and a
  `DECODED_TRANSFORM` entry in a record."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


class LabelledSource(Source, Protocol):
  """A `Source` that also gives every record's label up front (what source wrappers need)."""

  labels: np.ndarray  # (N,) integer labels


def read_records(source: Source, indices: Sequence[int]) -> list[dict[str, Any]]:
  """The records at `indices`, through `__getitems__` when the source has it."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems([int(i) for i in indices]))
  return [source[int(i)] for i in indices]


def check_index(index: int, size: int) -> int:
  """`index` as an int in [0, size), else IndexError."""
  index = int(index)
  if not 0 <= index < size:
    raise IndexError(f"index {index} out of range for {size} records")
  return index


@dataclasses.dataclass(frozen=True)
class _Composed:
  """`second(first(image))`; a dataclass, so records compare equal and pickle into workers."""
  first: ImageTransform
  second: ImageTransform

  def __call__(self, image: np.ndarray) -> np.ndarray:
    return self.second(self.first(image))


def with_decoded_transform(record: dict[str, Any], transform: ImageTransform) -> dict[str, Any]:
  """A copy of `record` whose decoded image also goes through `transform`, after any it had.

  Args:
    record: a source's record.
    transform: uint8 (H, W, C) -> uint8 (H', W', C), a pure function of the image; it must pickle
      (a module-level class or function) to reach grain worker processes.

  Returns:
    The record with `DECODED_TRANSFORM` set.
  """
  previous = record.get(DECODED_TRANSFORM)
  combined = transform if previous is None else _Composed(previous, transform)
  return {**record, DECODED_TRANSFORM: combined}


def apply_decoded_transform(record: dict[str, Any], image: np.ndarray) -> np.ndarray:
  """`image` (uint8 (H, W, C), decoded from `record`) after the record's transform, if any."""
  transform = record.get(DECODED_TRANSFORM)
  return image if transform is None else transform(image)
