"""A PNG of a few queries and their nearest neighbours, framed by whether they share the class."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from recall_jax import figures
from recall_jax.evaluation.knn import knn
from recall_jax.evaluation.evaluator import SetEmbeddings


def neighbours_of(embedded: SetEmbeddings, query_rows: np.ndarray, k: int) -> np.ndarray:
  """(len(query_rows), k) database indices of the nearest neighbours of some queries (exact).

  In leave-one-out sets the query itself is excluded by index, as `knn(..., exclude_self=True)`
  does; ties rank the lower index first.

  Args:
    embedded: the evaluated set.
    query_rows: (Q,) indices of the queries (into the database for leave-one-out sets, else into
      the queries).
    k: neighbours per query, at most the database size (minus one for leave-one-out).
  """
  if embedded.query_embeddings is not None:
    _, indices = knn(embedded.query_embeddings[query_rows], embedded.embeddings, k)
    return indices
  # One neighbour more, then the query's own row dropped (or the k-th, if the query itself is not
  # among them because k + 1 rows tie with it at a lower index).
  _, indices = knn(embedded.embeddings[query_rows], embedded.embeddings, k + 1)
  return np.stack([row[row != q][:k] for row, q in zip(indices, query_rows)])


def retrieval_grid(embedded: SetEmbeddings, load_image: Callable[[int], np.ndarray],
                   out_path: str | pathlib.Path, *,
                   load_query_image: Callable[[int], np.ndarray] | None = None,
                   num_queries: int = 8, k: int = 8, seed: int = 0) -> pathlib.Path:
  """Draws random queries (left column) and their top k, framed green if same class, else red.

  Args:
    embedded: an evaluated set (`EvaluationResult.embeddings[name]`).
    load_image: database index -> uint8 (H, W, C) image.
    out_path: the PNG to write.
    load_query_image: query index -> image, for sets with separate queries; default `load_image`.
    num_queries: rows of the grid (random queries, seeded).
    k: neighbours per row.
    seed: which queries.

  Returns:
    `out_path`.
  """
  separate = embedded.query_embeddings is not None
  query_labels = embedded.query_labels if separate else embedded.labels
  load_query_image = load_query_image or load_image
  rng = np.random.default_rng(seed)
  queries = np.sort(rng.choice(len(query_labels), size=min(num_queries, len(query_labels)),
                               replace=False))
  available = len(embedded.labels) - (0 if separate else 1)
  neighbours = neighbours_of(embedded, queries, min(k, available))
  rows, cols = len(queries), neighbours.shape[1] + 1
  fig, axes = figures.new_figure(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
  for r, q in enumerate(queries):
    for c, index in enumerate([q, *neighbours[r]]):
      ax = axes[r, c]
      image = load_query_image(int(index)) if c == 0 else load_image(int(index))
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
      ax.set_xticks([])
      ax.set_yticks([])
      same = embedded.labels[index] == query_labels[q]
      colour = "black" if c == 0 else ("green" if same else "red")
      for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(1.5 if c == 0 else 4)
    axes[r, 0].set_ylabel(f"q {q}", fontsize=7)
  axes[0, 0].set_title("query", fontsize=8)
  for c in range(1, cols):
    axes[0, c].set_title(f"#{c}", fontsize=8)
  fig.tight_layout()
  out_path = pathlib.Path(out_path)
  fig.savefig(out_path, dpi=80)
  return out_path
