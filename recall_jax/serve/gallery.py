"""An image folder embedded once: listing, decoding that skips unreadable files, cached embeddings.

Serves both tasks (any model's evaluation transform). Every file under the folder (recursively) is
a candidate; labels are not needed. Files that do not decode as images (a .txt, a zero-byte file, a
truncated JPEG, an image over the decoded-pixel limit) and entries that cannot be read (a folder
without permission, a symbolic link loop) are skipped and counted, never fatal. A file's format is
identified from its header before it is read whole, so a large non-image costs a few kilobytes.

The embeddings are cached as `<cache_dir>/gallery_<fingerprint>.npz`; the fingerprint covers the
relative paths, sizes and modification times of the files, the caller's model identifier and the
image transform, so the cache is reused exactly while none of them changes. Read failures are not
results: a cache whose unreadable entries have become readable is recomputed. The cache is written
under a unique temporary name and renamed, so concurrent searches of one gallery never collide.
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
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import PIL.Image

from recall_jax.data import transforms
from recall_jax.errors import ConfigError, DataError, MissingFileError
from recall_jax.evaluation import extraction

_log = logging.getLogger(__name__)

EmbedFn = Callable[[jax.Array], jax.Array]
# Decoded batches in flight ahead of the one being embedded.
_PREFETCH = 2
# Bytes held by the images being decoded at once (encoded + decoded), across the decoding threads
# (one larger image still runs, alone): bounds memory whatever the number of cores.
_MAX_BYTES_IN_FLIGHT = 256 << 20


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """The evaluation transform: resize the shorter side to `resize_size`, center crop `image_size`.

  Attributes:
    image_size: output side in pixels.
    resize_size: shorter side before the crop, >= image_size.
    channels: 1 (grayscale) or 3 (RGB).
    max_pixels: images with more decoded pixels (width * height) are skipped, not decoded.
  """

  image_size: int
  resize_size: int
  channels: int = 3
  max_pixels: int = transforms.DEFAULT_MAX_PIXELS

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
    if not 1 <= self.image_size <= self.resize_size:
      raise ConfigError(f"need 1 <= image_size <= resize_size, got image_size={self.image_size}, "
                        f"resize_size={self.resize_size}")
    if self.max_pixels < 1:
      raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")


class _ByteBudget:
  """At most `limit` bytes held at once by the threads that `acquire` them (one larger request
  runs alone)."""

  def __init__(self, limit: int):
    self._limit, self._held = limit, 0
    self._free = threading.Condition()

  def acquire(self, size: int) -> int:
    size = min(size, self._limit)
    with self._free:
      self._free.wait_for(lambda: self._held + size <= self._limit)
      self._held += size
    return size

  def release(self, size: int) -> None:
    with self._free:
      self._held -= size
      self._free.notify_all()


class _ReadError(DataError):
  """The file could not be read (permissions, I/O), whatever its contents."""


def load_image(path: str | pathlib.Path, transform: ImageTransform, *,
               budget: _ByteBudget | None = None) -> np.ndarray:
  """Reads and transforms one image file, identifying its format from the header first.

  Args:
    path: the image file.
    transform: how the file becomes an image.
    budget: bounds the bytes held at once with other threads (None: unbounded).

  Returns:
    uint8 (image_size, image_size, channels).

  Raises:
    MissingFileError: if `path` does not exist.
    DataError: if the file cannot be read, is not an image PIL identifies from its header, has
      more than `transform.max_pixels` pixels, or does not decode.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingFileError(f"image {path} does not exist")
  try:
    with open(path, "rb") as f:
      # PIL reads only the header to identify the format and the size.
      try:
        with PIL.Image.open(f) as header:
          width, height = header.size
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"{path} is not an image ({type(e).__name__})") from e
      if width * height > transform.max_pixels:
        raise DataError(f"{path} has {width} x {height} pixels, more than the limit of "
                        f"{transform.max_pixels} (data.max_image_pixels)")
      # The encoded bytes plus the decoded pixels at 4 bytes each (RGBA, the widest mode): what
      # the decode holds at its peak, before the resize.
      size = os.fstat(f.fileno()).st_size + 4 * width * height
      held = budget.acquire(size) if budget is not None else 0
      try:
        f.seek(0)
        data = f.read()
        return transforms.eval_transform(data, image_size=transform.image_size,
                                         resize_size=transform.resize_size,
                                         channels=transform.channels, record=str(path),
                                         max_pixels=transform.max_pixels)
      finally:
        if budget is not None:
          budget.release(held)
  except OSError as e:
    raise _ReadError(f"cannot read {path}: {e}") from e
  except ValueError as e:
    if isinstance(e, DataError):
      raise
    raise DataError(str(e)) from e


def scan_files(folder: str | pathlib.Path, *, exclude: str | pathlib.Path | None = None,
               unreadable: list[str] | None = None) -> list[tuple[str, int, int]]:
  """Every file under `folder`, recursively (symbolic links to folders are not followed).

  Args:
    folder: the folder to scan.
    exclude: a folder whose files are left out (a cache folder inside `folder`).
    unreadable: if given, receives the relative paths of the entries that cannot be listed or
      stat'ed (a subfolder without permission, ending in "/"; a symbolic link loop); they are
      skipped either way.

  Returns:
    `(relative posix path, size in bytes, modification time in ns)` per file, sorted by path.

  Raises:
    MissingFileError: if `folder` is not a folder.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise MissingFileError(f"folder {folder} does not exist or is not a folder")
  excluded = os.path.realpath(exclude) if exclude is not None else None
  unreadable = [] if unreadable is None else unreadable
  entries, pending = [], [""]
  # os.scandir rather than pathlib: one stat per file, which matters for 10^5 files.
  while pending:
    prefix = pending.pop()
    try:
      with os.scandir(os.path.join(folder, prefix)) as it:
        listed = list(it)
    except OSError as e:
      if not prefix:
        raise MissingFileError(f"cannot list folder {folder}: {e.strerror}") from e
      unreadable.append(prefix)
      continue
    for entry in listed:
      relative = f"{prefix}{entry.name}"
      try:
        if entry.is_dir(follow_symlinks=False):
          if excluded is None or os.path.realpath(entry.path) != excluded:
            pending.append(f"{relative}/")
        elif entry.is_file():
          stat = entry.stat()
          entries.append((relative, stat.st_size, stat.st_mtime_ns))
        elif entry.is_symlink() and not os.path.exists(entry.path):
          # A dangling link or a loop (ELOOP): nothing to read.
          unreadable.append(relative)
      except OSError:
        unreadable.append(relative)
  unreadable.sort()
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


# Why a file was skipped: its bytes are not a usable image (a property of the file's contents,
# cached with them) or it could not be read (permissions, I/O: may change without a new mtime).
_UNDECODABLE, _UNREADABLE = "undecodable", "unreadable"


def _decode_or_reason(path: str | pathlib.Path, transform: ImageTransform,
                      budget: _ByteBudget) -> np.ndarray | str:
  try:
    return load_image(path, transform, budget=budget)
  except (_ReadError, MissingFileError):  # MissingFileError: removed since the scan.
    return _UNREADABLE
  except DataError:
    return _UNDECODABLE


def _decoded_batches(files: Sequence[str | pathlib.Path], transform: ImageTransform,
                     batch_size: int, skipped: list[int],
                     unreadable: list[int]) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches of the decodable files (padding rows masked out); appends the indices of
  the skipped files to `skipped`, and of those among them that could not be read to `unreadable`.

  Decoding runs in a thread pool (PIL releases the GIL while decoding), `_PREFETCH` batches ahead
  of the one being embedded, with at most `_MAX_BYTES_IN_FLIGHT` bytes (encoded and decoded) held
  by the images being decoded at once.
  """
  shape = (transform.image_size, transform.image_size, transform.channels)
  budget = _ByteBudget(_MAX_BYTES_IN_FLIGHT)

  def assemble(first: int, futures: list[concurrent.futures.Future]):
    images = np.zeros((batch_size, *shape), np.uint8)
    index = np.full((batch_size,), -1, np.int64)
    kept = 0
    for offset, future in enumerate(futures):
      image = future.result()
      if isinstance(image, str):
        skipped.append(first + offset)
        if image == _UNREADABLE:
          unreadable.append(first + offset)
      else:
        images[kept], index[kept] = image, first + offset
        kept += 1
    if kept:
      yield {"image": images, "label": np.zeros((batch_size,), np.int64),
             "mask": np.arange(batch_size) < kept, "index": index}

  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    pending = collections.deque()
    for start in range(0, len(files), batch_size):
      pending.append((start, [pool.submit(_decode_or_reason, path, transform, budget)
                              for path in files[start:start + batch_size]]))
      if len(pending) > _PREFETCH:
        yield from assemble(*pending.popleft())
    while pending:
      yield from assemble(*pending.popleft())


def embed_files(embed_fn: EmbedFn, files: Sequence[str | pathlib.Path],
                transform: ImageTransform, *,
                batch_size: int = 64, desc: str = "embedding", progress: bool = True,
                unreadable: list[int] | None = None) -> tuple[np.ndarray, list[int], list[int]]:
  """Embeds the decodable files among `files`.

  Args:
    embed_fn: uint8 (b, H, W, C) images -> (b, D) embeddings (ideally jitted); called on batches
      of exactly `batch_size` rows, so it compiles once.
    files: image files.
    transform: how files become images.
    batch_size: images per call of `embed_fn`.
    desc: progress-bar label.
    progress: show a progress bar.
    unreadable: if given, receives the indices of the skipped files that could not be read (as
      opposed to read but not decodable), sorted.

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
  unreadable = [] if unreadable is None else unreadable
  batches = _decoded_batches(files, transform, batch_size, skipped, unreadable)
  try:
    embeddings, _, kept = extraction.extract_embeddings(
        embed_fn, batches, num_examples=len(files), desc=desc, progress=progress)
  except ValueError:
    if len(skipped) == len(files):
      raise DataError(f"none of the {len(files)} files decodes as an image "
                      f"(e.g. {files[0]})") from None
    raise
  unreadable.sort()
  return embeddings, [int(i) for i in kept], sorted(skipped)


@dataclasses.dataclass(frozen=True)
class Gallery:
  """A folder's images and their embeddings.

  Attributes:
    root: the gallery folder as given.
    relative_paths: (n,) the embedded files, relative to `root` (posix), sorted.
    embeddings: (n, D) float32 L2-normalised, row i for `relative_paths[i]`.
    skipped: entries under `root` (relative paths) that are not decodable images or cannot be
      read (folders among them end in "/").
    unreadable: those of `skipped` that could not be read (not cached as a property of the file:
      retried once they become readable).
    cache_path: the .npz holding the embeddings.
    from_cache: whether they were read from `cache_path` rather than computed.
  """

  root: pathlib.Path
  relative_paths: tuple[str, ...]
  embeddings: np.ndarray
  skipped: tuple[str, ...]
  cache_path: pathlib.Path
  from_cache: bool
  unreadable: tuple[str, ...] = ()

  def path(self, index: int) -> str:
    """The path of gallery image `index`: `root` joined with its relative path."""
    return os.path.join(self.root, self.relative_paths[index])


def _read_cache(path: pathlib.Path, root: pathlib.Path) -> Gallery | None:
  try:
    with np.load(path, allow_pickle=False) as cache:
      embeddings = cache["embeddings"]
      relative_paths = tuple(cache["paths"].tolist())
      skipped = tuple(cache["skipped"].tolist())
      unreadable = tuple(cache["unreadable"].tolist())
  except Exception as e:  # pylint: disable=broad-except
    # An unreadable cache (interrupted write by an older version, disk error) is recomputed.
    _log.warning("ignoring unreadable gallery cache %s (%s: %s)", path, type(e).__name__, e)
    return None
  if embeddings.ndim != 2 or len(embeddings) != len(relative_paths):
    _log.warning("ignoring inconsistent gallery cache %s", path)
    return None
  return Gallery(root, relative_paths, embeddings, skipped, path, from_cache=True,
                 unreadable=unreadable)


def _write_cache(path: pathlib.Path, gallery: Gallery) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written beside under a name of its own and renamed: an interrupted run never leaves a truncated
  # cache, and concurrent searches of the same gallery never write or rename each other's file.
  fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, embeddings=gallery.embeddings,
               paths=np.array(gallery.relative_paths, dtype=str),
               skipped=np.array(gallery.skipped, dtype=str),
               unreadable=np.array(gallery.unreadable, dtype=str))
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _became_readable(root: pathlib.Path, unreadable: Sequence[str]) -> bool:
  return any(os.access(os.path.join(root, relative), os.R_OK) for relative in unreadable)


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
  unlisted: list[str] = []
  entries = scan_files(root, exclude=cache_dir, unreadable=unlisted)
  if not entries:
    raise DataError(f"gallery folder {root} holds no files")
  cache_path = cache_dir / f"gallery_{_fingerprint(entries, model_id, transform)}.npz"
  if cache_path.is_file():
    cached = _read_cache(cache_path, root)
    if cached is not None and _became_readable(root, cached.unreadable):
      _log.info("gallery %s: entries that could not be read are now readable; embedding again",
                root)
    elif cached is not None:
      _log.info("gallery %s: %d embeddings read from %s", root, len(cached.relative_paths),
                cache_path)
      return cached
  relative = [relative for relative, _, _ in entries]
  unread: list[int] = []
  embeddings, kept, skipped = embed_files(embed_fn, [os.path.join(root, r) for r in relative],
                                          transform, batch_size=batch_size,
                                          desc=f"embedding {root}", progress=progress,
                                          unreadable=unread)
  unreadable = tuple(sorted(unlisted + [relative[i] for i in unread]))
  gallery = Gallery(root, tuple(relative[i] for i in kept), embeddings,
                    tuple(sorted(unlisted + [relative[i] for i in skipped])), cache_path,
                    from_cache=False, unreadable=unreadable)
  if gallery.skipped:
    _log.warning("gallery %s: skipped %d entries that are not decodable images or cannot be read "
                 "(%s%s)", root, len(gallery.skipped), ", ".join(gallery.skipped[:5]),
                 ", ..." if len(gallery.skipped) > 5 else "")
  _write_cache(cache_path, gallery)
  return gallery
