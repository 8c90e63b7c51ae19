"""The first n records of a source, e.g. a slice of a test split for quick evaluations.

Serves both tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from recall_jax.data.source import LabelledSource, check_index, read_records


class FirstN:
  """Records 0 .. n - 1 of a source (all of them when it holds fewer), with the same interface.

  Attributes:
    labels: (n,) the first n labels of the source.
    name, split: copied from the source when it has them (for error messages).
  """

  def __init__(self, source: LabelledSource, n: int):
    if int(n) != n or n < 1:
      raise ValueError(f"n must be a positive integer, got {n}")
    self.source = source
    self._size = min(int(n), len(source))
    self.labels = np.asarray(source.labels)[: self._size]
    for attribute in ("name", "split"):
      if hasattr(source, attribute):
        setattr(self, attribute, getattr(source, attribute))

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[check_index(index, self._size)]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return read_records(self.source, [check_index(i, self._size) for i in indices])
