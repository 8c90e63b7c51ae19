"""A deterministic, index-addressable m-per-class batch sampler.

Every global batch holds `batch_size / m` distinct classes with `m` images each, as contiguous
groups. Epoch `e` is a pure function of `(labels, seed, e)`:

1. Classes with fewer than `m` images are skipped (or, `with_replacement=True`, kept, and a
   class's last incomplete group is completed by drawing its other images again).
2. Each class's images are shuffled and cut into groups of `m`: every image is used at most once
   per epoch and, as `m` divides the class sizes of balanced datasets, almost all are used.
   A class contributes at most `steps_per_epoch` groups (one per batch).
3. Classes are shuffled and their groups laid out class by class, column-major, into a
   `steps_per_epoch x (batch_size / m)` grid (McNaughton's wrap-around rule): a class's groups
   fall in distinct rows, so no batch holds a class twice. Rows are then shuffled into steps.

So every class appears in `min(n_c // m, steps_per_epoch)` batches of each epoch, spread at random
over it. The sampler's only state is the global step: `batch_indices(step)` for `step >= s` is
exactly what a run resumed at step `s` sees, on any number of hosts.

Serves both tasks.
"""

from __future__ import annotations

import numpy as np

from recall_jax.errors import ConfigError, DataError


class MPerClassSampler:
  """Class-balanced batches of `batch_size / samples_per_class` classes x `samples_per_class`
  images.

  Attributes:
    batch_size: global batch size B (images per step, all processes together).
    samples_per_class: m, images per class in a batch.
    classes_per_batch: B / m.
    steps_per_epoch: global steps per epoch.
    num_classes_used: classes that can appear in a batch.
  """

  def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int = 4, *, seed: int,
               with_replacement: bool = False):
    """Builds the sampler.

    Args:
      labels: int (N,) class label of every record of the source.
      batch_size: B, a multiple of `samples_per_class`.
      samples_per_class: m >= 1.
      seed: non-negative integer; the batches are a pure function of (labels, seed, step).
      with_replacement: keep classes with fewer than m images, repeating images to fill groups.

    Raises:
      ValueError: B not a multiple of m, or fewer than B / m usable classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} "
                       f"{labels.shape}")
    if samples_per_class < 1 or batch_size < 1 or batch_size % samples_per_class:
      raise ConfigError(f"batch_size {batch_size} must be a positive multiple of samples_per_class "
                       f"{samples_per_class}")
    if seed < 0:
      raise ConfigError(f"seed must be non-negative, got {seed}")
    self.batch_size = int(batch_size)
    self.samples_per_class = m = int(samples_per_class)
    self.classes_per_batch = p = self.batch_size // m
    self.seed = int(seed)
    self.with_replacement = bool(with_replacement)

    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = counts >= (1 if with_replacement else m)
    self._members = [order[s:s + c] for s, c, k in zip(starts, counts, keep) if k]
    self.num_classes_used = len(self._members)
    if self.num_classes_used < p:
      rule = "at least one image" if with_replacement else f"at least {m} images"
      raise DataError(f"A batch needs {p} distinct classes but only {self.num_classes_used} of "
                       f"{len(classes)} classes have {rule}")
    sizes = np.array([len(x) for x in self._members])
    groups = -(-sizes // m) if with_replacement else sizes // m
    # A class fits at most one group per batch; capping groups shrinks the epoch, so iterate to
    # the fixed point (monotone, so this terminates).
    steps = int(groups.sum()) // p
    while True:
      new_steps = int(np.minimum(groups, steps).sum()) // p
      if new_steps == steps:
        break
      steps = new_steps
    if steps == 0:
      raise DataError("Not enough images for a single batch")
    self._groups = np.minimum(groups, steps)
    self.steps_per_epoch = steps
    # The last two epochs' layouts: readers working ahead across an epoch boundary alternate
    # between them. Replaced whole, never mutated, so concurrent readers only ever recompute.
    self._cache: tuple[tuple[int, np.ndarray], ...] = ()

  def _epoch_layout(self, epoch: int) -> np.ndarray:
    """int64 (steps_per_epoch, B) record indices of every batch of `epoch`."""
    for cached_epoch, cached in self._cache:
      if cached_epoch == epoch:
        return cached
    m, p, steps = self.samples_per_class, self.classes_per_batch, self.steps_per_epoch
    rng = np.random.default_rng([self.seed, epoch])
    chunks = []
    for c in rng.permutation(self.num_classes_used):
      members, k = self._members[c], int(self._groups[c])
      shuffled = rng.permutation(members)
      if len(shuffled) < k * m:  # Only with replacement: complete the last group by redraws.
        extra = rng.choice(members, size=k * m - len(shuffled), replace=True)
        shuffled = np.concatenate([shuffled, extra])
      chunks.append(shuffled[:k * m])
    flat = np.concatenate(chunks)[:steps * p * m].reshape(steps * p, m)
    # Column-major fill: group g goes to row g % steps, column g // steps.
    grid = flat.reshape(p, steps, m).transpose(1, 0, 2)
    layout = grid[rng.permutation(steps)].reshape(steps, p * m).astype(np.int64)
    self._cache = (*self._cache[-1:], (epoch, layout))
    return layout

  def batch_indices(self, step: int) -> np.ndarray:
    """int64 (B,) record indices of global step `step` (epoch = step // steps_per_epoch)."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    epoch, position = divmod(int(step), self.steps_per_epoch)
    return self._epoch_layout(epoch)[position].copy()

  def record_index(self, step: int, position: int) -> int:
    """The record index at `position` (0 <= position < B) of global step `step`'s batch."""
    if step < 0 or not 0 <= position < self.batch_size:
      raise ValueError(f"step {step} must be non-negative and position {position} in "
                       f"[0, {self.batch_size})")
    epoch, row = divmod(int(step), self.steps_per_epoch)
    return int(self._epoch_layout(epoch)[row, position])

  def local_slice(self, indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous share of a global batch, class groups intact.

    Args:
      indices: (B,) a global batch from `batch_indices`.
      process_index: this process, 0 <= process_index < process_count.
      process_count: number of processes sharing the batch.

    Returns:
      (B / process_count,) the slice `[process_index * b, (process_index + 1) * b)`.

    Raises:
      ValueError: B not divisible by process_count, or the local batch not a multiple of m.
    """
    indices = np.asarray(indices)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(indices) % process_count:
      raise ConfigError(f"Global batch {len(indices)} is not divisible by process_count "
                        f"{process_count}")
    local = len(indices) // process_count
    if local % self.samples_per_class:
      raise ConfigError(f"Local batch {local} (= {len(indices)} / {process_count} processes) is "
                        f"not a multiple of samples_per_class {self.samples_per_class}: class "
                        "groups would split")
    return indices[process_index * local:(process_index + 1) * local]
