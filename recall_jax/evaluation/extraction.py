"""Embedding extraction over a dataset split: uint8 images in, L2-normalised float32 out.

Each batch is split across the devices of a 1-D mesh along its leading axis (padded to a multiple of
the device count); `embed_fn` is called on the sharded batch, so a jitted `embed_fn` runs data
parallel. Padding rows (mask False) are dropped on the host.

Serves both tasks. On several processes (`jax.distributed`) every process passes the same batches:
the mesh spans all processes' devices, each embeds its rows, and the rows are gathered back so that
every process returns the whole split, equal to what one process would return.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.numerics import l2_normalize

EmbedFn = Callable[[jax.Array], jax.Array]
Batch = Mapping[str, Any]


# Compiled once: called on every sharded batch of device outputs.
_l2_normalize = jax.jit(l2_normalize)


def _to_host(device_out: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) sharded output, on this host."""
  if isinstance(device_out, jax.Array) and not device_out.is_fully_addressable:
    # Rows embedded on other processes' devices: a collective, so every process calls it for
    # every batch, in the same order.
    return np.asarray(multihost_utils.process_allgather(device_out, tiled=True))
  return np.asarray(device_out)


def _host_batch(batch: Batch, position: int) -> tuple[np.ndarray, ...]:
  """Validated numpy (images, labels, mask, index) of one batch."""
  for key in ("image", "label"):
    if key not in batch:
      raise ValueError(f"batch {position} has no '{key}' entry (keys: {sorted(batch)})")
  images = np.asarray(batch["image"])
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"batch {position}: 'image' must be uint8 (b, H, W, C), got {images.dtype} "
                     f"{images.shape}")
  size = images.shape[0]
  labels = np.asarray(batch["label"])
  mask = np.asarray(batch.get("mask", np.ones((size,), bool)), dtype=bool)
  index = np.asarray(batch["index"]) if "index" in batch else np.full((size,), -1, np.int64)
  for key, value in (("label", labels), ("mask", mask), ("index", index)):
    if value.shape != (size,):
      raise ValueError(f"batch {position}: '{key}' must have shape ({size},), got {value.shape}")
  return images, labels.astype(np.int64), mask, index.astype(np.int64)


def extract_embeddings(embed_fn: EmbedFn, batches: Iterable[Batch], *,
                       num_examples: int | None = None, desc: str = "embedding",
                       mesh: Mesh | None = None,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds every valid example of `batches`.

  Args:
    embed_fn: maps uint8 images (b, H, W, C) to (b, D) embeddings (ideally jitted; it receives a
      batch sharded along b across `mesh`).
    batches: iterable of dicts {'image': uint8 (b, H, W, C), 'label': int (b,), 'mask': bool (b,),
      False on padding (optional, default all True), 'index': int (b,) example ids (optional,
      default -1)}.
    num_examples: expected number of valid examples, only for the progress bar's total.
    desc: progress-bar label.
    mesh: 1-D mesh to shard batches over (default: all devices).
    progress: show a tqdm progress bar.

  Returns:
    embeddings: (N, D) float32, L2-normalised; labels: (N,) int64; indices: (N,) int64, in the
    order the valid examples arrived.
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  rows = parallel.row_sharding(mesh)
  embeddings, labels, indices = [], [], []
  dim = None

  def collect(position, device_out, size, lab, mask, idx):
    nonlocal dim
    out = _to_host(device_out)
    if out.ndim != 2 or out.shape[0] < size:
      raise ValueError(f"embed_fn must return (b, D) embeddings; batch {position} of {size} images "
                       f"gave shape {out.shape}")
    if dim is not None and out.shape[1] != dim:
      raise ValueError(f"embed_fn returned dimension {out.shape[1]} for batch {position}, "
                       f"earlier batches had {dim}")
    dim = out.shape[1]
    out = out[:size][mask]
    if not np.all(np.isfinite(out)):
      raise ValueError(f"embed_fn produced NaN or infinite embeddings in batch {position}")
    embeddings.append(out)
    labels.append(lab[mask])
    indices.append(idx[mask])
    bar.update(int(mask.sum()))

  with tqdm.tqdm(total=num_examples, desc=desc, unit="img", disable=not progress) as bar:
    previous = None
    for position, batch in enumerate(batches):
      images, lab, mask, idx = _host_batch(batch, position)
      size = images.shape[0]
      padded = parallel.pad_rows(images, parallel.round_up(size, mesh.size))
      device_out = _l2_normalize(embed_fn(jax.device_put(padded, rows)))
      # Fetch the previous batch only after dispatching this one, so the device stays busy.
      if previous is not None:
        collect(*previous)
      previous = (position, device_out, size, lab, mask, idx)
    if previous is not None:
      collect(*previous)

  if not embeddings:
    raise ValueError("batches yielded no examples")
  return (np.concatenate(embeddings).astype(np.float32, copy=False), np.concatenate(labels),
          np.concatenate(indices))
