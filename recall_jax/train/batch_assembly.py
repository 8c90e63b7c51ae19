"""Batch assembly: this process's slice of a training batch -> global arrays over the data mesh.

Serves both tasks: `global_batch` for square crops (one image array), `global_bucketed_batch`
for whole images in aspect buckets (instance-level). Each process feeds only its contiguous
slice of the global batch (the sampler's `local_slice`); the global arrays are sharded along
their leading axis (`recall_jax.parallel.row_sharding`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.data import bucket_plan
from recall_jax.train import megabatch


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's contiguous slice of every array into global arrays.

  Args:
    local_batch: name -> (b, ...) NumPy arrays, rows `[p * b, (p + 1) * b)` of the global batch
      for process p (`MPerClassSampler.local_slice`), e.g. {'image': uint8, 'label': int32}.
    mesh: the data mesh; its devices on this process receive the slice, split evenly.

  Returns:
    name -> global (b * process_count, ...) `jax.Array` sharded along the leading axis.

  Raises:
    ValueError: arrays of different lengths, or a length that does not split over this
      process's devices.
  """
  sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local_batch.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"every batch array needs the same leading axis, got lengths {sizes}")
  (local_size,) = set(sizes.values())
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if local_size % local_devices:
    raise ValueError(f"local batch of {local_size} rows does not split over this process's "
                     f"{local_devices} devices")
  sharding = parallel.row_sharding(mesh)
  global_size = local_size * (mesh.devices.size // local_devices)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (global_size,) + np.shape(v)[1:]) for k, v in local_batch.items()}


def global_bucketed_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """`global_batch` for whole images in aspect buckets (`data.make_bucketed_train_loader`).

  On several processes, the processes first agree on each bucket's slot count (the largest any
  of them needs this step; usually all equal the plan), and pad theirs with empty slots, so the
  global bucket arrays have one shape. Each row's (bucket, position) then becomes its index in
  the concatenation of the global bucket arrays (`data.flat_slots`).

  Args:
    local_batch: {'image': `data.BucketedImages` of this process's rows, 'label': int32 (b,)}.
    mesh: the data mesh.

  Returns:
    {'image': `megabatch.BucketedBatch` of global arrays (buckets sharded along their slots,
    slots along the rows), 'label': global (B,) labels}.
  """
  images = local_batch["image"]
  capacities = tuple(len(b) for b in images.buckets)
  if jax.process_count() > 1:
    agreed = multihost_utils.process_allgather(np.asarray(capacities, np.int64))
    capacities = tuple(int(c) for c in np.max(np.asarray(agreed).reshape(-1, len(capacities)),
                                              axis=0))
    images = bucket_plan.pad_buckets(images, capacities)
  slots = bucket_plan.flat_slots(images.bucket, images.position, capacities,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  rows = global_batch({"slots": slots, "label": local_batch["label"]}, mesh)
  buckets = tuple(global_batch({"bucket": b}, mesh)["bucket"] for b in images.buckets)
  return {"image": megabatch.BucketedBatch(buckets, rows["slots"]), "label": rows["label"]}
