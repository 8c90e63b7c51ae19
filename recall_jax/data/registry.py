"""One spec per dataset: its folder, channels, parser, evaluation protocol and fingerprint inputs.

Serves both tasks (the category-level benchmarks, a user's `folder` data, and the instance-level
training sets). Pure Python, with no JAX or data-library import, so the config and its checks read
a dataset's protocol without loading anything; the parser is named as 'module:function' and
imported when a split is first prepared (`data.datasets.load_split`). The splits are whatever the
parser returns. Adding a dataset in a new on-disk format is one parser (`data/parsing.py`) plus
one entry in `DATASETS` (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from recall_jax.lazy import load_function

__all__ = ["DATASETS", "DEFAULT_K_VALUES", "DatasetSpec", "dataset_spec", "load_function",
           "protocol_for"]

# Recall@k cut-offs of a dataset without a published protocol (a user's own data).
DEFAULT_K_VALUES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything the library knows about a dataset besides its images.

  Attributes:
    name: the config name (`data.name`).
    folder: the folder under the data root holding it by default.
    parser: 'module:function' turning the dataset folder into `{split: parsing.SplitPlan}`.
    annotations: the files (relative to the folder) a prepared copy's fingerprint covers: what
      the parser reads, so editing them prepares the copy again (images are not walked).
    channels: what its images are stored and decoded as: 3 (RGB) or 1 (grey).
    k_values: the recall@k cut-offs of its evaluation protocol.
    reid_k_values: the cut-offs of its re-identification protocol, or None when it has none.
    user_splits: any split name is accepted and prepared on its own (a user's `folder` data): the
      parser takes (folder, split, shared label splits), and the fingerprint covers every file
      `inputs` lists for those splits instead of `annotations`.
    inputs: with `user_splits`, 'module:function' of (folder, splits) -> the files defining them.
    fetch: 'module:function' of (folder, url_base=, download=) fetching missing files, or None
      when the files are placed by hand.
    official_page: where the official files are published (named when they are missing).
  """
  name: str
  folder: str
  parser: str
  annotations: tuple[str, ...] = ()
  channels: int = 3
  k_values: tuple[int, ...] = DEFAULT_K_VALUES
  reid_k_values: tuple[int, ...] | None = None
  user_splits: bool = False
  inputs: str | None = None
  fetch: str | None = None
  official_page: str | None = None

  def parse(self, folder: pathlib.Path, split: str | None = None,
            shared: Sequence[str] = ()) -> dict[str, Any]:
    """`{split: SplitPlan}` of the files in `folder` (`split` and `shared`: `user_splits` only)."""
    if self.user_splits:
      return load_function(self.parser)(folder, split, shared)
    return load_function(self.parser)(folder)

  def fingerprint_files(self, folder: pathlib.Path, splits: Sequence[str]) -> list[pathlib.Path]:
    """The files whose sizes and modification times a prepared copy's fingerprint covers."""
    if self.inputs is not None:
      return load_function(self.inputs)(folder, splits)
    return [folder / name for name in self.annotations]


_PARSING = "recall_jax.data.parsing"
_VEHICLEID_LISTS = ("train_list.txt", "test_list_800.txt", "test_list_1600.txt",
                    "test_list_2400.txt")

# The registered datasets, one entry each: config name -> spec.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("sop", "Stanford_Online_Products", f"{_PARSING}:parse_sop",
                ("Ebay_train.txt", "Ebay_test.txt"), k_values=(1, 10, 100, 1000),
                official_page="https://cvgl.stanford.edu/projects/lifted_struct/"),
    DatasetSpec("inat2018", "inaturalist2018", f"{_PARSING}:parse_inat2018",
                ("Inaturalist_train_set1.txt", "Inaturalist_test_set1.txt"),
                k_values=(1, 4, 16, 32),
                official_page="https://github.com/visipedia/inat_comp/tree/master/2018"),
    DatasetSpec("vehicleid", "VehicleID_V1.0", f"{_PARSING}:parse_vehicleid",
                tuple(f"train_test_split/{n}" for n in _VEHICLEID_LISTS), k_values=(1, 5),
                reid_k_values=(1, 5),
                official_page="https://www.pkuml.org/resources/pku-vehicleid.html"),
    DatasetSpec("cars196", "cars196", f"{_PARSING}:parse_cars196", ("cars_annos.mat",),
                k_values=(1, 2, 4, 8, 16),
                official_page="https://ai.stanford.edu/~jkrause/cars/car_dataset.html"),
    DatasetSpec("cub200", "CUB_200_2011", f"{_PARSING}:parse_cub200", ("images.txt",),
                k_values=(1, 2, 4, 8, 16),
                official_page="https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    # Characters are 1-bit strokes: stored and decoded as single-channel images.
    DatasetSpec("omniglot", "omniglot", f"{_PARSING}:parse_omniglot",
                ("images_background.zip", "images_evaluation.zip"), channels=1,
                fetch="recall_jax.data.download:ensure_omniglot"),
    DatasetSpec("folder", "folder", f"{_PARSING}:parse_folder", user_splits=True,
                inputs=f"{_PARSING}:folder_inputs"),
    # Landmark training sets (classes: landmarks / 3D models). GLDv1 skips missing images: the
    # `train` folder's own modification time changes when images are added.
    DatasetSpec("gldv2_clean", "gldv2", f"{_PARSING}:parse_gldv2_clean", ("train_clean.csv",),
                official_page="https://github.com/cvdfoundation/google-landmark"),
    DatasetSpec("gldv1", "gldv1", f"{_PARSING}:parse_gldv1", ("train.csv", "train"),
                official_page="https://www.kaggle.com/c/landmark-retrieval-challenge"),
    DatasetSpec("sfm120k", "retrieval-SfM-120k", f"{_PARSING}:parse_sfm120k",
                ("retrieval-SfM-120k.pkl",),
                official_page="http://cmp.felk.cvut.cz/cnnimageretrieval/"),
)}


def dataset_spec(name: str) -> DatasetSpec | None:
  """The spec registered as `name`, or None for an unregistered name."""
  return DATASETS.get(name)


def protocol_for(dataset_name: str) -> dict[str, Any]:
  """{'name': dataset name, 'k_values': recall@k cut-offs, 'reid_k_values': cut-offs of the
  optional re-identification protocol or None}. A fresh dict each call.

  A dataset without a published protocol (unregistered) gets `DEFAULT_K_VALUES` and no
  re-identification.
  """
  spec = dataset_spec(dataset_name)
  if spec is None:
    return {"name": dataset_name, "k_values": DEFAULT_K_VALUES, "reid_k_values": None}
  return {"name": dataset_name, "k_values": spec.k_values, "reid_k_values": spec.reid_k_values}
