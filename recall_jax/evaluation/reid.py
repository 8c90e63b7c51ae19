"""VehicleID's re-identification protocol: one random gallery image per identity, the rest queries.

Each draw picks one gallery image per identity uniformly at random; every other image is a query
against that gallery (so each query has exactly one positive and recall@k is the CMC at k). Metrics
are averaged over `draws` draws from one generator seeded with `seed`.

Serves the category-level task (metric learning, Recall@k).
"""

from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from recall_jax.evaluation import knn as knn_lib
from recall_jax.evaluation import metrics as metrics_lib


def vehicleid_reid_metrics(embeddings, labels, *, k_values: Sequence[int] = (1, 5),
                           draws: int = 10, seed: int = 0, block: int = 1024,
                           mesh: Mesh | None = None) -> dict[str, float | int]:
  """Re-identification metrics averaged over random gallery draws.

  Args:
    embeddings: (N, D) float embeddings of one test list.
    labels: (N,) integer identities.
    k_values: cut-offs, each <= number of identities (the gallery size).
    draws: number of random gallery draws (>= 1).
    seed: seed of the generator that makes all draws.

  Returns:
    The keys of `retrieval_metrics`, averaged over draws ('num_queries' is per draw: identities with
    a single image give no query), plus 'draws'.
  """
  embeddings = knn_lib.as_embeddings(embeddings, "embeddings")
  labels = metrics_lib.as_labels(labels, embeddings.shape[0], "labels")
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  rng = np.random.default_rng(seed)
  results = []
  for _ in range(draws):
    permutation = rng.permutation(labels.shape[0])
    # np.unique's first occurrence in a random permutation is a uniform pick per identity.
    _, first = np.unique(labels[permutation], return_index=True)
    gallery = np.zeros(labels.shape[0], bool)
    gallery[permutation[first]] = True
    if gallery.all():
      raise ValueError("every identity has a single image; the re-identification protocol has no "
                       "queries")
    results.append(metrics_lib.retrieval_metrics(
        embeddings[gallery], labels[gallery], k_values=k_values,
        query_embeddings=embeddings[~gallery], query_labels=labels[~gallery], block=block,
        mesh=mesh))
  out: dict[str, float | int] = {
      name: float(np.mean([r[name] for r in results])) for name in results[0]
      if not name.startswith("num_")}
  out["num_queries"] = results[0]["num_queries"]
  out["num_queries_without_positives"] = results[0]["num_queries_without_positives"]
  out["draws"] = draws
  return out
