"""The 1-D device mesh shared by training and evaluation, its shardings and row padding.

Serves both tasks. Both are data parallel only: training splits the mega-batch's rows over the
`data` axis (`recall_jax.train.sharded_step`); evaluation replicates the database and splits the
rows it processes (queries for k-NN and metrics, examples for embedding extraction).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices) with the single axis `DATA_AXIS`.

  The axis type is `Auto` on purpose: `jax.make_mesh` defaults to `Explicit` axes, which would
  change how sharded arrays type-check inside user `embed_fn`s.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading axis across the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def round_up(value: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= `value`."""
  return -(-value // multiple) * multiple


def pad_rows(array: np.ndarray, rows: int, fill=0) -> np.ndarray:
  """Pads the leading axis of `array` to `rows` with `fill` (no copy when already that long)."""
  missing = rows - array.shape[0]
  if missing < 0:
    raise ValueError(f"cannot pad {array.shape[0]} rows down to {rows}")
  if missing == 0:
    return array
  padding = np.full((missing,) + array.shape[1:], fill, dtype=array.dtype)
  return np.concatenate([array, padding], axis=0)
