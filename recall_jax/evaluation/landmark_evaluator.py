"""Evaluation on the revisited benchmarks (ROxford5k, RParis6k), optionally with R1M distractors.

For each benchmark the cropped queries and the database are embedded, optionally whitened
(a test-time whitening, applied batch by batch), optionally expanded (alpha-QE, DBA), and scored
with `revisited_metrics`: keys `<dataset>/<protocol>/<metric>`, e.g. `roxford5k/medium/map`, and
`<dataset>+<distractors>/...` with the distractors appended to the database. The distractors are
embedded once per set of parameters and cached on disk (`cached_embeddings`), whose fingerprint
holds a digest of the parameters, so a checkpoint evaluated again reuses them.

Serves instance-level retrieval. Like `Evaluator`, this is decoupled from the data package: each
image set is a zero-argument callable returning batches for `extract_embeddings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from recall_jax.errors import DataError
from recall_jax.evaluation import embedding_cache
from recall_jax.evaluation import extraction
from recall_jax.evaluation import query_expansion
from recall_jax.evaluation import revisited
from recall_jax.evaluation import whitening as whitening_lib
from recall_jax.evaluation.evaluator import EvaluationResult, SetEmbeddings

Batches = Callable[[], Iterable[extraction.Batch]]


@dataclasses.dataclass(frozen=True)
class RevisitedSet:
  """One revisited benchmark.

  Attributes:
    queries: returns the batches of the (cropped) queries, in ground-truth order.
    database: returns the batches of the database images, in ground-truth order.
    gnd: the per-query ground truth (`landmarks.RevisitedDataset.gnd`).
  """

  queries: Batches
  database: Batches
  gnd: Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class DistractorSet:
  """An extra database appended to every benchmark's (R1M), embedded once and cached.

  Attributes:
    name: names the setting in the metric keys (`roxford5k+<name>/...`).
    batches: returns the distractor images' batches (with 'index').
    num_examples: the number of distractor images.
    cache_path: the `.npy` cache of their embeddings.
    fingerprint: what, besides the parameters, the embeddings depend on (model, image size,
      scales, whitening, image list).
  """

  name: str
  batches: Batches
  num_examples: int
  cache_path: pathlib.Path
  fingerprint: str


def params_digest(params: Any) -> str:
  """SHA-256 (hex) of a parameter tree's paths, shapes, dtypes and values."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(params))
  for path, leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def check_distractor_cache(path: pathlib.Path) -> None:
  """Refuses, before any work, a distractor cache that no run wrote: not a 2-D float32 `.npy`.

  A cache of other parameters or another image list is recomputed, not refused
  (`embedding_cache.cached_embeddings`); one of the wrong type or rank is damaged.

  Raises:
    DataError: the file exists but is not a readable 2-D float32 `.npy`.
  """
  if not path.exists():
    return
  try:
    header = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    shape, dtype = header.shape, header.dtype
  except (OSError, ValueError) as e:
    raise DataError(f"distractor cache {path} is unreadable ({e}); delete it to recompute"
                    ) from None
  if len(shape) != 2 or dtype != np.float32:
    raise DataError(f"distractor cache {path} holds {dtype} {shape}, not 2-D float32 embeddings; "
                    "delete it to recompute")


def whitened_embed_fn(embed_fn: extraction.EmbedFn,
                      whitening: whitening_lib.Whitening) -> extraction.EmbedFn:
  """The test-time whitening of `embed_fn`'s descriptors, as one jitted function.

  Each descriptor is L2-normalised, whitened and L2-normalised again (`apply_whitening`).

  Args:
    embed_fn: images -> (B, D) descriptors.
    whitening: with a D-wide projection.

  Returns:
    images -> float32 (B, D_out) unit-norm whitened descriptors.
  """
  return jax.jit(lambda images: whitening_lib.apply_whitening(
      extraction.l2_normalize(embed_fn(images)), whitening))


class RevisitedEvaluator:
  """Scores parameters on the revisited benchmarks; same call contract as `Evaluator`.

  Usage:
    evaluator = RevisitedEvaluator(make_describe_fn, {'roxford5k': RevisitedSet(...)})
    result = evaluator(params, step)   # result.metrics: {'roxford5k/medium/map': ..., ...}
  """

  def __init__(self, embed_fn_factory: Callable[[Any], extraction.EmbedFn] | None,
               sets: Mapping[str, RevisitedSet], *, distractors: DistractorSet | None = None,
               whitening: whitening_lib.Whitening | None = None,
               protocols: Sequence[str] = revisited.PROTOCOLS,
               kappas: Sequence[int] = (1, 5, 10), qe_k: int = 0, qe_alpha: float = 3.0,
               dba_k: int = 0, dba_alpha: float = 3.0, mesh: Mesh | None = None,
               log_fn: Callable[[str], Any] | None = print, progress: bool = True):
    """
    Args:
      embed_fn_factory: maps what `__call__` receives (the parameters) to an `embed_fn` of the
        batches' images; None when `__call__` receives the `embed_fn` itself (then distractor
        embeddings are cached under the fingerprint alone).
      sets: benchmark name -> its `RevisitedSet`.
      distractors: appended to every database in a second setting; None: no distractors.
      whitening: applied to every (L2-normalised) descriptor at test time, then L2-normalised
        again; None: none.
      protocols: the protocols whose metrics are returned (the printed table shows all).
      kappas: the k of mP@k.
      qe_k, qe_alpha, dba_k, dba_alpha: query expansion and database-side augmentation
        (`expand_descriptors`; k = 0: off). With distractors they run over the whole database,
        which is then held in memory.
      mesh: 1-D device mesh (default: all devices).
      log_fn: receives the Easy / Medium / Hard table after each evaluation; None: silent.
      progress: show extraction progress bars.

    Raises:
      ValueError: no set, or an unknown protocol.
    """
    if not sets:
      raise ValueError("sets must name at least one revisited benchmark")
    unknown = [p for p in protocols if p not in revisited.PROTOCOLS]
    if unknown or not protocols:
      raise ValueError(f"protocols must be among {revisited.PROTOCOLS}, got {tuple(protocols)}")
    self._factory, self._sets, self._distractors = embed_fn_factory, dict(sets), distractors
    self._whitening, self._protocols, self._kappas = whitening, tuple(protocols), tuple(kappas)
    self._expansion = dict(qe_k=qe_k, qe_alpha=qe_alpha, dba_k=dba_k, dba_alpha=dba_alpha)
    self._mesh, self._log_fn, self._progress = mesh, log_fn, progress
    if distractors is not None:
      check_distractor_cache(distractors.cache_path)

  def _embed(self, embed_fn, batches: Batches, desc: str) -> np.ndarray:
    embeddings, _, indices = extraction.extract_embeddings(
        embed_fn, batches(), desc=desc, mesh=self._mesh, progress=self._progress)
    order = np.argsort(indices, kind="stable")
    if not np.array_equal(indices[order], np.arange(len(indices))):
      raise ValueError(f"{desc}: the batches must cover rows 0..N-1 once each (their 'index')")
    return embeddings[order]

  def _expanded(self, queries: np.ndarray, database: np.ndarray) -> tuple[Any, Any]:
    if not (self._expansion["qe_k"] or self._expansion["dba_k"]):
      return queries, database
    queries, database = query_expansion.expand_descriptors(queries, database, **self._expansion)
    return np.asarray(queries), np.asarray(database)

  def _scores(self, queries, database, gnd) -> dict[str, float]:
    return revisited.revisited_metrics(queries, database, gnd, kappas=self._kappas,
                                       mesh=self._mesh)

  def __call__(self, params_or_embed_fn: Any, step: int) -> EvaluationResult:
    """Evaluates every benchmark (and with the distractors) and logs the table.

    Returns:
      The metrics of the configured protocols, {'<setting>/<protocol>/<metric>': value}, and
      per benchmark the embeddings they were computed from (labels: database / query index).
    """
    embed_fn = (params_or_embed_fn if self._factory is None
                else self._factory(params_or_embed_fn))
    if self._whitening is not None:
      embed_fn = whitened_embed_fn(embed_fn, self._whitening)
    distractors = None
    if self._distractors is not None:
      d = self._distractors
      digest = "" if self._factory is None else params_digest(params_or_embed_fn)
      distractors = embedding_cache.cached_embeddings(
          d.cache_path, embed_fn, d.batches, num_examples=d.num_examples,
          fingerprint=f"{d.fingerprint}:{digest}", mesh=self._mesh, progress=self._progress)
    everything: dict[str, float] = {}
    embeddings: dict[str, SetEmbeddings] = {}
    for name, benchmark in self._sets.items():
      database = self._embed(embed_fn, benchmark.database, f"embed {name} database")
      queries = self._embed(embed_fn, benchmark.queries, f"embed {name} queries")
      embeddings[name] = SetEmbeddings(database, np.arange(len(database)), queries,
                                       np.arange(len(queries)))
      scores = self._scores(*self._expanded(queries, database), benchmark.gnd)
      everything.update({f"{name}/{k}": v for k, v in scores.items()})
      if distractors is not None:
        if self._expansion["qe_k"] or self._expansion["dba_k"]:
          expanded_queries, full = self._expanded(
              queries, np.concatenate([database, np.asarray(distractors)]))
          scores = self._scores(expanded_queries, full, benchmark.gnd)
        else:
          scores = self._scores(queries, [database, distractors], benchmark.gnd)
        everything.update({f"{name}+{self._distractors.name}/{k}": v for k, v in scores.items()})
    if self._log_fn is not None:
      self._log_fn(f"[eval] step {step}: revisited mAP / mP@k (%)\n"
                   f"{revisited.format_revisited_table(everything)}")
    metrics = {k: v for k, v in everything.items() if k.split("/")[-2] in self._protocols}
    return EvaluationResult(metrics, embeddings)
