"""A split's records held in memory, for small datasets read many times (Omniglot).

Reading a record from the prepared ArrayRecord files costs ~0.16 ms (Omniglot, 2-core CPU): 0.16 s
of every 1,000-image step, which on a CPU-only machine is taken from the training step itself.
Holding the encoded bytes (Omniglot's 19,280 training PNGs: ~16 MB) removes it; holding the
decoded pixels (`decode_channels`, ~212 MB for Omniglot at one channel) also removes the decode
from every step.

Serves both tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from recall_jax.data import transforms
from recall_jax.data.source import LabelledSource, check_index, read_records
from recall_jax.errors import ConfigError

_READ_BATCH = 1000


class InMemorySource:
  """Every record of `source`, read once (and optionally decoded once), with the same interface.

  Attributes:
    labels: int64 (N,) the source's labels.
    decode_channels: the channels the images were decoded to, or None (encoded bytes held).
    nbytes: bytes of image data held.
    name, split, num_classes, channels, skipped: copied from the source when it has them.
  """

  def __init__(self, source: LabelledSource, *, decode_channels: int | None = None,
               max_bytes: int = 2 << 30, progress: bool = True):
    """Reads all records of `source`.

    Args:
      source: a random-access source (`__len__`, `__getitem__`, optional `__getitems__`, `labels`).
      decode_channels: None holds the encoded bytes; 1 or 3 holds each image decoded once
        (`transforms.decode_image`) as uint8 (H, W, decode_channels), which the loaders augment
        without decoding again. Batches are the same as from the encoded bytes for PNG and other
        lossless images at the same channels; a JPEG is then augmented from its full-resolution
        decode instead of PIL's reduced-scale one, which differs slightly.
      max_bytes: refuse (ConfigError) once the held images exceed this, rather than exhaust
        memory on a large dataset.
      progress: show a progress bar.
    """
    self.labels = np.asarray(source.labels, np.int64)
    for attribute in ("name", "split", "num_classes", "channels", "skipped"):
      if hasattr(source, attribute):
        setattr(self, attribute, getattr(source, attribute))
    self.decode_channels = decode_channels
    self._records: list[dict[str, Any]] = []
    self.nbytes = 0
    what = "decoded" if decode_channels else "encoded"
    with tqdm.tqdm(total=len(source), desc=f"read into memory ({what})", unit="img",
                   disable=not progress, leave=False) as bar:
      for start in range(0, len(source), _READ_BATCH):
        indices = list(range(start, min(start + _READ_BATCH, len(source))))
        records = read_records(source, indices)
        if decode_channels:
          records = [{**r, "image": transforms.decode_image(
                         r["image"], decode_channels, record=f"{i} (id {r.get('id', '?')!r})")}
                     for i, r in zip(indices, records)]
        self.nbytes += sum(len(r["image"]) if isinstance(r["image"], bytes) else r["image"].nbytes
                           for r in records)
        if self.nbytes > max_bytes:
          raise ConfigError(f"{getattr(source, 'name', 'the source')} holds more than {max_bytes} "
                            f"bytes of {what} images; turn data.in_memory off for it")
        self._records.extend(records)
        bar.update(len(records))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[check_index(index, len(self))]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]
