"""The random-access source interface the loaders and source wrappers read through."""

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Source(Protocol):
  """`len()` and `source[i] -> {'image': bytes, 'label': int, 'id': ...}`; optionally a batched
  `__getitems__(indices)` (one ArrayRecord read instead of one per record)."""

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
