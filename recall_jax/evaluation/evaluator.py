"""Periodic evaluation for the trainer: embed each split, compute its protocol's metrics, log them."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jax.sharding import Mesh

from recall_jax.evaluation import extraction
from recall_jax.evaluation import metrics as metrics_lib
from recall_jax.evaluation import protocols
from recall_jax.evaluation import reid


class Evaluator:
  """Leave-one-out ("all-vs-all") retrieval evaluation of one or more splits.

  Decoupled from the data package: each split is a zero-argument callable returning a fresh
  iterable of batches (see `extract_embeddings` for the batch format).

  Usage:
    evaluator = Evaluator(lambda params: jax.jit(partial(model.apply, params)),
                          {'test': make_test_batches}, 'sop')
    metrics = evaluator(params, step)   # {'test/recall@1': ..., 'test/map@r': ..., ...}
  """

  def __init__(self, embed_fn_factory: Callable[[Any], extraction.EmbedFn] | None,
               splits: Mapping[str, Callable[[], Iterable[extraction.Batch]]], dataset_name: str,
               *, k_values: Sequence[int] | None = None, reid_protocol: bool = False,
               block: int = 1024, mesh: Mesh | None = None,
               log_fn: Callable[[str], Any] | None = print, progress: bool = True):
    """
    Args:
      embed_fn_factory: maps what `__call__` receives (e.g. params) to an `embed_fn`; None when
        `__call__` receives the `embed_fn` itself.
      splits: split name -> callable returning that split's batches.
      dataset_name: selects the protocol (`protocol_for`).
      k_values: overrides the protocol's recall@k cut-offs.
      reid_protocol: also run the re-identification protocol (VehicleID only); keys 'reid_*'.
      block: queries per matmul for the metrics.
      mesh: 1-D device mesh (default: all devices).
      log_fn: called with one formatted line per evaluation; None to disable.
      progress: show extraction progress bars.
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
    self._log_fn = log_fn
    self._progress = progress
    # split -> (embeddings (N, D) float32, labels (N,)) of the latest call.
    self.last_embeddings: dict[str, tuple[Any, Any]] = {}

  def __call__(self, params_or_embed_fn: Any, step: int) -> dict[str, float | int]:
    """Evaluates every split; returns {'<split>/<metric>': value} and logs it."""
    embed_fn = (params_or_embed_fn if self._factory is None
                else self._factory(params_or_embed_fn))
    results: dict[str, float | int] = {}
    self.last_embeddings = {}
    for split, make_batches in self._splits.items():
      embeddings, labels, _ = extraction.extract_embeddings(
          embed_fn, make_batches(), desc=f"embed {split}", mesh=self._mesh,
          progress=self._progress)
      # Kept for reports drawn from the same evaluation (e.g. the trainer's retrieval grid).
      self.last_embeddings[split] = (embeddings, labels)
      split_metrics = metrics_lib.retrieval_metrics(
          embeddings, labels, k_values=self.k_values, block=self._block, mesh=self._mesh)
      results.update({f"{split}/{name}": value for name, value in split_metrics.items()})
      if self._reid:
        reid_metrics = reid.vehicleid_reid_metrics(
            embeddings, labels, k_values=self.protocol["reid_k_values"], block=self._block,
            mesh=self._mesh)
        results.update({f"{split}/reid_{name}": value for name, value in reid_metrics.items()})
    if self._log_fn is not None:
      shown = ", ".join(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                        for name, value in results.items())
      self._log_fn(f"[eval] step {step}: {shown}")
    return results
