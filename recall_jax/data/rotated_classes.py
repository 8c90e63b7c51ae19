"""Quarter-turns of the training classes as new classes (the classic Omniglot augmentation).

Vinyals et al. (2016) and Snell et al. (2017) train on Omniglot with every 90-degree rotation of
a character as a character of its own: rotating a character generally makes a different one, so
this multiplies the training classes (964 -> 3,856) instead of only varying the images.
`RotatedClasses` is a source wrapper: record `i + r * N` is record `i` of the wrapped source turned
`r` quarter-turns counter-clockwise, with label `label + r * C`. The turn travels with the record
as its decoded-image transform (see `source.DECODED_TRANSFORM`), which the loaders apply after
augmenting, so batches stay a function of (seed, step).

Serves the category-level task (metric learning, Recall@k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from recall_jax.data.source import LabelledSource, check_index, read_records, with_decoded_transform
from recall_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class QuarterTurns:
  """Turns a uint8 (H, W, C) image `turns` quarter-turns counter-clockwise."""
  turns: int

  def __call__(self, image: np.ndarray) -> np.ndarray:
    return np.rot90(image, self.turns, axes=(0, 1))


class RotatedClasses:
  """A source holding each record at 0, 90, ... degrees, each rotation a new class.

  Attributes:
    labels: int64 (turns * N,) labels; rotation r of class c is class c + r * C.
    num_classes: turns * C, where C = max(labels) + 1 of the wrapped source.
    turns: quarter-turns used: 1 (the source unchanged), 2 (0 and 90 degrees), 3 or 4.

  A record keeps the wrapped record's fields, with its new `label`, `quarter_turns` (0..turns-1,
  informative), an `id` suffixed `@90deg` etc., and the turn as its decoded-image transform.
  """

  def __init__(self, source: LabelledSource, turns: int):
    if int(turns) != turns or not 1 <= turns <= 4:
      raise ConfigError(f"turns must be an integer in 1..4 (quarter-turns per class), got {turns}")
    labels = np.asarray(source.labels, np.int64)
    if labels.ndim != 1 or labels.size == 0 or labels.min() < 0:
      raise DataError("the source needs non-empty, non-negative (N,) integer labels")
    self.source, self.turns = source, int(turns)
    self._size, classes = len(labels), int(labels.max()) + 1
    self.labels = np.concatenate([labels + r * classes for r in range(self.turns)])
    self.num_classes = classes * self.turns
    # For error messages of the pipeline.
    self.name = getattr(source, "name", type(source).__name__)
    self.split = f"{getattr(source, 'split', '?')} x{self.turns} quarter-turns"

  def __len__(self) -> int:
    return len(self.labels)

  def _locate(self, index: int) -> tuple[int, int]:
    turns, base = divmod(check_index(index, len(self)), self._size)
    return base, turns

  def _rotated(self, record: dict[str, Any], index: int, turns: int) -> dict[str, Any]:
    record = {**record, "label": int(self.labels[index]), "quarter_turns": turns}
    if turns:
      record["id"] = f"{record.get('id', '')}@{90 * turns}deg"
      record = with_decoded_transform(record, QuarterTurns(turns))
    return record

  def __getitem__(self, index: int) -> dict[str, Any]:
    base, turns = self._locate(index)
    return self._rotated(self.source[base], int(index), turns)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    located = [self._locate(i) for i in indices]
    records = read_records(self.source, [b for b, _ in located])
    return [self._rotated(r, int(i), t) for r, i, (_, t) in zip(records, indices, located)]
