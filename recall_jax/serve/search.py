"""Search an image folder with a trained embedder: top k gallery images per query, JSON and a grid.

The gallery is embedded once and cached (`recall_jax.serve.gallery`); queries (one image or a
folder of them) are embedded on each call and searched exactly with the blocked k-NN of
`recall_jax.evaluation.knn` (cosine similarity: embeddings are L2-normalised).

Results map each query's path to its neighbours, best first:
`{query_path: [{"path": gallery_path, "score": cosine_similarity}, ...]}`.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from recall_jax import figures
from recall_jax.errors import DataError, MissingFileError
from recall_jax.evaluation import knn
from recall_jax.serve import gallery as gallery_lib

_log = logging.getLogger(__name__)

Results = dict[str, list[dict[str, str | float]]]


def query_files(queries: str | pathlib.Path | Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """The query images: a file, every file under a folder (recursively), or a list of either.

  Raises:
    MissingFileError: if a query path does not exist.
  """
  if isinstance(queries, (str, pathlib.Path)):
    queries = [queries]
  files = []
  for query in queries:
    query = pathlib.Path(query)
    if query.is_dir():
      files.extend(gallery_lib.list_files(query))
    elif query.is_file():
      files.append(query)
    else:
      raise MissingFileError(f"query {query} does not exist")
  if not files:
    raise DataError(f"no query files in {', '.join(str(q) for q in queries)}")
  return files


def search_gallery(embed_fn: gallery_lib.EmbedFn, gallery: gallery_lib.Gallery,
                   queries: str | pathlib.Path | Sequence[str | pathlib.Path], *,
                   transform: gallery_lib.ImageTransform, top_k: int = 10,
                   batch_size: int = 64) -> Results:
  """The `top_k` gallery images nearest to each query.

  Args:
    embed_fn: the embedder that embedded `gallery`.
    gallery: from `gallery_lib.embed_gallery`.
    queries: an image file, a folder of images, or a list of either. Undecodable files inside a
      query folder are skipped with a warning.
    transform: the gallery's image transform.
    top_k: neighbours per query (capped at the gallery size).
    batch_size: query images per call of `embed_fn` (fewer queries: one batch of that many).

  Returns:
    `{str(query path): [{"path": str(gallery path), "score": similarity}, ...]}`, `top_k` entries
    per query, descending score; among equal scores the earlier gallery path comes first.

  Raises:
    MissingFileError: if a query does not exist.
    DataError: if no query decodes as an image.
    ValueError: if `top_k` < 1.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  files = query_files(queries)
  embeddings, kept, skipped = gallery_lib.embed_files(
      embed_fn, files, transform, batch_size=min(batch_size, len(files)), desc="queries",
      progress=len(files) > batch_size)
  if skipped:
    _log.warning("skipped %d of %d query files that are not decodable images (%s)", len(skipped),
                 len(files), ", ".join(str(files[i]) for i in skipped[:5]))
  scores, indices = knn(embeddings, gallery.embeddings, min(top_k, len(gallery.relative_paths)))
  return {str(files[q]): [{"path": gallery.path(j), "score": float(s)}
                          for s, j in zip(scores[row], indices[row], strict=True)]
          for row, q in enumerate(kept)}


def search(embed_fn: gallery_lib.EmbedFn, gallery_dir: str | pathlib.Path,
           queries: str | pathlib.Path | Sequence[str | pathlib.Path], *, model_id: str,
           image_size: int, resize_size: int, channels: int = 3,
           cache_dir: str | pathlib.Path, top_k: int = 10, batch_size: int = 64,
           progress: bool = True) -> Results:
  """Embeds (or reads the cached embeddings of) a gallery folder and searches it for the queries.

  Args:
    embed_fn: uint8 (b, H, W, C) images -> (b, D) embeddings, ideally jitted, e.g.
      `jax.jit(lambda x: model.apply(variables, x, train=False))`.
    gallery_dir: folder of gallery images, any layout and depth; undecodable files are skipped.
    queries: an image file, a folder of images, or a list of either.
    model_id: identifies the parameters behind `embed_fn` (keys the gallery cache).
    image_size, resize_size, channels: the evaluation transform (`data.image_size`,
      `data.resize_size`, `data.channels`).
    cache_dir: where the gallery's embeddings are cached.
    top_k: neighbours per query.
    batch_size: images per call of `embed_fn`.
    progress: show a progress bar while embedding the gallery.

  Returns:
    See `search_gallery`.

  Raises:
    MissingFileError: if the gallery folder or a query does not exist.
    DataError: if the gallery or the queries hold no decodable image.
    ConfigError: on a bad transform or batch size.
  """
  transform = gallery_lib.ImageTransform(image_size, resize_size, channels)
  gallery = gallery_lib.embed_gallery(embed_fn, gallery_dir, model_id=model_id,
                                      transform=transform, cache_dir=cache_dir,
                                      batch_size=batch_size, progress=progress)
  return search_gallery(embed_fn, gallery, queries, transform=transform, top_k=top_k,
                        batch_size=batch_size)


def write_json(results: Mapping[str, Sequence[Mapping[str, str | float]]],
               path: str | pathlib.Path) -> pathlib.Path:
  """Writes results as `{query_path: [{"path": ..., "score": ...}, ...]}` JSON.

  The file is ASCII: other characters are `\\uXXXX` escapes, and the bytes of a file name that is
  not UTF-8 are Python's surrogate escapes (`\\udcNN`; `os.fsencode` of the string read back gives
  the file's name).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + "\n", encoding="ascii")
  return path


def printable(text: str) -> str:
  """`text` with the bytes of file names that are not UTF-8 (surrogate escapes) as `\\xNN`, so a
  strict UTF-8 console can show it."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def format_results(results: Mapping[str, Sequence[Mapping[str, str | float]]]) -> str:
  """Results as text: each query, then its neighbours with their similarities."""
  lines = []
  for query, neighbours in results.items():
    lines.append(f"query {query}")
    lines.extend(f"  {rank:>3}. {n['score']:.4f}  {n['path']}"
                 for rank, n in enumerate(neighbours, 1))
  return "\n".join(lines)


def results_grid(results: Mapping[str, Sequence[Mapping[str, str | float]]],
                 out_path: str | pathlib.Path, *, transform: gallery_lib.ImageTransform,
                 max_queries: int = 8, max_results: int = 8) -> pathlib.Path:
  """A PNG with one row per query: the query, then its results titled with their similarity.

  Args:
    results: from `search`.
    out_path: the PNG to write.
    transform: how files become images for display (the search's transform).
    max_queries: rows (the first queries of `results`).
    max_results: results shown per query.

  Returns:
    `out_path`.
  """
  rows = list(results.items())[:max_queries]
  if not rows:
    raise ValueError("results has no query to draw")
  cols = 1 + min(max_results, max(len(neighbours) for _, neighbours in rows))
  fig, axes = figures.new_figure(len(rows), cols, figsize=(1.4 * cols, 1.5 * len(rows)),
                                 squeeze=False)
  for r, (query, neighbours) in enumerate(rows):
    cells = [(query, "query")] + [(n["path"], f"{n['score']:.3f}")
                                  for n in neighbours[:cols - 1]]
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(cells):
        ax.axis("off")
        continue
      path, title = cells[c]
      try:
        image = gallery_lib.load_image(path, transform)
      except DataError:  # Changed since it was embedded: an empty cell, not a failed search.
        image = np.zeros((transform.image_size, transform.image_size, transform.channels),
                         np.uint8)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
      ax.set_title(title, fontsize=7)
      for spine in ax.spines.values():
        spine.set_edgecolor("black" if c == 0 else "0.6")
        spine.set_linewidth(2 if c == 0 else 1)
    axes[r, 0].set_ylabel(printable(pathlib.Path(query).name), fontsize=6)
  fig.tight_layout()
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path, dpi=80)
  return out_path
