"""Embeddings of a large, fixed image set (the R1M distractors) computed once and kept on disk.

The embeddings are written chunk by chunk into a `.npy` file (never held whole in memory: R1M at
2,048 dimensions is 8.2 GB) and opened memory-mapped, which is what `revisited_metrics` reads in
blocks. A JSON sidecar records the fingerprint of what produced them (model, weights, image size:
whatever the caller puts in it) and the SHA-256 of the `.npy` file, as a checkpoint's manifest
does; a cache is reused only when the fingerprint and the size match, the file was completed and its
bytes still match the checksum, so an interrupted, outdated or altered cache is recomputed (an
altered one saying so), never used. Checking costs one read of the file per use (seconds per GB).

Instance-level task (revisited Oxford/Paris with the R1M distractors).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tqdm
from jax.sharding import Mesh

from recall_jax.errors import DataError
from recall_jax.evaluation import extraction


def _sidecar(path: pathlib.Path) -> pathlib.Path:
  return path.with_suffix(".json")


def _sha256(path: pathlib.Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _cached(path: pathlib.Path, fingerprint: str, num_examples: int,
            log_fn: Callable[[str], Any] | None) -> np.ndarray | None:
  try:
    meta = json.loads(_sidecar(path).read_text())
    if (not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint
        or meta.get("num_examples") != num_examples):
      return None
    if _sha256(path) != meta.get("sha256"):
      if log_fn is not None and "sha256" in meta:
        log_fn(f"{path}: its bytes do not match the checksum recorded when it was written "
               "(altered since): computing the embeddings again")
      return None
    embeddings = np.load(path, mmap_mode="r")
  except (OSError, ValueError):
    return None
  return embeddings if embeddings.shape == (num_examples, meta.get("dim")) else None


def cached_embeddings(path: str | os.PathLike[str], embed_fn: extraction.EmbedFn,
                      make_batches: Callable[[], Iterable[extraction.Batch]], *,
                      num_examples: int, fingerprint: str, batches_per_chunk: int = 64,
                      mesh: Mesh | None = None, progress: bool = True,
                      log_fn: Callable[[str], Any] | None = print) -> np.ndarray:
  """The L2-normalised embeddings of every example, from the cache or computed and cached.

  Args:
    path: the `.npy` cache file (its `.json` sidecar goes beside it).
    embed_fn: as for `extract_embeddings`.
    make_batches: returns the batches (e.g. `make_eval_loader` over a `DistractorSource`); called
      only when the cache is missing or stale. Batches carry 'index' (the example's row), or rows
      are filled in arrival order.
    num_examples: the number of examples (rows of the cache).
    fingerprint: identifies what produces the embeddings; a different value recomputes them.
    batches_per_chunk: batches embedded between two writes to the file.
    mesh: 1-D device mesh (default: all devices).
    progress: show a progress bar.
    log_fn: told when a cache is recomputed because its bytes were altered (None: silent).

  Returns:
    (num_examples, D) float32 read-only memory-mapped array.

  Raises:
    DataError: the batches did not cover every row exactly once.
  """
  path = pathlib.Path(path)
  cached = _cached(path, fingerprint, num_examples, log_fn)
  if cached is not None:
    return cached
  path.parent.mkdir(parents=True, exist_ok=True)
  partial_path = path.with_name(path.name + ".partial")
  embeddings = None
  written = np.zeros(num_examples, bool)
  arrived = 0
  batches = iter(make_batches())
  with tqdm.tqdm(total=num_examples, desc=f"embed {path.stem}", unit="img",
                 disable=not progress) as bar:
    while chunk := list(itertools.islice(batches, batches_per_chunk)):
      values, _, indices = extraction.extract_embeddings(embed_fn, chunk, mesh=mesh,
                                                         progress=False)
      if embeddings is None:
        embeddings = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float32,
                                               shape=(num_examples, values.shape[1]))
      rows = np.where(indices >= 0, indices, arrived + np.arange(indices.size))
      if rows.size and (rows.min() < 0 or rows.max() >= num_examples or written[rows].any()
                        or np.unique(rows).size != rows.size):
        raise DataError(f"{path}: batches gave rows outside [0, {num_examples}) or a row twice")
      embeddings[rows] = values
      written[rows] = True
      arrived += rows.size
      bar.update(rows.size)
  if embeddings is None or not written.all():
    raise DataError(f"{path}: the batches covered {int(written.sum())} of {num_examples} rows")
  dim = embeddings.shape[1]
  embeddings.flush()
  del embeddings
  os.replace(partial_path, path)
  sidecar = _sidecar(path)
  sidecar.with_name(sidecar.name + ".partial").write_text(json.dumps(
      {"fingerprint": fingerprint, "num_examples": num_examples, "dim": dim,
       "sha256": _sha256(path)}))
  os.replace(sidecar.with_name(sidecar.name + ".partial"), sidecar)
  return np.load(path, mmap_mode="r")
