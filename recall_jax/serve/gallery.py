"""An image folder embedded once: listing, decoding that skips unreadable files, cached embeddings.

Every file under the folder (recursively) is a candidate; labels are not needed. Files that do not
decode as images (a .txt, a zero-byte file, a truncated JPEG) are skipped and counted, never fatal.
The embeddings are cached as `<cache_dir>/gallery_<fingerprint>.npz`; the fingerprint covers the
relative paths, sizes and modification times of the files, the caller's model identifier and the
image transform, so the cache is reused exactly while none of them changes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from recall_jax.data import transforms
from recall_jax.errors import ConfigError, DataError, MissingFileError
from recall_jax.evaluation import extraction

_log = logging.getLogger(__name__)

EmbedFn = Callable[[jax.Array], jax.Array]
# Decoded batches in flight ahead of the one being embedded.
_PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """The evaluation transform: resize the shorter side to `resize_size`, center crop `image_size`.

  Attributes:
    image_size: output side in pixels.
    resize_size: shorter side before the crop, >= image_size.
    channels: 1 (grayscale) or 3 (RGB).
  """

  image_size: int
  resize_size: int
  channels: int = 3

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
    if not 1 <= self.image_size <= self.resize_size:
      raise ConfigError(f"need 1 <= image_size <= resize_size, got image_size={self.image_size}, "
                        f"resize_size={self.resize_size}")


def load_image(path: str | pathlib.Path, transform: ImageTransform) -> np.ndarray:
  """Reads and transforms one image file.

  Returns:
    uint8 (image_size, image_size, channels).

  Raises:
    MissingFileError: if `path` does not exist.
    DataError: if the file cannot be read or decoded as an image.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingFileError(f"image {path} does not exist")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e}") from e
  try:
    return transforms.eval_transform(data, image_size=transform.image_size,
                                     resize_size=transform.resize_size,
                                     channels=transform.channels, record=str(path))
  except ValueError as e:
    raise DataError(str(e)) from e


def scan_files(folder: str | pathlib.Path, *,
               exclude: str | pathlib.Path | None = None) -> list[tuple[str, int, int]]:
  """Every file under `folder`, recursively (symbolic links to folders are not followed).

  Args:
    folder: the folder to scan.
    exclude: a folder whose files are left out (a cache folder inside `folder`).

  Returns:
    `(relative posix path, size in bytes, modification time in ns)` per file, sorted by path.

  Raises:
    MissingFileError: if `folder` is not a folder.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise MissingFileError(f"folder {folder} does not exist or is not a folder")
  excluded = os.path.realpath(exclude) if exclude is not None else None
  entries, pending = [], [""]
  # os.scandir rather than pathlib: one stat per file, which matters for 10^5 files.
  while pending:
    prefix = pending.pop()
    with os.scandir(os.path.join(folder, prefix)) as it:
      for entry in it:
        if entry.is_dir(follow_symlinks=False):
          if excluded is None or os.path.realpath(entry.path) != excluded:
            pending.append(f"{prefix}{entry.name}/")
        elif entry.is_file():
          stat = entry.stat()
          entries.append((f"{prefix}{entry.name}", stat.st_size, stat.st_mtime_ns))
  return sorted(entries)


def list_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """Every file under `folder`, recursively, sorted by relative path (see `scan_files`)."""
  return [pathlib.Path(folder) / relative for relative, _, _ in scan_files(folder)]


def params_fingerprint(variables: Any) -> str:
  """A hex digest of a parameter pytree's structure, shapes, dtypes and values.

  Use it as the `model_id` of `embed_gallery` when no checkpoint name identifies the parameters.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:20]


def _fingerprint(entries: Sequence[tuple[str, int, int]], model_id: str,
                 transform: ImageTransform) -> str:
  key = json.dumps([model_id, dataclasses.astuple(transform), entries])
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def _decode_or_none(path: str | pathlib.Path, transform: ImageTransform) -> np.ndarray | None:
  try:
    return load_image(path, transform)
  except DataError:
    return None


def _decoded_batches(files: Sequence[str | pathlib.Path], transform: ImageTransform,
                     batch_size: int, skipped: list[int]) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches of the decodable files (padding rows masked out); appends skipped indices.

  Decoding runs in a thread pool (PIL releases the GIL while decoding), `_PREFETCH` batches ahead
  of the one being embedded.
  """
  shape = (transform.image_size, transform.image_size, transform.channels)

  def assemble(first: int, futures: list[concurrent.futures.Future]):
    images = np.zeros((batch_size, *shape), np.uint8)
    index = np.full((batch_size,), -1, np.int64)
    kept = 0
    for offset, future in enumerate(futures):
      image = future.result()
      if image is None:
        skipped.append(first + offset)
      else:
        images[kept], index[kept] = image, first + offset
        kept += 1
    if kept:
      yield {"image": images, "label": np.zeros((batch_size,), np.int64),
             "mask": np.arange(batch_size) < kept, "index": index}

  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    pending = collections.deque()
    for start in range(0, len(files), batch_size):
      pending.append((start, [pool.submit(_decode_or_none, path, transform)
                              for path in files[start:start + batch_size]]))
      if len(pending) > _PREFETCH:
        yield from assemble(*pending.popleft())
    while pending:
      yield from assemble(*pending.popleft())


def embed_files(embed_fn: EmbedFn, files: Sequence[str | pathlib.Path],
                transform: ImageTransform, *,
                batch_size: int = 64, desc: str = "embedding",
                progress: bool = True) -> tuple[np.ndarray, list[int], list[int]]:
  """Embeds the decodable files among `files`.

  Args:
    embed_fn: uint8 (b, H, W, C) images -> (b, D) embeddings (ideally jitted); called on batches
      of exactly `batch_size` rows, so it compiles once.
    files: image files.
    transform: how files become images.
    batch_size: images per call of `embed_fn`.
    desc: progress-bar label.
    progress: show a progress bar.

  Returns:
    embeddings: (n, D) float32, L2-normalised, for the n decodable files in order;
    kept: their indices into `files`; skipped: indices of the files that did not decode.

  Raises:
    DataError: if no file decodes.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  if not files:
    raise DataError("no files to embed")
  skipped: list[int] = []
  batches = _decoded_batches(files, transform, batch_size, skipped)
  try:
    embeddings, _, kept = extraction.extract_embeddings(
        embed_fn, batches, num_examples=len(files), desc=desc, progress=progress)
  except ValueError:
    if len(skipped) == len(files):
      raise DataError(f"none of the {len(files)} files decodes as an image "
                      f"(e.g. {files[0]})") from None
    raise
  return embeddings, [int(i) for i in kept], sorted(skipped)


@dataclasses.dataclass(frozen=True)
class Gallery:
  """A folder's images and their embeddings.

  Attributes:
    root: the gallery folder as given.
    relative_paths: (n,) the embedded files, relative to `root` (posix), sorted.
    embeddings: (n, D) float32 L2-normalised, row i for `relative_paths[i]`.
    skipped: files under `root` (relative paths) that are not decodable images.
    cache_path: the .npz holding the embeddings.
    from_cache: whether they were read from `cache_path` rather than computed.
  """

  root: pathlib.Path
  relative_paths: tuple[str, ...]
  embeddings: np.ndarray
  skipped: tuple[str, ...]
  cache_path: pathlib.Path
  from_cache: bool

  def path(self, index: int) -> str:
    """The path of gallery image `index`: `root` joined with its relative path."""
    return os.path.join(self.root, self.relative_paths[index])


def _read_cache(path: pathlib.Path, root: pathlib.Path) -> Gallery | None:
  try:
    with np.load(path, allow_pickle=False) as cache:
      embeddings = cache["embeddings"]
      relative_paths = tuple(cache["paths"].tolist())
      skipped = tuple(cache["skipped"].tolist())
  except Exception as e:  # pylint: disable=broad-except
    # An unreadable cache (interrupted write by an older version, disk error) is recomputed.
    _log.warning("ignoring unreadable gallery cache %s (%s: %s)", path, type(e).__name__, e)
    return None
  if embeddings.ndim != 2 or len(embeddings) != len(relative_paths):
    _log.warning("ignoring inconsistent gallery cache %s", path)
    return None
  return Gallery(root, relative_paths, embeddings, skipped, path, from_cache=True)


def _write_cache(path: pathlib.Path, gallery: Gallery) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written beside and renamed, so an interrupted run never leaves a truncated cache.
  partial = path.with_name(path.name + ".partial.npz")
  np.savez(partial, embeddings=gallery.embeddings,
           paths=np.array(gallery.relative_paths, dtype=str),
           skipped=np.array(gallery.skipped, dtype=str))
  os.replace(partial, path)


def embed_gallery(embed_fn: EmbedFn, gallery_dir: str | pathlib.Path, *, model_id: str,
                  transform: ImageTransform, cache_dir: str | pathlib.Path,
                  batch_size: int = 64, progress: bool = True) -> Gallery:
  """Embeds every image under `gallery_dir`, or reads the embeddings cached for it.

  Args:
    embed_fn: uint8 (b, H, W, C) images -> (b, D) embeddings (ideally jitted).
    gallery_dir: the folder of images (any layout, any depth).
    model_id: identifies the parameters behind `embed_fn` (a checkpoint path and step, or
      `params_fingerprint(variables)`): a different model never reuses a cache.
    transform: how files become images.
    cache_dir: where `gallery_<fingerprint>.npz` is kept (if it lies inside `gallery_dir`, its
      files are not part of the gallery).
    batch_size: images per call of `embed_fn`.
    progress: show a progress bar while embedding.

  Returns:
    A `Gallery`.

  Raises:
    MissingFileError: if `gallery_dir` does not exist.
    DataError: if it holds no decodable image.
  """
  if not model_id:
    raise ValueError("model_id must identify the model's parameters, got an empty string")
  root = pathlib.Path(gallery_dir)
  if not root.is_dir():
    raise MissingFileError(f"gallery folder {root} does not exist or is not a folder")
  cache_dir = pathlib.Path(cache_dir)
  entries = scan_files(root, exclude=cache_dir)
  if not entries:
    raise DataError(f"gallery folder {root} holds no files")
  cache_path = cache_dir / f"gallery_{_fingerprint(entries, model_id, transform)}.npz"
  if cache_path.is_file():
    cached = _read_cache(cache_path, root)
    if cached is not None:
      _log.info("gallery %s: %d embeddings read from %s", root, len(cached.relative_paths),
                cache_path)
      return cached
  relative = [relative for relative, _, _ in entries]
  embeddings, kept, skipped = embed_files(embed_fn, [os.path.join(root, r) for r in relative],
                                          transform, batch_size=batch_size,
                                          desc=f"embedding {root}", progress=progress)
  gallery = Gallery(root, tuple(relative[i] for i in kept), embeddings,
                    tuple(relative[i] for i in skipped), cache_path, from_cache=False)
  if skipped:
    _log.warning("gallery %s: skipped %d of %d files that are not decodable images (%s%s)", root,
                 len(skipped), len(entries), ", ".join(gallery.skipped[:5]),
                 ", ..." if len(skipped) > 5 else "")
  _write_cache(cache_path, gallery)
  return gallery
