"""Evaluation protocol (Recall@k cut-offs) of each benchmark, as in the paper and Smooth-AP.

Serves the category-level task. Each dataset's protocol is part of its spec
(`data.registry.DATASETS`); datasets without a published protocol (a user's own `folder` or CSV
data, an unregistered name) get `DEFAULT_K_VALUES`. All are leave-one-out over the test split
("all-vs-all"); VehicleID's three test lists are evaluated separately, and it also supports the
re-identification protocol (`vehicleid_reid_metrics`).
"""

from typing import Any

from recall_jax.data.registry import DEFAULT_K_VALUES
from recall_jax.data.registry import dataset_spec

__all__ = ["DEFAULT_K_VALUES", "protocol_for"]


def protocol_for(dataset_name: str) -> dict[str, Any]:
  """{'name': dataset name, 'k_values': recall@k cut-offs, 'reid_k_values': cut-offs of the
  optional re-identification protocol or None}. A fresh dict each call.

  A dataset without a published protocol gets `DEFAULT_K_VALUES` and no re-identification.
  """
  spec = dataset_spec(dataset_name)
  if spec is None:
    return {"name": dataset_name, "k_values": DEFAULT_K_VALUES, "reid_k_values": None}
  return {"name": dataset_name, "k_values": spec.k_values, "reid_k_values": spec.reid_k_values}
