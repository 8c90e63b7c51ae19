"""Tests of the source wrappers: data.RotatedClasses (with its turn in the pipeline) and
data.InMemorySource."""

import io

import numpy as np
import PIL.Image
import pytest

from recall_jax import data
from recall_jax import errors
from recall_jax.data import transforms


class _ListSource:
  """Records in a list, with the `labels` attribute the sampler reads."""

  def __init__(self, records):
    self.records = records
    self.labels = np.array([r["label"] for r in records])

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def _png(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _source(num_classes=5, per_class=4, size=12):
  rng = np.random.default_rng(0)
  records = [{"image": _png(rng.integers(0, 256, (size, size), np.uint8)), "label": c,
              "id": f"{c}-{k}"} for c in range(num_classes) for k in range(per_class)]
  return _ListSource(records)


def test_labels_records_and_ids():
  source = _source()
  rotated = data.RotatedClasses(source, 4)
  n = len(source)
  assert len(rotated) == 4 * n and rotated.num_classes == 20
  np.testing.assert_array_equal(rotated.labels, np.concatenate([source.labels + 5 * r
                                                                for r in range(4)]))
  record = rotated[2 * n + 7]
  assert record["label"] == source.labels[7] + 10 and record["quarter_turns"] == 2
  assert record["image"] == source.records[7]["image"] and record["id"] == "1-3@180deg"
  assert rotated[3]["quarter_turns"] == 0 and rotated[3]["id"] == "0-3"
  assert rotated.__getitems__([3, n + 3, 3 * n]) == [rotated[3], rotated[n + 3], rotated[3 * n]]
  assert len(data.RotatedClasses(source, 1)) == n


@pytest.mark.parametrize("turns", [0, 5, 2.5])
def test_bad_turns(turns):
  with pytest.raises(ValueError, match="turns must be an integer in 1..4"):
    data.RotatedClasses(_source(), turns)


def test_out_of_range_index():
  with pytest.raises(IndexError, match="out of range"):
    data.RotatedClasses(_source(), 2)[40]


def test_pipeline_turns_the_augmented_image():
  source = _source()
  rotated = data.RotatedClasses(source, 4)
  sampler = data.MPerClassSampler(rotated.labels, 16, 4, seed=3)
  loader = data.make_train_loader(rotated, sampler, image_size=8, seed=7, channels=1,
                                  crop_scale=(0.5, 1.0), flip=True, num_steps=2)
  turns_seen = set()
  for step, batch in enumerate(loader):
    indices = sampler.batch_indices(step)
    for k, index in enumerate(indices):
      turns, base = divmod(int(index), len(source))
      # The same augmentation draw as the unrotated record, then the turn.
      expected = transforms.train_augment(
          source.records[base]["image"], np.random.default_rng([7, step, k]), image_size=8,
          channels=1, crop_scale=(0.5, 1.0), flip=True)
      np.testing.assert_array_equal(batch["image"][k], np.rot90(expected, turns, axes=(0, 1)))
      assert batch["label"][k] == source.labels[base] + 5 * turns
      turns_seen.add(turns)
  assert len(turns_seen) > 1


def test_in_memory_source_holds_the_same_records():
  source = _source()
  held = data.InMemorySource(source, progress=False)
  assert len(held) == len(source)
  np.testing.assert_array_equal(held.labels, source.labels)
  assert [held[i] for i in range(len(source))] == source.records
  assert held.__getitems__([3, 0]) == [source.records[3], source.records[0]]
  with pytest.raises(IndexError, match="out of range"):
    held[len(source)]
  with pytest.raises(ValueError, match="turn data.in_memory off"):
    data.InMemorySource(source, max_bytes=100, progress=False)


def _one_bit_source(num_classes=4, per_class=4, size=20):
  """1-bit PNGs, as Omniglot's, plus a few 8-bit grey ones."""
  rng = np.random.default_rng(2)
  records = []
  for c in range(num_classes):
    for k in range(per_class):
      pixels = rng.integers(0, 2, (size, size + 3)).astype(bool)
      image = PIL.Image.fromarray(pixels).convert("1") if k % 2 else PIL.Image.fromarray(
          rng.integers(0, 256, (size, size + 3), np.uint8))
      buffer = io.BytesIO()
      image.save(buffer, "PNG")
      records.append({"image": buffer.getvalue(), "label": c, "id": f"{c}-{k}"})
  return _ListSource(records)


@pytest.mark.parametrize("channels", [1, 3])
def test_decoded_in_memory_source_gives_the_same_batches(channels):
  source = _one_bit_source()
  held = data.InMemorySource(source, decode_channels=channels, progress=False)
  assert held.decode_channels == channels
  assert held.nbytes == sum(20 * 23 * channels for _ in range(len(source)))
  for i in (0, 5):
    np.testing.assert_array_equal(held[i]["image"],
                                  transforms.decode_image(source[i]["image"], channels))
    assert held[i]["label"] == source[i]["label"] and held[i]["id"] == source[i]["id"]
  sampler = data.MPerClassSampler(source.labels, 8, 2, seed=1)
  kw = dict(image_size=12, seed=9, channels=channels, num_steps=3)
  for a, b in zip(data.make_train_loader(source, sampler, **kw),
                  data.make_train_loader(held, sampler, **kw)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  eval_kw = dict(image_size=16, resize_size=18, batch_size=5, channels=channels)
  for a, b in zip(data.make_eval_loader(source, **eval_kw), data.make_eval_loader(held, **eval_kw)):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_decoded_in_memory_source_refuses_above_its_cap():
  source = _one_bit_source()
  encoded = data.InMemorySource(source, max_bytes=20 * 23 * 15, progress=False)  # PNGs are small.
  assert encoded.decode_channels is None and encoded.nbytes < 20 * 23 * 15
  with pytest.raises(errors.ConfigError, match="bytes of decoded images; turn data.in_memory off"):
    data.InMemorySource(source, decode_channels=1, max_bytes=20 * 23 * 15, progress=False)
