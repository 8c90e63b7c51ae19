"""Gallery embedding and its cache (`recall_jax.serve.gallery`)."""

from __future__ import annotations

import os
import pathlib

import chex
import jax
import numpy as np
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
