"""Gallery embedding and its cache (`recall_jax.serve.gallery`)."""

from __future__ import annotations

import builtins
import io
import os
import pathlib
import threading
import time

import chex
import jax
import numpy as np
import PIL.Image
import pytest

from recall_jax.data import transforms
from recall_jax.errors import ConfigError, DataError, MissingFileError
from recall_jax.serve import gallery as gallery_lib

# The transform of conftest's `embedder` (a small CNN initialised at 28 px).
TRANSFORM = gallery_lib.ImageTransform(image_size=28, resize_size=32, channels=3)


def _reference_embeddings(embedder, paths):
  images = np.stack([transforms.eval_transform(p.read_bytes(), image_size=TRANSFORM.image_size,
                                               resize_size=TRANSFORM.resize_size, channels=3)
                     for p in paths])
  out = np.asarray(embedder.apply(images), np.float64)
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_embeds_every_image_and_skips_undecodable_files(tmp_path, embedder, make_gallery,
                                                        make_bad_files):
  images = make_gallery(tmp_path / "gallery")
  bad = make_bad_files(tmp_path / "gallery" / "group1")
  gallery = gallery_lib.embed_gallery(embedder, tmp_path / "gallery", model_id="m0",
                                      transform=TRANSFORM, cache_dir=tmp_path / "cache",
                                      batch_size=5, progress=False)

  def relative(paths):
    return [p.relative_to(tmp_path / "gallery").as_posix() for p in paths]

  assert list(gallery.relative_paths) == sorted(relative(images))
  assert sorted(gallery.skipped) == sorted(relative(bad))
  assert not gallery.from_cache
  paths = [pathlib.Path(gallery.path(i)) for i in range(len(gallery.relative_paths))]
  assert set(paths) == set(images)
  chex.assert_trees_all_close(gallery.embeddings, _reference_embeddings(embedder, paths),
                              atol=1e-5, rtol=0)


def test_cache_is_reused_while_folder_and_model_are_unchanged(tmp_path, embedder, make_gallery):
  root = tmp_path / "gallery"
  make_gallery(root, num_images=6)

  def embed(model_id):
    return gallery_lib.embed_gallery(embedder, root, model_id=model_id, transform=TRANSFORM,
                                     cache_dir=tmp_path / "cache", batch_size=4, progress=False)

  first = embed("m0")
  seen = embedder.images_seen
  second = embed("m0")
  assert second.from_cache and second.cache_path == first.cache_path
  assert embedder.images_seen == seen  # nothing embedded
  assert second.relative_paths == first.relative_paths
  np.testing.assert_array_equal(second.embeddings, first.embeddings)

  assert not embed("another checkpoint").from_cache
  # A touched file (new modification time) or a new file invalidates the cache.
  image = pathlib.Path(first.path(0))
  stat = image.stat()
  os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  touched = embed("m0")
  assert not touched.from_cache and touched.cache_path != first.cache_path
  (root / "new.png").write_bytes(image.read_bytes())
  grown = embed("m0")
  assert not grown.from_cache and len(grown.relative_paths) == 7


def test_cache_folder_inside_the_gallery_is_not_part_of_it(tmp_path, embedder, make_gallery):
  root = tmp_path / "gallery"
  make_gallery(root, num_images=3)
  for _ in range(2):
    gallery = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                        cache_dir=root / ".cache", progress=False)
  assert gallery.from_cache and len(gallery.relative_paths) == 3 and not gallery.skipped


def test_unusable_galleries(tmp_path, embedder, make_bad_files):
  options = dict(model_id="m0", transform=TRANSFORM, cache_dir=tmp_path / "cache", progress=False)
  with pytest.raises(MissingFileError, match="does not exist"):
    gallery_lib.embed_gallery(embedder, tmp_path / "missing", **options)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no files"):
    gallery_lib.embed_gallery(embedder, tmp_path / "empty", **options)
  make_bad_files(tmp_path / "bad")
  with pytest.raises(DataError, match="none of the 3 files decodes"):
    gallery_lib.embed_gallery(embedder, tmp_path / "bad", **options)


def test_load_image_errors(tmp_path, make_bad_files):
  bad = make_bad_files(tmp_path)
  for path in bad:
    with pytest.raises(DataError):
      gallery_lib.load_image(path, TRANSFORM)
  with pytest.raises(MissingFileError):
    gallery_lib.load_image(tmp_path / "missing.png", TRANSFORM)


def test_bad_transform():
  with pytest.raises(ConfigError, match="channels"):
    gallery_lib.ImageTransform(28, 32, 2)
  with pytest.raises(ConfigError, match="image_size <= resize_size"):
    gallery_lib.ImageTransform(40, 32, 3)


def test_params_fingerprint_tracks_values(embedder):
  variables = embedder.variables
  same = jax.tree.map(np.array, variables)
  assert gallery_lib.params_fingerprint(variables) == gallery_lib.params_fingerprint(same)
  leaves, treedef = jax.tree.flatten(same)
  leaves[0] = leaves[0].copy()
  leaves[0].flat[0] += 1e-3
  changed = jax.tree.unflatten(treedef, leaves)
  assert gallery_lib.params_fingerprint(variables) != gallery_lib.params_fingerprint(changed)


def test_concurrent_writers_of_one_cache_both_succeed(tmp_path, embedder, make_gallery,
                                                      monkeypatch):
  # Another search of the same gallery writes and renames its cache between this one's write and
  # rename: each must rename its own temporary file.
  root = tmp_path / "gallery"
  make_gallery(root, num_images=3)
  real_replace = os.replace
  interleaved = []

  def replace_after_another_writer(src, dst):
    if not interleaved:
      interleaved.append(dst)
      with np.load(src) as mine:
        other = gallery_lib.Gallery(root, tuple(mine["paths"].tolist()), mine["embeddings"],
                                    (), pathlib.Path(dst), from_cache=False)
      gallery_lib._write_cache(pathlib.Path(dst), other)  # pylint: disable=protected-access
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace_after_another_writer)
  gallery = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                      cache_dir=tmp_path / "cache", progress=False)
  monkeypatch.undo()
  assert interleaved == [gallery.cache_path]
  again = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                    cache_dir=tmp_path / "cache", progress=False)
  assert again.from_cache and again.relative_paths == gallery.relative_paths
  assert [p.name for p in (tmp_path / "cache").iterdir()] == [gallery.cache_path.name]


def test_symlink_loop_and_unlisted_folder_are_skipped_and_counted(tmp_path, embedder,
                                                                  make_gallery, monkeypatch):
  root = tmp_path / "gallery"
  images = make_gallery(root, num_images=4)
  (root / "loop.jpg").symlink_to("loop.jpg")
  (root / "dangling.png").symlink_to("nowhere.png")
  locked = root / "locked"
  locked.mkdir()
  (locked / "hidden.png").write_bytes(images[0].read_bytes())
  real_scandir = os.scandir

  def scandir_without_permission(path="."):
    # chmod 000 does not stop root, so the refusal is made here.
    if pathlib.Path(path).name == "locked":
      raise PermissionError(13, "Permission denied", str(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir_without_permission)
  gallery = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                      cache_dir=tmp_path / "cache", progress=False)
  assert len(gallery.relative_paths) == 4
  assert gallery.skipped == ("dangling.png", "locked/", "loop.jpg")
  assert gallery.unreadable == gallery.skipped


def test_a_read_failure_is_retried_once_the_file_is_readable(tmp_path, embedder, make_gallery,
                                                             monkeypatch):
  root = tmp_path / "gallery"
  images = make_gallery(root, num_images=3)
  locked = str(images[1])
  real_open = builtins.open

  def open_without_permission(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file) == locked:
      raise PermissionError(13, "Permission denied", locked)
    return real_open(file, *args, **kwargs)

  def embed():
    return gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                     cache_dir=tmp_path / "cache", progress=False)

  with monkeypatch.context() as patch:
    patch.setattr(builtins, "open", open_without_permission)
    patch.setattr(io, "open", open_without_permission)  # what pathlib reads with
    first = embed()
  relative = images[1].relative_to(root).as_posix()
  assert first.skipped == (relative,)
  second = embed()  # same sizes and times: only the permission changed
  assert relative in second.relative_paths and not second.skipped
  assert not second.from_cache
  assert embed().from_cache
  assert first.unreadable == (relative,)


def _bytes_read() -> int:
  for line in pathlib.Path("/proc/self/io").read_text().splitlines():
    if line.startswith("rchar:"):
      return int(line.split()[1])
  raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_large_non_image_is_rejected_from_its_header(tmp_path):
  big = tmp_path / "video.jpg"
  with open(big, "wb") as f:
    f.write(b"\x00\x01not an image" * 1000)
    f.truncate(64 << 20)
  before = _bytes_read()
  with pytest.raises(DataError):
    gallery_lib.load_image(big, TRANSFORM)
  assert _bytes_read() - before < (1 << 20)


def test_images_over_the_pixel_limit_are_skipped(tmp_path, embedder, make_gallery):
  root = tmp_path / "gallery"
  make_gallery(root, num_images=2)  # 40 x 48 images
  (root / "huge.png").write_bytes(_png((100, 60)))
  small_limit = gallery_lib.ImageTransform(28, 32, 3, max_pixels=100 * 59)
  gallery = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=small_limit,
                                      cache_dir=tmp_path / "cache", progress=False)
  assert gallery.skipped == ("huge.png",) and len(gallery.relative_paths) == 2
  with pytest.raises(DataError, match="100 x 60 pixels, more than the limit of 5900"):
    gallery_lib.load_image(root / "huge.png", small_limit)
  with pytest.raises(ConfigError, match="max_pixels"):
    gallery_lib.ImageTransform(28, 32, 3, max_pixels=0)


def _png(size: tuple[int, int]) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_bytes_in_flight_are_bounded(tmp_path, embedder, make_gallery, monkeypatch):
  root = tmp_path / "gallery"
  paths = make_gallery(root, num_images=12)
  decoded = 4 * 40 * 48  # conftest's images, at 4 bytes per pixel
  largest = max(p.stat().st_size for p in paths) + decoded
  limit = 2 * largest
  monkeypatch.setattr(gallery_lib, "_MAX_BYTES_IN_FLIGHT", limit)
  monkeypatch.setattr(os, "cpu_count", lambda: 6)  # more decoding threads than the budget allows
  lock, in_flight, peaks = threading.Lock(), [0], []
  real_transform = transforms.eval_transform

  def slow_transform(data, **kwargs):
    with lock:
      in_flight[0] += len(data) + decoded
      peaks.append(in_flight[0])
    time.sleep(0.02)  # long enough for the other threads to pile up
    try:
      return real_transform(data, **kwargs)
    finally:
      with lock:
        in_flight[0] -= len(data) + decoded

  monkeypatch.setattr(transforms, "eval_transform", slow_transform)
  gallery = gallery_lib.embed_gallery(embedder, root, model_id="m0", transform=TRANSFORM,
                                      cache_dir=tmp_path / "cache", batch_size=6, progress=False)
  assert len(gallery.relative_paths) == 12
  assert max(peaks) <= limit
  assert max(peaks) > largest  # decoding still runs in parallel

