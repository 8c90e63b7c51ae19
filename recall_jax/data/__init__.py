"""Datasets, the m-per-class batch sampler and the grain input pipeline.

- `load_split(name, split)`: a prepared split (tensorflow-datasets ArrayRecord, encoded images);
  `source.skipped` lists the images skipped as unreadable.
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

from recall_jax.data.bucketed_pipeline import (make_bucketed_eval_loader,
                                               make_bucketed_train_loader, split_mask_channel,
                                               with_mask_channel)
from recall_jax.data.bucket_plan import (BucketedImages, BucketPlan, assign_slots,
                                         estimate_bucket_plan, estimate_plan, flat_slots,
                                         image_hw, pad_buckets)
from recall_jax.data.datasets import (CHANNELS, DEFAULT_FOLDERS, SPLITS, RetrievalSource,
                                      check_image, load_split)
from recall_jax.data.download import OMNIGLOT_URL_BASE, download_file, ensure_omniglot
from recall_jax.data.paths import DATA_ENV_VAR, data_root, default_cache_dir, prepared_root
from recall_jax.data.first_n import FirstN
from recall_jax.data.in_memory import InMemorySource
from recall_jax.data import landmarks, safe_pickle
from recall_jax.data.pipeline import make_eval_loader, make_train_loader
from recall_jax.data.rotated_classes import RotatedClasses
from recall_jax.data.sampler import MPerClassSampler
from recall_jax.data.transforms import (decode_image, eval_transform, random_resized_crop_box,
                                        train_augment)
