"""Evaluation protocol (Recall@k cut-offs) of each benchmark, as in the paper and Smooth-AP.

Serves the category-level task. Each dataset's protocol is part of its spec
(`data.registry.DATASETS`, where `protocol_for` lives, so the config reads it without importing
evaluation code); datasets without a published protocol (a user's own `folder` or CSV data, an
unregistered name) get `DEFAULT_K_VALUES`. All are leave-one-out over the test split
("all-vs-all"); VehicleID's three test lists are evaluated separately, and it also supports the
re-identification protocol (`vehicleid_reid_metrics`).
"""

from recall_jax.data.registry import DEFAULT_K_VALUES
from recall_jax.data.registry import protocol_for

__all__ = ["DEFAULT_K_VALUES", "protocol_for"]
