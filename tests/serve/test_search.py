"""Searching a gallery folder (`recall_jax.serve.search`) against brute-force similarities."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from recall_jax.errors import DataError, MissingFileError
from recall_jax.serve import gallery as gallery_lib
from recall_jax.serve import search as search_lib

# The transform of conftest's `embedder` (a small CNN initialised at 28 px).
TRANSFORM = gallery_lib.ImageTransform(image_size=28, resize_size=32, channels=3)
OPTIONS = dict(image_size=28, resize_size=32, channels=3, model_id="m0", progress=False)


def test_gallery_image_as_query_comes_back_first(tmp_path, embedder, make_gallery,
                                                 make_bad_files):
  paths = make_gallery(tmp_path / "gallery")
  make_bad_files(tmp_path / "gallery")
  results = search_lib.search(embedder, tmp_path / "gallery", paths[4], top_k=5,
                              cache_dir=tmp_path / "cache", **OPTIONS)
  assert list(results) == [str(paths[4])]
  neighbours = results[str(paths[4])]
  assert len(neighbours) == 5
  assert neighbours[0]["path"] == str(paths[4])
  assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-5)
  scores = [n["score"] for n in neighbours]
  assert scores == sorted(scores, reverse=True)


def test_results_match_brute_force_cosine_similarities(tmp_path, embedder, make_gallery):
  paths = make_gallery(tmp_path / "gallery", num_images=10)
  queries = make_gallery(tmp_path / "queries", num_images=3)
  gallery = gallery_lib.embed_gallery(embedder, tmp_path / "gallery", model_id="m0",
                                      transform=TRANSFORM, cache_dir=tmp_path / "cache",
                                      progress=False)
  results = search_lib.search_gallery(embedder, gallery, tmp_path / "queries",
                                      transform=TRANSFORM, top_k=4)
  assert set(results) == {str(q) for q in queries}
  reference = gallery_lib.embed_files(embedder, paths, TRANSFORM, progress=False)[0]
  by_path = {str(p): e for p, e in zip(paths, reference.astype(np.float64), strict=True)}
  for query in queries:
    q = gallery_lib.embed_files(embedder, [query], TRANSFORM, progress=False)[0][0]
    sims = {p: float(e @ q) for p, e in by_path.items()}
    expected = sorted(sims, key=lambda p: -sims[p])[:4]
    got = results[str(query)]
    assert [n["path"] for n in got] == expected
    np.testing.assert_allclose([n["score"] for n in got], [sims[p] for p in expected], atol=1e-5)


def test_query_folder_skips_undecodable_files(tmp_path, embedder, make_gallery, make_bad_files):
  make_gallery(tmp_path / "gallery", num_images=4)
  queries = make_gallery(tmp_path / "queries", num_images=2)
  make_bad_files(tmp_path / "queries")
  results = search_lib.search(embedder, tmp_path / "gallery", tmp_path / "queries",
                              top_k=10, cache_dir=tmp_path / "cache", **OPTIONS)
  assert set(results) == {str(q) for q in queries}
  assert all(len(n) == 4 for n in results.values())  # top_k capped at the gallery size


def test_bad_queries(tmp_path, embedder, make_gallery, make_bad_files):
  make_gallery(tmp_path / "gallery", num_images=3)
  options = dict(cache_dir=tmp_path / "cache", **OPTIONS)
  with pytest.raises(MissingFileError, match="query .* does not exist"):
    search_lib.search(embedder, tmp_path / "gallery", tmp_path / "missing.jpg", **options)
  bad = make_bad_files(tmp_path / "bad")
  with pytest.raises(DataError, match="decodes"):
    search_lib.search(embedder, tmp_path / "gallery", bad[0], **options)
  with pytest.raises(ValueError, match="top_k"):
    search_lib.search(embedder, tmp_path / "gallery", tmp_path / "gallery", top_k=0, **options)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no files"):
    search_lib.search(embedder, tmp_path / "empty", bad[0], **options)


def test_json_text_and_grid(tmp_path, embedder, make_gallery):
  paths = make_gallery(tmp_path / "gallery", num_images=5)
  results = search_lib.search(embedder, tmp_path / "gallery", paths[:2], top_k=3,
                              cache_dir=tmp_path / "cache", **OPTIONS)
  written = search_lib.write_json(results, tmp_path / "out" / "results.json")
  assert json.loads(written.read_text()) == results
  text = search_lib.format_results(results)
  assert f"query {paths[0]}" in text and len(text.splitlines()) == 2 * (1 + 3)
  grid = search_lib.results_grid(results, tmp_path / "out" / "results.png", transform=TRANSFORM)
  with PIL.Image.open(grid) as image:
    assert image.format == "PNG" and image.size[0] > image.size[1] > 0
