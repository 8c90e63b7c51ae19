"""Evaluation protocols: what a run is scored on, and the descriptors it scores.

Serves both tasks, one class each, picked once from the config by `make_protocol`:

- `RecallProtocol` (category-level): Recall@k on the evaluated sets, all-vs-all (leave-one-out)
  or query-gallery, VehicleID's re-identification protocol where configured; images on the
  evaluation transform (resize + centre crop).
- `RevisitedProtocol` (instance-level): the revisited Oxford/Paris benchmarks of
  `eval.datasets` (mAP / mP@k), whole images at `eval.scales` (`recall_jax.train.landmarks`).

The trainer and the checkpoint programs (`modes`) call a protocol's methods and never ask which
protocol it is. Both evaluators are called as `evaluator(params, step)` and return the metrics
and the embeddings they were computed from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import evaluation
from recall_jax.data.source import LabelledSource
from recall_jax.train import components
from recall_jax.train import landmarks

PyTree = Any


class EvalSet(NamedTuple):
  """The sources of one evaluated set.

  Attributes:
    database: the split searched (leave-one-out: also the queries; otherwise the gallery).
    queries: the query split, or None for leave-one-out.
  """

  database: LabelledSource
  queries: LabelledSource | None = None


def make_eval_sets(c: ml_collections.ConfigDict) -> dict[str, EvalSet]:
  """The evaluated sets (`config.evaluated_sets`), each cut to `data.max_eval_images`."""
  load = functools.partial(components.make_source, c, max_images=c.data.max_eval_images)
  if c.data.query_split and c.data.gallery_split:
    return {c.data.query_split: EvalSet(load(c.data.gallery_split), load(c.data.query_split))}
  return {split: EvalSet(load(split)) for split in c.data.test_splits}


def make_eval_batches(c: ml_collections.ConfigDict, source: LabelledSource) -> Callable[[], Any]:
  """A zero-argument callable returning a fresh evaluation loader over `source`."""
  return lambda: data.make_eval_loader(
      source, image_size=c.data.image_size, resize_size=c.data.resize_size,
      batch_size=c.data.eval_batch_size, channels=c.data.channels)


def make_evaluator(c: ml_collections.ConfigDict, embed_fn_for: Callable[[PyTree], Any] | None,
                   eval_sets: dict[str, EvalSet], *, log_fn: Callable[[str], Any] | None,
                   progress: bool = True) -> evaluation.Evaluator:
  """The Recall@k evaluator of `eval_sets` with the configured cut-offs and protocols."""
  splits = {name: (make_eval_batches(c, s.database) if s.queries is None else
                   evaluation.QueryGallery(queries=make_eval_batches(c, s.queries),
                                           gallery=make_eval_batches(c, s.database)))
            for name, s in eval_sets.items()}
  return evaluation.Evaluator(embed_fn_for, splits, c.data.name,
                              k_values=config_lib.eval_k_values(c), reid_protocol=c.eval.reid,
                              log_fn=log_fn, progress=progress)


@dataclasses.dataclass(frozen=True)
class RecallProtocol:
  """Recall@k on the config's evaluated sets (category-level).

  Attributes:
    config: the run's config.
  """

  config: ml_collections.ConfigDict

  @functools.cached_property
  def eval_sets(self) -> dict[str, EvalSet]:
    """Evaluated set name -> its sources (prepared on first use; the first one's retrieval grid
    is drawn)."""
    return make_eval_sets(self.config)

  def make_evaluator(self, model, frozen: dict[str, PyTree], *,
                     log_fn: Callable[[str], Any] | None,
                     progress: bool = True) -> evaluation.Evaluator:
    """`evaluator(params, step)` of the evaluated sets."""
    return make_evaluator(self.config, components.make_embed_fn(model, frozen), self.eval_sets,
                          log_fn=log_fn, progress=progress)

  def describe_split(self, model, frozen: dict[str, PyTree], params: PyTree,
                     source: LabelledSource, *, desc: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The embeddings this protocol scores, of every image of `source`: float32 (N, D), labels
    (N,) and source indices (N,)."""
    embed_fn = components.make_embed_fn(model, frozen)(params)
    return evaluation.extract_embeddings(embed_fn, make_eval_batches(self.config, source)(),
                                         desc=desc)


@dataclasses.dataclass(frozen=True)
class RevisitedProtocol:
  """The revisited Oxford/Paris protocol on `eval.datasets` (instance-level).

  Attributes:
    config: the run's config.
    eval_sets: empty: the benchmarks are read by the evaluator, not from the dataset's splits.
  """

  config: ml_collections.ConfigDict
  eval_sets: dict[str, EvalSet] = dataclasses.field(default_factory=dict)

  def make_evaluator(self, model, frozen: dict[str, PyTree], *,
                     log_fn: Callable[[str], Any] | None, progress: bool = True):
    """`evaluator(params, step)` of the benchmarks (reads and checks their files now)."""
    return landmarks.make_revisited_evaluator(self.config, model, frozen, log_fn=log_fn,
                                              progress=progress)

  def describe_split(self, model, frozen: dict[str, PyTree], params: PyTree,
                     source: LabelledSource, *, desc: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As `RecallProtocol.describe_split`: whole images at `eval.scales`, whitened by
    `eval.whitening` (`landmarks.describe_split`)."""
    return landmarks.describe_split(self.config, model, frozen, params, source, desc=desc)


def make_protocol(c: ml_collections.ConfigDict) -> RecallProtocol | RevisitedProtocol:
  """The config's protocol: `RevisitedProtocol` with `eval.datasets`, else `RecallProtocol`."""
  return RevisitedProtocol(c) if c.eval.get("datasets") else RecallProtocol(c)
