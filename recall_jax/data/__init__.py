"""Datasets, the m-per-class batch sampler and the grain input pipeline.

Serves both tasks. Importing this package imports no data library or JAX: each name below is
imported from its module when first looked up.

- `load_split(name, split)`: a prepared split (tensorflow-datasets ArrayRecord, encoded images);
  `source.skipped` lists the images skipped as unreadable.
- `DATASETS` / `dataset_spec(name)`: one spec per dataset (folder, parser, channels, protocol).
- `MPerClassSampler`: deterministic, index-addressable class-balanced batches.
- `make_train_loader` / `make_eval_loader`: grain pipelines yielding uint8 NHWC batches.
- `make_bucketed_train_loader` / `make_bucketed_eval_loader`: whole images (longer side kept,
  padded into aspect buckets), the validity mask as a last channel (`split_mask_channel`);
  training batches are per-bucket arrays of a `BucketPlan`'s fixed capacities
  (`estimate_bucket_plan`, `assign_slots`, `pad_buckets`, `flat_slots`).
- `InMemorySource`: a small split's encoded records held in memory.
- `RotatedClasses`: quarter-turns of the training classes as new classes (Omniglot).
- `decode_image`: any image PIL opens as uint8 (H, W, 1 or 3).
- `landmarks`: R-Oxford / R-Paris (+R1M distractors) and the landmark training sets' files.
"""

import importlib as _importlib

# Public name -> the module (under recall_jax.data) defining it.
_LAZY = {
    **dict.fromkeys(("make_bucketed_eval_loader", "make_bucketed_train_loader",
                     "split_mask_channel", "with_mask_channel"), "bucketed_pipeline"),
    **dict.fromkeys(("BucketedImages", "BucketPlan", "assign_slots", "estimate_bucket_plan",
                     "estimate_plan", "flat_slots", "image_hw", "pad_buckets"), "bucket_plan"),
    **dict.fromkeys(("RetrievalSource", "check_image", "load_split"), "datasets"),
    **dict.fromkeys(("DATASETS", "DatasetSpec", "dataset_spec"), "registry"),
    **dict.fromkeys(("OMNIGLOT_URL_BASE", "download_file", "ensure_omniglot"), "download"),
    **dict.fromkeys(("DATA_ENV_VAR", "data_root", "default_cache_dir", "prepared_root"),
                    "paths"),
    "FirstN": "first_n",
    "InMemorySource": "in_memory",
    **dict.fromkeys(("make_eval_loader", "make_train_loader"), "pipeline"),
    "RotatedClasses": "rotated_classes",
    "MPerClassSampler": "sampler",
    **dict.fromkeys(("decode_image", "eval_transform", "random_resized_crop_box",
                     "train_augment"), "transforms"),
}
_SUBMODULES = ("aspect_buckets", "bucket_plan", "bucketed_pipeline", "datasets", "download",
               "first_n", "in_memory", "landmarks", "parsing", "paths", "pipeline", "registry",
               "rotated_classes", "safe_pickle", "sampler", "source", "transforms")

__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  if name in _SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
