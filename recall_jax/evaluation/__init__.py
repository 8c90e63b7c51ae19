"""Retrieval evaluation: embedding extraction, exact blocked k-NN and the standard metrics.

Similarity is the inner product in float32 (cosine for the L2-normalised embeddings that
`extract_embeddings` returns); ties rank the lower database index first everywhere.

Serves both tasks.
"""

from recall_jax.evaluation.embedding_cache import cached_embeddings
from recall_jax.evaluation.evaluator import EvaluationResult, Evaluator, QueryGallery, SetEmbeddings
from recall_jax.evaluation.extraction import extract_embeddings, l2_normalize
from recall_jax.evaluation.knn import knn
from recall_jax.evaluation.landmark_evaluator import DistractorSet, RevisitedEvaluator, RevisitedSet
from recall_jax.evaluation.metrics import metrics_from_ranks, retrieval_metrics
from recall_jax.evaluation.protocols import protocol_for
from recall_jax.evaluation.reid import vehicleid_reid_metrics
from recall_jax.evaluation.revisited import (format_revisited_table, revisited_metrics,
                                             scores_from_ranks)
from recall_jax.evaluation.retrieval_grid import retrieval_grid
from recall_jax.parallel import data_mesh

__all__ = [
    "EvaluationResult",
    "DistractorSet",
    "Evaluator",
    "cached_embeddings",
    "QueryGallery",
    "RevisitedEvaluator",
    "RevisitedSet",
    "SetEmbeddings",
    "data_mesh",
    "extract_embeddings",
    "format_revisited_table",
    "knn",
    "l2_normalize",
    "metrics_from_ranks",
    "protocol_for",
    "retrieval_grid",
    "retrieval_metrics",
    "revisited_metrics",
    "scores_from_ranks",
    "vehicleid_reid_metrics",
]
