"""Evaluation protocol (Recall@k cut-offs) of each benchmark, as in the paper and Smooth-AP.

Datasets without a published protocol (a user's own `folder` or CSV data) get `DEFAULT_K_VALUES`.
"""

from typing import Any

DEFAULT_K_VALUES = (1, 2, 4, 8)

# Dataset name (`config.data.name`) -> protocol. All are leave-one-out over the test split
# ("all-vs-all"); VehicleID's three test lists are evaluated separately, and it also supports the
# re-identification protocol (`vehicleid_reid_metrics`).
_PROTOCOLS: dict[str, dict[str, Any]] = {
    "sop": {"k_values": (1, 10, 100, 1000)},
    "inat2018": {"k_values": (1, 4, 16, 32)},
    "cars196": {"k_values": (1, 2, 4, 8, 16)},
    "cub200": {"k_values": (1, 2, 4, 8, 16)},
    "omniglot": {"k_values": (1, 2, 4, 8)},
    "vehicleid": {"k_values": (1, 5), "reid_k_values": (1, 5)},
}

def protocol_for(dataset_name: str) -> dict[str, Any]:
  """{'name': dataset name, 'k_values': recall@k cut-offs, 'reid_k_values': cut-offs of the
  optional re-identification protocol or None}. A fresh dict each call.

  A dataset without a published protocol gets `DEFAULT_K_VALUES` and no re-identification.
  """
  protocol = _PROTOCOLS.get(dataset_name, {"k_values": DEFAULT_K_VALUES})
  return {"name": dataset_name, "k_values": protocol["k_values"],
          "reid_k_values": protocol.get("reid_k_values")}
