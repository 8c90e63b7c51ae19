"""The batch layout rules (recall_jax.batch_layout), against a brute-force reading of the rule."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from recall_jax import batch_layout
from recall_jax import errors


def _fits(batch: int, chunk: int, devices: int, processes: int, m: int) -> bool:
  """Whether the batch can be cut as the sharded step cuts it, by trying every cut."""
  chunks_ok = any(chunk * devices * n == batch for n in range(1, batch + 1))
  classes_ok = any(m * n == batch for n in range(1, batch + 1))
  process_rows = batch // processes if batch % processes == 0 else None
  slices_ok = processes == 1 or (process_rows is not None
                                 and any(m * n == process_rows for n in range(1, batch + 1)))
  return chunks_ok and classes_ok and devices % processes == 0 and slices_ok


@pytest.mark.parametrize("batch, chunk, devices, processes, m", list(itertools.product(
    (8, 12, 16, 24), (1, 2, 3, 4), (1, 2, 4), (1, 2), (2, 3, 4))))
def test_problems_are_found_exactly_when_the_batch_does_not_fit(batch, chunk, devices,
                                                                processes, m):
  problems = batch_layout.batch_layout_problems(batch, chunk, devices, processes, m)
  assert (problems == []) == _fits(batch, chunk, devices, processes, m), problems
  if problems:
    with pytest.raises(errors.ConfigError):
      batch_layout.check_batch_layout(batch, chunk, devices, processes, m)
  else:
    assert batch_layout.check_batch_layout(batch, chunk, devices, processes, m) == (
        batch // (chunk * devices))


def test_bad_sizes_are_named():
  assert batch_layout.batch_layout_problems(8, 0, 1) == [
      "chunk_size_per_device must be a positive integer, got 0"]


def test_the_rules_import_no_jax_and_the_sharded_step_uses_them():
  code = "import sys, recall_jax.batch_layout; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
  from recall_jax.train import sharded_step  # noqa: PLC0415 (imports JAX; after the check above)
  assert sharded_step.check_batch_layout is batch_layout.check_batch_layout


def _most_memory_positives(num_classes: int, m: int, batch: int, memory: int, steps: int) -> int:
  """Brute force: the sampler's batches written into a ring buffer as the train step writes
  them; the most rows of one query's class in the batch (less itself) plus the memory."""
  from recall_jax.data import sampler as sampler_lib
  labels = np.repeat(np.arange(num_classes), 3 * m)
  sampler = sampler_lib.MPerClassSampler(labels, batch, m, seed=0)
  stored, most = [], 0
  for step in range(steps):
    batch_labels = labels[sampler.batch_indices(step)]
    in_memory = np.bincount(np.asarray(stored[-memory:], np.int64), minlength=num_classes)
    in_batch = np.bincount(batch_labels, minlength=num_classes)
    most = max(most, int(np.max((in_batch - 1 + in_memory)[batch_labels])))
    stored.extend(batch_labels.tolist())
  return most


@pytest.mark.parametrize("num_classes,m,batch,memory", [
    (2, 4, 8, 24),  # every batch holds both classes: the bound is met
    (2, 2, 4, 6),  # M not a multiple of B: the oldest batch is partly overwritten
    (3, 2, 4, 3),  # M < B
    (50, 4, 16, 64),  # many classes: far below the bound
])
def test_memory_positives_never_exceed_the_bound(num_classes, m, batch, memory):
  bound = batch_layout.memory_max_positives(m, batch, memory)
  most = _most_memory_positives(num_classes, m, batch, memory, steps=40)
  assert most <= bound
  if num_classes * m == batch:  # every class in every batch: the bound is tight
    assert most == bound
  assert bound < m + memory - 1 or memory < batch  # far below any-content's m + M - 1


def test_memory_max_positives_rejects_bad_sizes():
  with pytest.raises(ValueError, match="memory_size must be a positive integer"):
    batch_layout.memory_max_positives(4, 16, 0)
