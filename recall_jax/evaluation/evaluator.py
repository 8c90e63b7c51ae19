"""Periodic evaluation: embed each evaluated set, compute its protocol's metrics, log them.

Category-level task (Recall@k and the other rank metrics). On several processes every process
embeds its share of each batch and gets the whole set back (`extract_embeddings`), then scores it
on its own devices: every process returns the same metrics, those one process would compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.evaluation import extraction
from recall_jax.evaluation import metrics as metrics_lib
from recall_jax.evaluation import protocols
from recall_jax.evaluation import reid

Batches = Callable[[], Iterable[extraction.Batch]]


@dataclasses.dataclass(frozen=True)
class QueryGallery:
  """An evaluated set whose queries are searched in a separate gallery (In-Shop, landmarks).

  Attributes:
    queries: callable returning the query images' batches.
    gallery: callable returning the gallery images' batches.
  """

  queries: Batches
  gallery: Batches


@dataclasses.dataclass(frozen=True)
class SetEmbeddings:
  """The embeddings one evaluated set was scored on.

  Attributes:
    embeddings: (N, D) float32 L2-normalised database (gallery) embeddings.
    labels: (N,) database labels.
    query_embeddings: (Q, D) float32 queries; None for leave-one-out (the database queries itself).
    query_labels: (Q,) query labels; None for leave-one-out.
  """

  embeddings: np.ndarray
  labels: np.ndarray
  query_embeddings: np.ndarray | None = None
  query_labels: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
  """What one evaluation computed.

  Attributes:
    metrics: {'<set>/<metric>': value}, e.g. 'test/recall@1'.
    embeddings: set name -> the embeddings it was scored on (for reports such as retrieval grids).
  """

  metrics: dict[str, float | int]
  embeddings: dict[str, SetEmbeddings]


def _process_local(mesh: Mesh | None) -> Mesh:
  """The devices of `mesh` (default: all) that this process addresses, as a 1-D mesh.

  The metrics run on them alone: the embeddings are already whole on every process, and a mesh
  spanning other processes' devices would leave ranks that this process cannot fetch.
  """
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  return parallel.data_mesh([d for d in devices if d.process_index == jax.process_index()])


class Evaluator:
  """Retrieval evaluation of one or more sets: leave-one-out ("all-vs-all") or query vs gallery.

  Decoupled from the data package: each set is a zero-argument callable returning a fresh
  iterable of batches (see `extract_embeddings` for the batch format), or a `QueryGallery` of two.

  Usage:
    evaluator = Evaluator(lambda params: jax.jit(partial(model.apply, params)),
                          {'test': make_test_batches}, 'sop')
    result = evaluator(params, step)   # result.metrics: {'test/recall@1': ..., ...}
  """

  def __init__(self, embed_fn_factory: Callable[[Any], extraction.EmbedFn] | None,
               splits: Mapping[str, Batches | QueryGallery], dataset_name: str,
               *, k_values: Sequence[int] | None = None, reid_protocol: bool = False,
               block: int = 1024, mesh: Mesh | None = None,
               log_fn: Callable[[str], Any] | None = print, progress: bool = True):
    """
    Args:
      embed_fn_factory: maps what `__call__` receives (e.g. params) to an `embed_fn`; None when
        `__call__` receives the `embed_fn` itself.
      splits: set name -> callable returning that split's batches (leave-one-out), or a
        `QueryGallery` (queries searched in a separate gallery).
      dataset_name: selects the protocol (`protocol_for`).
      k_values: overrides the protocol's recall@k cut-offs.
      reid_protocol: also run the re-identification protocol (VehicleID only, leave-one-out
        sets); keys 'reid_*'.
      block: queries per matmul for the metrics.
      mesh: 1-D device mesh (default: all devices).
      log_fn: called with one formatted line per evaluation; None to disable.
      progress: show extraction progress bars.

    Raises:
      ValueError: no set, or `reid_protocol` for a dataset without one.
    """
    if not splits:
      raise ValueError("splits must name at least one split")
    self.protocol = protocols.protocol_for(dataset_name)
    if reid_protocol and self.protocol["reid_k_values"] is None:
      raise ValueError(f"dataset {dataset_name!r} has no re-identification protocol")
    self.k_values = tuple(self.protocol["k_values"] if k_values is None else k_values)
    self._factory = embed_fn_factory
    self._splits = dict(splits)
    self._reid = reid_protocol
    self._block = block
    self._mesh = mesh
    self._metrics_mesh = _process_local(mesh)
    self._log_fn = log_fn
    self._progress = progress

  def _embed(self, embed_fn, make_batches: Batches, desc: str) -> tuple[np.ndarray, np.ndarray]:
    embeddings, labels, _ = extraction.extract_embeddings(
        embed_fn, make_batches(), desc=desc, mesh=self._mesh, progress=self._progress)
    return embeddings, labels

  def _evaluate_set(self, embed_fn, name: str, batches: Batches | QueryGallery
                    ) -> tuple[dict[str, float | int], SetEmbeddings]:
    if isinstance(batches, QueryGallery):
      gallery = self._embed(embed_fn, batches.gallery, f"embed {name} gallery")
      queries = self._embed(embed_fn, batches.queries, f"embed {name} queries")
      embedded = SetEmbeddings(*gallery, *queries)
      return metrics_lib.retrieval_metrics(
          *gallery, query_embeddings=queries[0], query_labels=queries[1],
          k_values=self.k_values, block=self._block, mesh=self._metrics_mesh), embedded
    embedded = SetEmbeddings(*self._embed(embed_fn, batches, f"embed {name}"))
    metrics = metrics_lib.retrieval_metrics(
        embedded.embeddings, embedded.labels, k_values=self.k_values, block=self._block,
        mesh=self._metrics_mesh)
    if self._reid:
      reid_metrics = reid.vehicleid_reid_metrics(
          embedded.embeddings, embedded.labels, k_values=self.protocol["reid_k_values"],
          block=self._block, mesh=self._metrics_mesh)
      metrics.update({f"reid_{key}": value for key, value in reid_metrics.items()})
    return metrics, embedded

  def __call__(self, params_or_embed_fn: Any, step: int) -> EvaluationResult:
    """Evaluates every set and logs one line.

    Returns:
      The metrics {'<set>/<metric>': value} and the embeddings they were computed from.
    """
    embed_fn = (params_or_embed_fn if self._factory is None
                else self._factory(params_or_embed_fn))
    results: dict[str, float | int] = {}
    embeddings: dict[str, SetEmbeddings] = {}
    for name, batches in self._splits.items():
      metrics, embeddings[name] = self._evaluate_set(embed_fn, name, batches)
      results.update({f"{name}/{key}": value for key, value in metrics.items()})
    if self._log_fn is not None:
      shown = ", ".join(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                        for name, value in results.items())
      self._log_fn(f"[eval] step {step}: {shown}")
    return EvaluationResult(results, embeddings)
