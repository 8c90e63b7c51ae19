"""FirstN: the first n records of a source, through the same interface."""

import numpy as np
import pytest

from recall_jax.data import FirstN


class Records:
  """A labelled source that counts its batched reads."""

  def __init__(self, n):
    self.labels = np.arange(n) % 3
    self.name, self.split = "toy", "test"
    self.batched_reads = 0

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": bytes([i]), "label": int(self.labels[i]), "id": i}

  def __getitems__(self, indices):
    self.batched_reads += 1
    return [self[i] for i in indices]


def test_first_n_records_and_labels():
  source = Records(10)
  first = FirstN(source, 4)
  assert len(first) == 4 and (first.name, first.split) == ("toy", "test")
  np.testing.assert_array_equal(first.labels, source.labels[:4])
  assert [r["id"] for r in first.__getitems__([3, 0])] == [3, 0]
  assert source.batched_reads == 1
  assert first[2] == source[2]
  assert len(FirstN(source, 50)) == 10


def test_bad_input():
  first = FirstN(Records(10), 4)
  with pytest.raises(IndexError):
    first[4]
  with pytest.raises(IndexError):
    first.__getitems__([1, 5])
  with pytest.raises(ValueError, match="positive integer"):
    FirstN(Records(3), 0)
