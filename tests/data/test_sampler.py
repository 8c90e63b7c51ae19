"""Tests of recall_jax.data.sampler.MPerClassSampler against brute-force checks of its contract."""

import collections

import numpy as np
import pytest

from recall_jax.data import MPerClassSampler


def _labels(sizes) -> np.ndarray:
  """Labels with class c having sizes[c] images, in a scrambled record order."""
  labels = np.repeat(np.arange(len(sizes)), sizes)
  return labels[np.random.default_rng(123).permutation(len(labels))]


def _epoch(sampler, epoch):
  steps = sampler.steps_per_epoch
  return np.stack([sampler.batch_indices(epoch * steps + s) for s in range(steps)])


def test_batches_are_distinct_classes_times_m():
  labels = _labels([4, 5, 7, 8, 9, 12, 3, 2, 16, 6, 4, 11])
  sampler = MPerClassSampler(labels, 16, 4, seed=0)
  for step in range(3 * sampler.steps_per_epoch):
    batch = sampler.batch_indices(step)
    assert batch.shape == (16,) and batch.dtype == np.int64
    groups = labels[batch].reshape(4, 4)
    assert (groups == groups[:, :1]).all(), "each group of m holds one class"
    assert len(set(groups[:, 0])) == 4, "groups are distinct classes"


def test_no_repeats_within_epoch_and_small_classes_skipped():
  sizes = [4, 5, 7, 8, 9, 12, 3, 2, 16, 6, 4, 11]
  labels = _labels(sizes)
  sampler = MPerClassSampler(labels, 8, 4, seed=1)
  assert sampler.num_classes_used == 10
  for epoch in range(3):
    indices = _epoch(sampler, epoch).ravel()
    assert len(np.unique(indices)) == len(indices)
    assert not np.isin(labels[indices], [6, 7]).any(), "classes with < m images are skipped"


def test_even_coverage_balanced_dataset_uses_every_image():
  labels = _labels([8] * 10)  # 20 groups of 4, 5 steps of 4 classes.
  sampler = MPerClassSampler(labels, 16, 4, seed=2)
  assert sampler.steps_per_epoch == 5
  for epoch in range(2):
    indices = _epoch(sampler, epoch).ravel()
    np.testing.assert_array_equal(np.sort(indices), np.arange(80))


def test_class_counts_per_epoch_follow_group_counts():
  sizes = [4, 8, 12, 4, 8, 12, 20, 4]
  labels = _labels(sizes)
  sampler = MPerClassSampler(labels, 8, 4, seed=3)
  total_groups = sum(s // 4 for s in sizes)
  assert sampler.steps_per_epoch == total_groups // 2
  counts = collections.Counter(labels[_epoch(sampler, 0).ravel()])
  # All 18 groups fit in 9 steps of 2 classes: each class appears n_c / m times.
  assert {c: n // 4 for c, n in counts.items()} == {c: s // 4 for c, s in enumerate(sizes)}


def test_dominant_class_is_capped_at_one_group_per_batch():
  labels = _labels([40, 4, 4, 4])
  sampler = MPerClassSampler(labels, 8, 4, seed=4)
  # 10 + 3 groups, but class 0 can join at most one group per step: 3 steps.
  assert sampler.steps_per_epoch == 3
  for step in range(6):
    groups = labels[sampler.batch_indices(step)].reshape(2, 4)[:, 0]
    assert len(set(groups)) == 2


def test_deterministic_and_seed_dependent():
  labels = _labels([6] * 20)
  a = MPerClassSampler(labels, 12, 3, seed=7)
  b = MPerClassSampler(labels, 12, 3, seed=7)
  c = MPerClassSampler(labels, 12, 3, seed=8)
  steps = range(0, 4 * a.steps_per_epoch, 3)
  assert all((a.batch_indices(s) == b.batch_indices(s)).all() for s in steps)
  assert any((a.batch_indices(s) != c.batch_indices(s)).any() for s in steps)
  # Epochs differ from one another.
  assert (_epoch(a, 0) != _epoch(a, 1)).any()


def test_resume_reproduces_continuation_exactly():
  labels = _labels([5, 9, 4, 13, 8, 4, 7, 6])
  run = MPerClassSampler(labels, 8, 4, seed=11)
  full = [run.batch_indices(s) for s in range(25)]
  resumed = MPerClassSampler(labels, 8, 4, seed=11)  # A fresh process, resumed at step 13.
  for s in range(13, 25):
    np.testing.assert_array_equal(resumed.batch_indices(s), full[s])


def test_local_slices_partition_global_batch():
  labels = _labels([8] * 16)
  sampler = MPerClassSampler(labels, 32, 4, seed=5)
  batch = sampler.batch_indices(3)
  for count in (1, 2, 4, 8):
    parts = [sampler.local_slice(batch, p, count) for p in range(count)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    for part in parts:
      groups = labels[part].reshape(-1, 4)
      assert (groups == groups[:, :1]).all()
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    sampler.local_slice(batch, 0, 3)
  with pytest.raises(ValueError, match="not a multiple of samples_per_class"):
    sampler.local_slice(batch, 0, 16)
  with pytest.raises(ValueError, match="process_index 2 not in"):
    sampler.local_slice(batch, 2, 2)


def test_with_replacement_keeps_small_classes():
  labels = _labels([1, 2, 3, 4, 5, 6])
  with pytest.raises(ValueError, match="only 3 of 6 classes"):
    MPerClassSampler(labels, 16, 4, seed=0)
  sampler = MPerClassSampler(labels, 16, 4, seed=0, with_replacement=True)
  assert sampler.num_classes_used == 6
  seen = set()
  for step in range(2 * sampler.steps_per_epoch):
    batch = sampler.batch_indices(step)
    groups = labels[batch].reshape(4, 4)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 4
    seen |= set(groups[:, 0])
  assert 0 in seen  # The single-image class is sampled (with repeats).


def test_bad_arguments():
  labels = _labels([4] * 4)
  with pytest.raises(ValueError, match="multiple of samples_per_class"):
    MPerClassSampler(labels, 10, 4, seed=0)
  with pytest.raises(ValueError, match="1-D integer"):
    MPerClassSampler(labels.astype(float), 8, 4, seed=0)
  with pytest.raises(ValueError, match="seed must be non-negative"):
    MPerClassSampler(labels, 8, 4, seed=-1)
  with pytest.raises(ValueError, match="step must be non-negative"):
    MPerClassSampler(labels, 8, 4, seed=0).batch_indices(-1)


def test_record_index_is_the_batch_entry_across_epochs():
  labels = np.repeat(np.arange(7), 6)
  sampler = MPerClassSampler(labels, 8, 2, seed=5)
  for step in [0, 1, sampler.steps_per_epoch, 3 * sampler.steps_per_epoch + 1, 1, 0]:
    batch = sampler.batch_indices(step)
    assert [sampler.record_index(step, p) for p in range(8)] == batch.tolist()
  # Alternating between two epochs (readers ahead across a boundary) gives the same entries.
  last, first = sampler.steps_per_epoch - 1, sampler.steps_per_epoch
  expected = {s: sampler.batch_indices(s).tolist() for s in (last, first)}
  for _ in range(3):
    for s in (last, first):
      assert sampler.record_index(s, 3) == expected[s][3]
  with pytest.raises(ValueError, match="position 8"):
    sampler.record_index(0, 8)
