"""Experiment configurations: every key with its default, the paper's rows, smoke runs, validation.

`base_config()` is the one place the defaults live (each key with a one-line comment). Config files
in `configs/` start from it (or from `paper_config(...)`, one row of the paper's table), change a
few keys and return the result from `get_config(arg)`; `arg == "smoke"` shrinks any of them to a
seconds-long run (`smoke(config)`). `validate(config)` reports every problem of a config as one
`ConfigError`, before any data is prepared or anything compiles (the checks: `config_checks`).

Serves both tasks. Imports no JAX, flax or optax (nor any loss or data implementation): a loss's
config section and a dataset's protocol come from their specs (`losses.registry`,
`data.registry`), so loading a config file costs no JAX start-up.
"""

from __future__ import annotations

import ml_collections

from recall_jax import config_checks
from recall_jax import errors
from recall_jax.config_checks import evaluated_sets
from recall_jax.data import registry as datasets
from recall_jax.losses import registry as losses

__all__ = ["base_config", "paper_config", "smoke", "parse_arg", "landmark_config",
           "evaluated_sets", "eval_k_values", "validate", "loss_section"]


def _optional(field_type: type) -> ml_collections.FieldReference:
  """A key that defaults to None but takes a value of `field_type` from the command line."""
  return ml_collections.FieldReference(None, field_type=field_type)


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default: the paper's shared hyper-parameters (SOP, ViT-B/16)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameters, batches, augmentations and dropout all follow from it

  c.data = ml_collections.ConfigDict()
  c.data.name = "sop"  # a registered dataset (data.registry.DATASETS), e.g. omniglot, folder
  c.data.root = _optional(str)  # folder holding the datasets; None: $RECALL_JAX_DATA
  c.data.path = _optional(str)  # this dataset's folder, overriding <root>/<default folder>
  c.data.train_split = "train"  # split to train on
  c.data.test_splits = ("test",)  # splits evaluated leave-one-out (each image queries the rest)
  c.data.query_split = _optional(str)  # with gallery_split: queries searched in a separate gallery
  c.data.gallery_split = _optional(str)  # with query_split (replacing test_splits for evaluation)
  c.data.image_size = 224  # side of the square images the model sees, pixels
  c.data.resize_size = 256  # evaluation: shorter side before the centre crop, pixels
  c.data.channels = 3  # 3 (RGB) or 1 (grey)
  c.data.crop_scale = (0.08, 1.0)  # training random-resized-crop area range
  c.data.flip = True  # training horizontal flips
  c.data.rotated_classes = 1  # quarter-turns of each training class as new classes; 1: off
  c.data.worker_count = 0  # grain worker processes for training batches
  c.data.in_memory = False  # hold the training split's encoded images in memory (small datasets)
  c.data.decode_once = False  # with in_memory: hold them decoded (uint8), not encoded
  c.data.eval_batch_size = 256  # images per evaluation batch
  # Images with more pixels are refused from their header, undecoded: training and evaluation stop
  # with an error naming the record, search skips the image.
  c.data.max_image_pixels = 64_000_000
  c.data.download = True  # Omniglot only: fetch missing archives from the official repository
  c.data.max_eval_images = _optional(int)  # evaluate on the first N images of each split only
  c.data.aspect_buckets = 0  # >0: whole images (longer side image_size, padded + masked, ResNets)
  # aspect_buckets: each bucket's training slots sit this many standard deviations below its
  # expected count (data.bucket_plan); larger = fewer recompiles, more images in larger shapes
  c.data.bucket_margin = 5.0
  c.data.distractors = _optional(str)  # eval.datasets: "revisitop1m" added to each database
  c.data.check_sizes = True  # eval.datasets: refuse other than the official image counts

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit_b16"  # backbone (recall_jax.models.available_models())
  c.model.embedding_dim = 512  # output dimension of the embedding head
  c.model.dtype = "float32"  # compute dtype of the backbone; "bfloat16" on GPUs
  c.model.remat = "none"  # ViT/ResNet blocks: "block"/"dots" recompute in backward (GPU memory)
  c.model.pretrained = _optional(str)  # .npz / .safetensors weights for the backbone
  c.model.center_head_init = False  # centre the head on the first batch (training from scratch)
  c.model.head = _optional(str)  # ResNets: "embedding" or "landmark"; None: the model's own
  c.model.whiten = True  # landmark head: end with the whitening FC (D x D, with bias)
  c.model.whitening_init = _optional(str)  # landmark head: .npz whitening loaded into the FC

  c.batch_size = 4000  # global mega-batch B, images per step
  c.samples_per_class = 4  # m, images of each class in a batch
  c.chunk_size = 100  # images embedded / back-propagated at once per device
  c.simix = False  # SiMix virtual samples (losses whose spec allows it: recall_at_k)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "recall_at_k"  # a registered loss (losses.registry.LOSSES)
  c.loss.warmup_name = _optional(str)  # a loss for the first warmup_steps (cold starts); None: off
  c.loss.warmup_steps = 0  # steps trained with loss.warmup_name before switching to loss.name
  # Losses with learned parameters (proxy_anchor, normalized_softmax): their own learning rate,
  # with the optimizer's schedule and weight decay; None: 100 x optimizer.learning_rate (the
  # Proxy-Anchor paper's ratio).
  c.loss.param_learning_rate = _optional(float)
  # Cross-batch memory of the last memory_size embeddings (pair-based losses: the batch ranked
  # against batch + memory); 0: off. Filled from step memory_start_step on. On several devices
  # its rows are sharded like the batch: memory_size must be divisible by the device count.
  c.loss.memory_size = 0
  c.loss.memory_start_step = 0
  # One section per registered loss, `loss.<name>.<keyword>`: defaults and comments in its spec.
  for spec in losses.LOSSES.values():
    c.loss[spec.name] = loss_section(spec)

  c.eval = ml_collections.ConfigDict()
  c.eval.k_values = _optional(tuple)  # recall@k cut-offs; None: the dataset's, else (1, 2, 4, 8)
  c.eval.reid = False  # also the re-identification protocol (VehicleID only): keys 'reid_*'
  c.eval.datasets = ()  # revisited benchmarks (roxford5k, rparis6k), instead of data.test_splits
  c.eval.protocols = ("easy", "medium", "hard")  # revisited protocols written to metrics.jsonl
  c.eval.scales = (1.0,)  # revisited: descriptor scales, e.g. (1, 2**-0.5, 2**0.5)
  c.eval.whitening = _optional(str)  # revisited: .npz whitening applied to test descriptors
  c.eval.upscale = False  # revisited: enlarge images under data.image_size (reference: never)
  c.eval.whitening_target = "eval"  # --mode whiten for eval.whitening | fc_init: whitening_init
  c.eval.whitening_kind = "learned"  # --mode whiten: learned (same-class pairs) | pca
  c.eval.whitening_power = 0.5  # --mode whiten, pca: eigenvalue power (0.5 whitens; AP-GeM: 0.25)
  c.eval.whitening_dim = _optional(int)  # --mode whiten: output dimensions kept; None: all
  c.eval.whitening_ridge = 0.0  # --mode whiten, learned: + ridge * mean eigenvalue * I to pairs
  c.eval.qe_k = 0  # revisited: alpha query expansion over the k nearest (0: off)
  c.eval.qe_alpha = 3.0  # revisited: query expansion's similarity exponent
  c.eval.dba_k = 0  # revisited: database augmentation over the k nearest, the item itself excluded
  c.eval.dba_alpha = 3.0  # revisited: database augmentation's similarity exponent
  c.eval.cache_dir = _optional(str)  # distractor embeddings; None: <prepared root>/embeddings

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adam (L2 added to the gradient), adamw or sgd (momentum 0.9)
  c.optimizer.learning_rate = 5e-5  # peak learning rate
  c.optimizer.weight_decay = 4e-4  # on every parameter
  c.optimizer.milestones = (25, 50)  # epochs at which the learning rate is multiplied by decay
  c.optimizer.decay = 0.3  # learning-rate factor at each milestone
  c.optimizer.warmup_steps = 0  # linear warm-up (not in the paper; helps from scratch)

  c.epochs = 55  # training length
  c.max_steps = _optional(int)  # stop after this many steps (smoke runs); None: epochs
  c.eval_every_epochs = 5  # evaluate every this many epochs, and at the end
  c.best_metric = "test/recall@1"  # evaluation key whose best value is kept in <workdir>/best
  c.checkpoint_every_steps = 500  # save <workdir>/checkpoints every this many steps, and at the end
  c.keep_checkpoints = 2  # latest checkpoints kept
  c.log_every_steps = 10  # write a metrics.jsonl train row every this many steps
  c.num_grid_queries = 8  # retrieval-grid PNG rows (0 disables it)
  c.cold_start_checks = True  # RS@k: log the median positive rank early, warn if it cannot learn
  c.compilation_cache_dir = _optional(str)  # XLA cache; None: <workdir>/compilation_cache, "": off
  return c


def paper_config(dataset: str, backbone: str, *, batch_size: int, chunk_size: int,
                 optimizer: str, learning_rate: float, epochs: int,
                 milestones: tuple[int, ...]) -> ml_collections.ConfigDict:
  """One row of the paper's training table (official code's hyper-parameters)."""
  c = base_config()
  c.data.name = dataset
  c.data.test_splits = (("test_800", "test_1600", "test_2400") if dataset == "vehicleid"
                        else ("test",))
  c.model.name = backbone
  c.model.dtype = "bfloat16"
  c.batch_size = batch_size
  c.chunk_size = chunk_size
  c.optimizer.name = optimizer
  c.optimizer.learning_rate = learning_rate
  c.epochs = epochs
  c.optimizer.milestones = milestones
  c.eval_every_epochs = 5
  c.best_metric = f"{c.data.test_splits[0]}/recall@1"
  return c


_SMOKE_MODELS = {"vit": "vit_tiny_test", "res": "resnet_tiny_test"}
_SMOKE_IMAGE_SIZE, _SMOKE_RESIZE_SIZE = 32, 36


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a run of a few seconds on a CPU (same code paths).

  Only what is large shrinks: ViTs and ResNets become their tiny test variants (small models such
  as `small_cnn*` stay), images larger than 32 pixels become 32 (smaller ones stay), and the run
  takes 3 steps with batches of 32 and evaluates on 400 images.
  """
  c.model.name = _SMOKE_MODELS.get(c.model.name[:3], c.model.name)
  c.model.dtype = "float32"
  c.model.embedding_dim = 16
  c.model.pretrained = None
  if c.data.image_size > _SMOKE_IMAGE_SIZE:
    c.data.image_size = _SMOKE_IMAGE_SIZE
    c.data.resize_size = _SMOKE_RESIZE_SIZE
  c.batch_size = 32
  c.chunk_size = 16
  c.epochs = 1
  c.max_steps = 3
  c.data.max_eval_images = 400
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.data.eval_batch_size = 64
  c.num_grid_queries = 4
  return c


def parse_arg(arg: str | None, known: tuple[str, ...] = ("smoke",)) -> set[str]:
  """Comma-separated config-file arguments, e.g. `configs/sop_vit.py:smoke`.

  Raises:
    ConfigError: an argument not in `known`.
  """
  parts = {p.strip() for p in (arg or "").split(",") if p.strip()}
  unknown = parts - set(known)
  if unknown:
    raise errors.ConfigError(f"unknown config argument(s) {sorted(unknown)}; known: "
                             f"{', '.join(known)}")
  return parts


def landmark_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The landmark-retrieval recipe (ResNet-101 + GeM + whitening, RS@k) trained on `dataset`."""
  c = paper_config(
      dataset, "resnet101_landmark", batch_size=4096, chunk_size=16, optimizer="adam",
      learning_rate=1e-4, epochs=1000, milestones=())
  c.max_steps = 500  # The recipe counts steps, not epochs.
  c.model.embedding_dim = 2048  # D x D whitening FC.
  # .npz from `--mode whiten` (learned or PCA) written into the FC before training.
  c.model.whitening_init = None
  c.data.image_size = 1024  # longer side; no crop
  c.data.resize_size = 1024
  c.data.aspect_buckets = 4  # short-side steps per orientation (data.aspect_buckets.bucket_shapes)
  c.data.test_splits = ()
  c.data.distractors = None  # "revisitop1m": the 1M distractors added to each database
  c.eval.datasets = ("roxford5k", "rparis6k")
  c.eval.protocols = ("medium", "hard")
  # The gl18 scales (the TPAMI set is (1, 2**-0.5, 0.5)); sizes are rounded and downscaling is
  # antialiased, where the reference floors and does not antialias (docs/landmarks_model.md).
  c.eval.scales = (1.0, 2**-0.5, 2**0.5)
  c.eval.whitening = None  # test-time .npz from --mode whiten (eval.whitening_target="eval")
  c.eval.qe_k, c.eval.qe_alpha = 0, 3.0  # alpha query expansion (0: off)
  c.eval.dba_k, c.eval.dba_alpha = 0, 3.0  # database-side augmentation (0: off)
  c.eval_every_epochs = 1000  # evaluate at the end
  c.best_metric = "roxford5k/medium/map"
  parts = parse_arg(arg, known=("smoke", "apgem_eval"))
  if "apgem_eval" in parts:  # AP-GeM's protocol: one scale, PCA power 0.25 on the training set
    c.eval.scales = (1.0,)
    c.eval.whitening_target, c.eval.whitening_kind, c.eval.whitening_power = "eval", "pca", 0.25
  if "smoke" in parts:
    c = smoke(c)
    c.model.name = "resnet_tiny_landmark_test"
    c.data.image_size = c.data.resize_size = 64
    c.batch_size, c.chunk_size = 16, 8  # 4 landmarks x 4 images
    c.loss.recall_at_k.k_values = (1, 2, 4, 8)  # k < B - 1
    c.epochs = c.max_steps = c.eval_every_epochs = 2  # 2 steps, then the evaluation
    c.num_grid_queries = 0  # the revisited evaluation draws no retrieval grid
  return c


def eval_k_values(c: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The recall@k cut-offs: `eval.k_values`, else the dataset's protocol (else (1, 2, 4, 8))."""
  if c.eval.k_values:
    return tuple(int(k) for k in c.eval.k_values)
  return tuple(datasets.protocol_for(c.data.name)["k_values"])


def loss_section(spec: losses.LossSpec) -> ml_collections.ConfigDict:
  """A loss's config section: each keyword of its spec with its default (None defaults take
  their `field_type` from the command line)."""
  section = ml_collections.ConfigDict()
  for keyword, option in spec.options.items():
    section[keyword] = (_optional(option.field_type) if option.default is None
                        and option.field_type is not None else option.default)
  return section


def validate(c: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1) -> None:
  """Reports every problem of a config at once, before anything is prepared or compiled.

  Every numeric key is range-checked, and relations between keys are checked where the keys
  involved are in range (`config_checks.problems`).

  Args:
    c: the experiment config.
    num_devices: devices the global batch is split over (each needs whole chunks).
    num_processes: processes feeding the batch (each needs whole classes).

  Raises:
    ConfigError: naming every problem, one per line.
  """
  problems = config_checks.problems(c, num_devices, num_processes)
  if len(problems) == 1:
    raise errors.ConfigError(f"invalid config: {problems[0]}")
  if problems:
    raise errors.ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
