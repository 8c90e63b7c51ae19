"""Every check of a config, in one place: ranges, relations between keys, and resume safety.

Serves both tasks. Pure functions of the config, with no JAX or data import (the loss and dataset
facts come from their registries' specs, the batch rules from `batch_layout`); a problem is a line
of text, and `config.validate` reports every problem of a config at once.

`problems(config, num_devices, num_processes)` is what `config.validate` reports: the ranges,
then the relations between keys whose values are in range. `config_problems(config)` names every
key whose value is outside its range (a count of zero, a negative step, a NaN learning rate...),
so a bad value is refused before anything is built instead of surfacing later as a
ZeroDivisionError, a NaN loss or a run that silently does nothing; a loss's keywords are checked
by the rules of its spec (`losses.registry`). `config_differences(stored, config)` compares the
config a run was started with (`<workdir>/config.json`) with the one resuming it, naming the keys
the checkpoints depend on.

Keys are looked up defensively: a key absent from the config is not checked, and loss options are
found both directly under `loss` and in per-loss sections (`loss.recall_at_k.tau1`).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from recall_jax import errors
from recall_jax import ranges
from recall_jax.batch_layout import batch_layout_problems
from recall_jax.data import registry as datasets
from recall_jax.losses import registry as losses

_MISSING = object()


def _lookup(tree: Any, dotted: str) -> Any:
  node = tree
  for part in dotted.split("."):
    if isinstance(node, (Mapping, ml_collections.ConfigDict)) and part in node:
      node = node[part]
    else:
      return _MISSING
  return node


_RANGES: tuple[tuple[str, ranges.Rule], ...] = (
    ("seed", ranges.int_at_least(0)),
    ("batch_size", ranges.int_at_least(1)),
    ("samples_per_class",
     ranges.int_at_least(2, " (with one image per class no query has a positive)")),
    ("chunk_size", ranges.int_at_least(1)),
    ("epochs", ranges.int_at_least(1)),
    ("max_steps", ranges.optional_int_at_least(1, "train for `epochs`")),
    ("eval_every_epochs", ranges.int_at_least(1)),
    ("checkpoint_every_steps", ranges.int_at_least(1)),
    ("keep_checkpoints", ranges.int_at_least(1, " (0 would delete every checkpoint)")),
    ("log_every_steps", ranges.int_at_least(1)),
    ("num_grid_queries", ranges.int_at_least(0)),
    ("data.image_size", ranges.int_at_least(1)),
    ("data.resize_size", ranges.int_at_least(1)),
    ("data.channels", ranges.one_of((1, 3))),
    ("data.rotated_classes", ranges.one_of((1, 2, 3, 4))),
    ("data.crop_scale", ranges.crop_scale),
    ("data.worker_count", ranges.int_at_least(0)),
    ("data.eval_batch_size", ranges.int_at_least(1)),
    ("data.max_image_pixels", ranges.int_at_least(1)),
    ("data.max_eval_images", ranges.optional_int_at_least(1, "every image")),
    ("model.embedding_dim", ranges.int_at_least(1)),
    ("optimizer.learning_rate", ranges.finite(above=0)),
    ("optimizer.weight_decay", ranges.finite(at_least=0)),
    ("optimizer.decay", ranges.finite(above=0, at_most=1)),
    ("optimizer.warmup_steps", ranges.int_at_least(0)),
    ("optimizer.milestones", ranges.increasing_positive_ints(
        "a strictly increasing sequence of positive epochs (may be empty)", allow_empty=True)),
    ("eval.k_values", ranges.optional_positive_ints),
    ("data.aspect_buckets", ranges.int_at_least(0)),
    ("data.bucket_margin", ranges.finite(at_least=0)),
    ("eval.qe_k", ranges.int_at_least(0)),
    ("eval.qe_alpha", ranges.finite(at_least=0)),
    ("eval.dba_k", ranges.int_at_least(0)),
    ("eval.dba_alpha", ranges.finite(at_least=0)),
    ("loss.param_learning_rate", lambda v: None if v is None else ranges.finite(above=0)(v)),
    ("loss.memory_size", ranges.int_at_least(0)),
    ("loss.memory_start_step", ranges.int_at_least(0)),
)

def _loss_rule(loss: str | None, keyword: str) -> ranges.Rule | None:
  """The range rule of a loss keyword: from the loss's spec, else (a keyword of another loss, in
  the flat layout) from the first registered loss taking it; None when none checks it."""
  specs = [losses.LOSSES[loss]] if loss in losses.LOSSES else []
  specs += list(losses.LOSSES.values())
  for spec in specs:
    if keyword in spec.options:
      return spec.options[keyword].rule
  return None


def _loss_options(config: Any) -> list[tuple[str, Any, ranges.Rule]]:
  """(dotted key, value, rule) of every range-checked loss option: `loss.<section>.<kwarg>`
  by the spec of the loss `<section>`, and `loss.<kwarg>` by the spec of `loss.name`."""
  loss = _lookup(config, "loss")
  if not isinstance(loss, (Mapping, ml_collections.ConfigDict)):
    return []
  found = []
  for name in loss:
    value = loss[name]
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      spec = losses.LOSSES.get(name)
      options = spec.options if spec is not None else {}
      found += [(f"loss.{name}.{kw}", value[kw], options[kw].rule) for kw in value
                if kw in options and options[kw].rule is not None]
    elif (rule := _loss_rule(loss.get("name"), name)) is not None:
      found.append((f"loss.{name}", value, rule))
  return found


def config_problems(config: ml_collections.ConfigDict | Mapping[str, Any]) -> list[str]:
  """Every numeric key of `config` whose value is out of range, one line each.

  Only ranges are checked here; relations between keys (divisibility of the batch, image size
  against resize size) need values in range and are checked after these pass.

  Args:
    config: an experiment config (or its JSON as nested dicts).

  Returns:
    Lines like `keep_checkpoints must be an integer >= 1 (0 would delete every checkpoint),
    got 0`; empty when every present key is in range.
  """
  problems = []
  for key, rule in _RANGES:
    value = _lookup(config, key)
    if value is not _MISSING and (problem := rule(value)) is not None:
      problems.append(f"{key} {problem}")
  for key, value, rule in _loss_options(config):
    if (problem := rule(value)) is not None:
      problems.append(f"{key} {problem}")
  return problems


_OPTIMIZERS = ("adam", "adamw", "sgd")
_DTYPES = ("float32", "bfloat16", "float16")
# The instance-level evaluation's names, kept here rather than imported so that validating a
# config imports no data or JAX code; the tests check them against `data.landmarks` and
# `evaluation.revisited`.
REVISITED_DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = ("revisitop1m",)
PROTOCOLS = ("easy", "medium", "hard")
HEADS = ("embedding", "landmark")
# Models whose forward pass takes a pixel validity mask (`mask=`).
_MASKED_MODEL_PREFIX = "resnet"


def revisited_settings(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The prefixes of the revisited metrics: each dataset, then each with the distractors.

  E.g. ('roxford5k', 'rparis6k', 'roxford5k+revisitop1m', 'rparis6k+revisitop1m').
  """
  names = tuple(c.eval.datasets)
  if c.data.get("distractors"):
    names += tuple(f"{n}+{c.data.distractors}" for n in names)
  return names


def evaluated_sets(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the evaluated sets, the prefixes of the evaluation keys ('test' in 'test/recall@1').

  The revisited settings (`eval.datasets`), else each test split evaluated leave-one-out, or the
  query split when queries are searched in a separate gallery (`data.query_split` and
  `data.gallery_split`).
  """
  if c.eval.get("datasets"):
    return revisited_settings(c)
  if c.data.query_split and c.data.gallery_split:
    return (c.data.query_split,)
  return tuple(c.data.test_splits)


def problems(c: ml_collections.ConfigDict, num_devices: int = 1,
             num_processes: int = 1) -> list[str]:
  """Every problem of a config, one line each: ranges first, then relations between keys.

  Relations are checked where the keys involved are in range.

  Args:
    c: the experiment config.
    num_devices: devices the global batch is split over (each needs whole chunks).
    num_processes: processes feeding the batch (each needs whole classes).

  Returns:
    One line per problem; empty when the config is valid.
  """
  # Ranges first: the relations between keys below assume their values are in range.
  found = config_problems(c)
  out_of_range = {p.split(" ", 1)[0] for p in found}
  in_range = lambda *keys: not out_of_range.intersection(keys)
  if in_range("batch_size", "chunk_size", "samples_per_class"):
    found += batch_layout_problems(c.batch_size, c.chunk_size, num_devices, num_processes,
                                   c.samples_per_class)
  found += _loss_problems(c, in_range)
  found += _memory_layout_problems(c, num_devices)
  if c.data.decode_once and not c.data.in_memory:
    found.append("data.decode_once needs data.in_memory (it holds the decoded images)")
  if c.optimizer.name not in _OPTIMIZERS:
    found.append(f"optimizer.name {c.optimizer.name!r} is not one of {_OPTIMIZERS}")
  if c.model.dtype not in _DTYPES:
    found.append(f"model.dtype {c.model.dtype!r} is not one of {_DTYPES}")
  if in_range("data.image_size", "data.resize_size") and c.data.image_size > c.data.resize_size:
    found.append(f"data.image_size {c.data.image_size} exceeds data.resize_size "
                 f"{c.data.resize_size}")
  if c.get("compilation_cache_dir") and os.path.isfile(
      os.path.expanduser(c.compilation_cache_dir)):
    found.append(f"compilation_cache_dir {c.compilation_cache_dir!r} is a file, not a folder")
  found += _file_problem("model.pretrained weights", c.model.pretrained)
  found += _evaluation_problems(c)
  found += _landmark_problems(c)
  return found


def _loss_problems(c: ml_collections.ConfigDict, in_range) -> list[str]:
  names = losses.loss_names()
  found = []
  spec = losses.LOSSES.get(c.loss.name)
  if spec is None:
    found.append(f"loss.name {c.loss.name!r} is not one of {names}")
  found += _warmup_problems(c)
  simix_losses = [n for n, s in losses.LOSSES.items() if s.simix]
  if c.simix and (spec is None or not spec.simix):
    found.append(f"simix is implemented for the {' / '.join(simix_losses)} loss only")
  found += _memory_problems(c, spec)
  if c.loss.warmup_name in losses.LOSSES and losses.LOSSES[c.loss.warmup_name].parameters:
    found.append(f"loss.warmup_name {c.loss.warmup_name!r} has learned parameters; a warm-up "
                 "loss must have none")
  if (spec is not None and "k_values" in spec.options
      and in_range("batch_size", f"loss.{c.loss.name}.k_values")):
    too_large = [k for k in c.loss[c.loss.name].k_values if k >= c.batch_size - 1]
    if too_large:
      found.append(f"loss.{c.loss.name}.k_values {too_large} are not below batch_size - 1 = "
                   f"{c.batch_size - 1}: such a k is met whatever the embeddings")
  return found


def _memory_problems(c: ml_collections.ConfigDict, spec: losses.LossSpec | None) -> list[str]:
  size = c.loss.get("memory_size", 0)
  if spec is None or not isinstance(size, int) or size <= 0:
    return []
  with_memory = [n for n, s in losses.LOSSES.items() if s.database_function]
  if spec.database_function is None:
    return [f"loss.memory_size: loss {spec.name!r} takes no cross-batch memory (these do: "
            f"{' / '.join(with_memory)})"]
  if c.simix:
    return ["loss.memory_size: a cross-batch memory does not combine with simix (the memory "
            "would hold mixed embeddings)"]
  return []


def _memory_layout_problems(c: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  size = c.loss.get("memory_size", 0)
  if isinstance(size, int) and size > 0 and size % num_devices:
    return [f"loss.memory_size {size} must be divisible by the {num_devices} devices (each "
            f"holds an equal share of the memory's rows): try "
            f"{max(num_devices, size // num_devices * num_devices)}"]
  return []


def _warmup_problems(c: ml_collections.ConfigDict) -> list[str]:
  name, steps, names = c.loss.warmup_name, c.loss.warmup_steps, losses.loss_names()
  if steps < 0:
    return [f"loss.warmup_steps must be >= 0, got {steps}"]
  if not name:
    return ([f"loss.warmup_steps = {steps} needs loss.warmup_name (one of {names})"]
            if steps else [])
  if name not in names:
    return [f"loss.warmup_name {name!r} is not one of {names}"]
  if not steps:
    return [f"loss.warmup_name {name!r} needs loss.warmup_steps > 0"]
  return []


def _evaluation_problems(c: ml_collections.ConfigDict) -> list[str]:
  found = []
  if bool(c.data.query_split) != bool(c.data.gallery_split):
    found.append("data.query_split and data.gallery_split must be set together (or neither: "
                 "leave-one-out on data.test_splits)")
  elif not evaluated_sets(c):
    found.append("data.test_splits names no split to evaluate")
  if c.eval.reid and datasets.protocol_for(c.data.name)["reid_k_values"] is None:
    with_reid = [n for n, s in datasets.DATASETS.items() if s.reid_k_values is not None]
    found.append(f"eval.reid: dataset {c.data.name!r} has no re-identification protocol "
                 f"({' / '.join(with_reid)} has)")
  prefix = c.best_metric.split("/", 1)[0]
  if evaluated_sets(c) and prefix not in evaluated_sets(c):
    found.append(f"best_metric {c.best_metric!r} names no evaluated set; evaluated: "
                 f"{list(evaluated_sets(c))} (e.g. '{evaluated_sets(c)[0]}/"
                 f"{'medium/map' if c.eval.get('datasets') else 'recall@1'}')")
  return found


def _file_problem(key: str, value: str | None) -> list[str]:
  if value and not os.path.isfile(os.path.expanduser(value)):
    return [f"{key} file {value} does not exist"]
  return []


WHITENING_TARGETS = ("eval", "fc_init")
WHITENING_KINDS = ("learned", "pca")


def whitening_space(c: ml_collections.ConfigDict, target: str) -> dict[str, object]:
  """The descriptors a whitening for `target` is learned on and applied to (`--mode whiten`).

  'eval': those `eval.whitening` whitens, the model's output at `eval.scales` (after the landmark
  head's FC when `model.whiten`); 'fc_init': the single-scale L2-normalised GeM that
  `model.whitening_init`'s FC takes. Two targets with the same descriptors share a space.
  """
  fc = target != "fc_init" and bool(c.model.get("whiten", True))
  return {"model": c.model.name, "head": c.model.get("head"), "fc": fc,
          "embedding_dim": c.model.embedding_dim if fc else None,
          "scales": [1.0] if target == "fc_init" else [float(s) for s in c.eval.scales]}


def read_whitening_space(path: str) -> dict[str, object] | None:
  """The space recorded in a whitening `.npz` (its `space` JSON string); None when none is."""
  path = os.path.expanduser(path)
  if not zipfile.is_zipfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      return json.loads(str(data["space"])) if "space" in data.files else None
  except (OSError, ValueError, TypeError, zipfile.BadZipFile):
    return None  # A damaged file is reported when it is loaded.


def _whitening_space_problem(c: ml_collections.ConfigDict, key: str, target: str) -> list[str]:
  path = c.get(key.split(".")[0]).get(key.split(".")[1])
  if not path or not os.path.isfile(os.path.expanduser(path)):
    return []
  recorded = read_whitening_space(path)
  if recorded is None:
    return []  # No record (an older or hand-made file): its size is checked when it is loaded.
  expected = whitening_space(c, target)
  differ = sorted(k for k in expected if recorded.get(k) != expected[k])
  if not differ:
    return []
  return [f"{key} file {path} was learned for " + ", ".join(
      f"{k}={recorded.get(k)!r}" for k in differ) + " but is applied with " + ", ".join(
          f"{k}={expected[k]!r}" for k in differ) + " (learn it again with --mode whiten and "
      f"--config.eval.whitening_target={target})"]


def _whitening_option_problems(c: ml_collections.ConfigDict) -> list[str]:
  found = []
  e = c.eval
  if e.get("whitening_target", "eval") not in WHITENING_TARGETS:
    found.append(f"eval.whitening_target must be one of {WHITENING_TARGETS}, got "
                    f"{e.whitening_target!r}")
  if e.get("whitening_kind", "learned") not in WHITENING_KINDS:
    found.append(f"eval.whitening_kind must be one of {WHITENING_KINDS}, got "
                    f"{e.whitening_kind!r}")
  power = e.get("whitening_power", 0.5)
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power <= 1:
    found.append(f"eval.whitening_power must be a number in [0, 1], got {power!r}")
  dim = e.get("whitening_dim")
  if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
    found.append(f"eval.whitening_dim must be None or a positive integer, got {dim!r}")
  ridge = e.get("whitening_ridge", 0.0)
  if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (
      math.isfinite(ridge) and ridge >= 0):
    found.append(f"eval.whitening_ridge must be a finite number >= 0, got {ridge!r}")
  if not isinstance(e.get("upscale", False), bool):
    found.append(f"eval.upscale must be True or False, got {e.upscale!r}")
  return found


def _landmark_problems(c: ml_collections.ConfigDict) -> list[str]:
  """Every problem of the instance-level keys (revisited evaluation, aspect buckets, heads)."""
  found = []
  eval_datasets = tuple(c.eval.get("datasets", ()))
  unknown = [d for d in eval_datasets if d not in REVISITED_DATASETS]
  if unknown:
    found.append(f"eval.datasets {unknown} are not among {REVISITED_DATASETS}")
  protocols = tuple(c.eval.get("protocols", PROTOCOLS))
  if not protocols or any(p not in PROTOCOLS for p in protocols):
    found.append(f"eval.protocols must name some of {PROTOCOLS}, got {protocols}")
  distractors = c.data.get("distractors")
  if distractors is not None and distractors not in DISTRACTORS:
    found.append(f"data.distractors must be None or one of {DISTRACTORS}, got "
                 f"{distractors!r}")
  if distractors and not eval_datasets:
    found.append("data.distractors extends the revisited databases: set eval.datasets too")
  scales = c.eval.get("scales", (1.0,))
  if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float))
                       or not math.isfinite(s) or s <= 0 for s in scales):
    found.append(f"eval.scales must be positive numbers, got {scales}")
  buckets = c.data.get("aspect_buckets", 0)
  if (buckets or eval_datasets) and not c.model.name.startswith(_MASKED_MODEL_PREFIX):
    found.append(f"data.aspect_buckets and eval.datasets need a model taking a pixel mask (a "
                 f"ResNet), not {c.model.name!r}")
  if buckets and c.model.get("center_head_init"):
    found.append("model.center_head_init is not available with data.aspect_buckets")
  head = c.model.get("head")
  if head is not None and head not in HEADS:
    found.append(f"model.head must be None or one of {HEADS}, got {head!r}")
  if head is not None and not c.model.name.startswith(_MASKED_MODEL_PREFIX):
    found.append(f"model.head applies to ResNets, not {c.model.name!r}")
  if c.model.get("whitening_init") and (head or ("landmark" if "landmark" in c.model.name
                                                 else "embedding")) != "landmark":
    found.append("model.whitening_init needs the landmark head (model.head='landmark')")
  if c.model.get("whitening_init") and not c.model.get("whiten", True):
    found.append("model.whitening_init needs the whitening FC (model.whiten=True)")
  found += _file_problem("model.whitening_init", c.model.get("whitening_init"))
  found += _file_problem("eval.whitening", c.eval.get("whitening"))
  found += _whitening_option_problems(c)
  found += _whitening_space_problem(c, "eval.whitening", "eval")
  found += _whitening_space_problem(c, "model.whitening_init", "fc_init")
  return found


# What the checkpoints and the batch sequence of a run depend on: the state's structure and
# shapes (model, image size and channels, optimizer, the cross-batch memory) and which images
# each step sees.
RESUME_KEYS: tuple[str, ...] = (
    "model.name",
    "model.embedding_dim",
    "model.dtype",
    "model.head",
    "model.whiten",
    "data.image_size",
    "data.channels",
    "optimizer.name",
    "data.name",
    "data.train_split",
    "data.rotated_classes",
    "batch_size",
    "samples_per_class",
    "seed",
    "loss.memory_size",
)


def _as_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Any:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def config_differences(stored: Mapping[str, Any],
                       current: ml_collections.ConfigDict | Mapping[str, Any]) -> list[str]:
  """The keys in `RESUME_KEYS` whose values differ between a stored and the current config.

  A key missing from either side (an older config file) is not compared. Tuples and lists
  compare equal, as the stored config is JSON.

  Args:
    stored: the run's `config.json`, parsed.
    current: the config the run is resumed with.

  Returns:
    Lines like `model.embedding_dim: 512 when the run started, 128 now`.
  """
  stored, current = _as_json(stored), _as_json(current)
  lines = []
  for key in RESUME_KEYS:
    before, now = _lookup(stored, key), _lookup(current, key)
    if before is not _MISSING and now is not _MISSING and before != now:
      lines.append(f"{key}: {json.dumps(before)} when the run started, {json.dumps(now)} now")
  return lines + _loss_parameter_difference(stored, current)


def _loss_parameter_difference(stored: Any, current: Any) -> list[str]:
  """A change of loss that changes the learned parameters the checkpoints hold (proxies, class
  weights): to a loss without, from one without, or to another loss's (same shape, other
  meaning). Losses without parameters can be swapped freely (a warm-up does)."""
  before, now = _lookup(stored, "loss.name"), _lookup(current, "loss.name")
  if _MISSING in (before, now) or before == now:
    return []
  described = lambda name: (
      f"{json.dumps(name)} (learned parameters in the checkpoints)"
      if name in losses.LOSSES and losses.LOSSES[name].parameters else
      f"{json.dumps(name)} (no learned parameters)")
  if not any(name in losses.LOSSES and losses.LOSSES[name].parameters for name in (before, now)):
    return []
  return [f"loss.name: {described(before)} when the run started, {described(now)} now"]


def check_resume_compatible(stored: Mapping[str, Any] | None,
                            current: ml_collections.ConfigDict, *, source: str) -> None:
  """Refuses to resume a run with a config its checkpoints do not fit.

  Call it before writing the new `config.json` and before restoring anything.

  Args:
    stored: the run's stored config (None: a new run, nothing to compare).
    current: the config of this invocation.
    source: where `stored` was read from, for the message (e.g. `runs/x/config.json`).

  Raises:
    ConfigError: naming every differing key.
  """
  if stored is None:
    return
  lines = config_differences(stored, current)
  if lines:
    raise errors.ConfigError(
        f"cannot resume with this config: it differs from {source} in keys the checkpoints "
        "depend on (use another --workdir, or set them back):\n  - " + "\n  - ".join(lines))
