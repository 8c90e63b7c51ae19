"""Experiment configurations: the shared base, the paper's rows, and validation.

Config files in `configs/` call `base_config()` or `paper_config(...)` and return the result from
`get_config(arg)`; `arg == "smoke"` shrinks everything to a seconds-long run (`smoke(config)`).
`validate(config)` checks a config before anything is built or compiled.
"""

from __future__ import annotations

import os

import ml_collections

from recall_jax.losses import LOSS_NAMES

_OPTIMIZERS = ("adam", "adamw", "sgd")
_DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (the official RS@k hyper-parameters)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "sop"
  c.data.root = ml_collections.FieldReference(None, field_type=str)  # else $RECALL_JAX_DATA
  c.data.path = ml_collections.FieldReference(None, field_type=str)  # dataset folder override
  c.data.train_split = "train"
  c.data.test_splits = ("test",)
  c.data.image_size = 224
  c.data.resize_size = 256
  c.data.channels = 3
  c.data.crop_scale = (0.08, 1.0)
  c.data.flip = True
  # Training classes at 1-4 quarter-turns, each turn a new class (data.RotatedClasses): 1 = off.
  c.data.rotated_classes = 1
  c.data.worker_count = 0  # grain worker processes for training batches
  c.data.in_memory = False  # hold the training split's encoded images in memory (small datasets)
  c.data.eval_batch_size = 256
  c.data.download = True  # Omniglot only: fetch missing archives from the official repository
  # Evaluate on the first N images of each test split only (smoke runs); None: all.
  c.data.max_eval_images = ml_collections.FieldReference(None, field_type=int)

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit_b16"
  c.model.embedding_dim = 512
  c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPUs
  c.model.pretrained = ml_collections.FieldReference(None, field_type=str)  # .npz / .safetensors
  # Centre the head on the first batch before training (needed from scratch: see
  # recall_jax.train.trainer.center_embedding_head). The paper starts from pretrained weights.
  c.model.center_head_init = False

  c.batch_size = 4000  # global mega-batch B (images per step)
  c.samples_per_class = 4  # m
  c.chunk_size = 100  # images embedded / back-propagated at once per device
  c.simix = False

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "recall_at_k"
  c.loss.k_values = (1, 2, 4, 8, 16)
  c.loss.tau1 = 1.0
  c.loss.tau2 = 0.01
  c.loss.count_query_in_rank = True
  c.loss.query_block = ml_collections.FieldReference(None, field_type=int)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-5
  c.optimizer.weight_decay = 4e-4
  c.optimizer.milestones = (25, 50)  # epochs at which the learning rate is multiplied by decay
  c.optimizer.decay = 0.3
  c.optimizer.warmup_steps = 0  # linear warm-up (not in the paper; helps from scratch)

  c.epochs = 55
  c.max_steps = ml_collections.FieldReference(None, field_type=int)  # stop early (smoke runs)
  c.eval_every_epochs = 5
  c.best_metric = "test/recall@1"
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  c.num_grid_queries = 8  # retrieval-grid PNG rows (0 disables it)
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


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a run of a few seconds on a CPU (same code paths)."""
  c.model.name = {"vit": "vit_tiny_test", "res": "resnet_tiny_test"}.get(c.model.name[:3],
                                                                          c.model.name)
  c.model.dtype = "float32"
  c.model.embedding_dim = 16
  c.model.pretrained = None
  c.data.image_size = 32
  c.data.resize_size = 36
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


def parse_arg(arg: str | None) -> set[str]:
  """Comma-separated config-file arguments, e.g. `configs/sop_vit.py:smoke`."""
  parts = {p.strip() for p in (arg or "").split(",") if p.strip()}
  unknown = parts - {"smoke"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known: smoke")
  return parts


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ValueError naming every problem of a config, before anything compiles.

  Args:
    c: the experiment config.
    num_devices: devices the global batch is split over (each needs whole chunks).
  """
  problems = []
  if c.batch_size <= 0 or c.samples_per_class <= 0 or c.chunk_size <= 0:
    problems.append("batch_size, samples_per_class and chunk_size must be positive")
  else:
    if c.batch_size % c.samples_per_class:
      problems.append(f"batch_size {c.batch_size} is not divisible by samples_per_class "
                      f"(m) {c.samples_per_class}")
    if c.batch_size % (c.chunk_size * num_devices):
      problems.append(f"batch_size {c.batch_size} is not divisible by chunk_size "
                      f"{c.chunk_size} x {num_devices} device(s)")
  if c.loss.name not in LOSS_NAMES:
    problems.append(f"loss.name {c.loss.name!r} is not one of {LOSS_NAMES}")
  if c.simix and c.loss.name != "recall_at_k":
    problems.append("simix is implemented for the recall_at_k loss only")
  if c.optimizer.name not in _OPTIMIZERS:
    problems.append(f"optimizer.name {c.optimizer.name!r} is not one of {_OPTIMIZERS}")
  if c.optimizer.learning_rate <= 0:
    problems.append("optimizer.learning_rate must be positive")
  if c.model.dtype not in _DTYPES:
    problems.append(f"model.dtype {c.model.dtype!r} is not one of {_DTYPES}")
  if c.epochs <= 0 or c.eval_every_epochs <= 0:
    problems.append("epochs and eval_every_epochs must be positive")
  if c.data.channels not in (1, 3):
    problems.append(f"data.channels must be 1 or 3, got {c.data.channels}")
  if c.data.rotated_classes not in (1, 2, 3, 4):
    problems.append(f"data.rotated_classes must be 1 (off), 2, 3 or 4 quarter-turns, got "
                    f"{c.data.rotated_classes}")
  if c.data.image_size > c.data.resize_size:
    problems.append(f"data.image_size {c.data.image_size} exceeds data.resize_size "
                    f"{c.data.resize_size}")
  if c.model.pretrained and not os.path.isfile(os.path.expanduser(c.model.pretrained)):
    problems.append(f"model.pretrained weights file {c.model.pretrained} does not exist")
  if problems:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))
