"""Range checks of a config's numeric keys, and the keys a resumed run must not change.

`config_problems(config)` names every key whose value is outside its range (a count of zero, a
negative step, a NaN learning rate...), so a bad value is refused before anything is built
instead of surfacing later as a ZeroDivisionError, a NaN loss or a run that silently does
nothing. `config_differences(stored, config)` compares the config a run was started with
(`<workdir>/config.json`) with the one resuming it, naming the keys the checkpoints depend on.

Keys are looked up defensively: a key absent from the config is not checked, and loss options are
found both directly under `loss` and in per-loss sections (`loss.recall_at_k.tau1`).
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from recall_jax import errors

_MISSING = object()

Rule = Callable[[Any], "str | None"]


def _lookup(tree: Any, dotted: str) -> Any:
  node = tree
  for part in dotted.split("."):
    if isinstance(node, (Mapping, ml_collections.ConfigDict)) and part in node:
      node = node[part]
    else:
      return _MISSING
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(low: int, why: str = "") -> Rule:
  def rule(value):
    if not (_is_int(value) and value >= low):
      return f"must be an integer >= {low}{why}, got {value!r}"
    return None
  return rule


def _optional_int_at_least(low: int, none_means: str) -> Rule:
  def rule(value):
    if value is not None and not (_is_int(value) and value >= low):
      return f"must be None ({none_means}) or an integer >= {low}, got {value!r}"
    return None
  return rule


def _finite(*, above: float | None = None, at_least: float | None = None,
            at_most: float | None = None) -> Rule:
  bounds = " and ".join(b for b in (
      f"> {above:g}" if above is not None else "",
      f">= {at_least:g}" if at_least is not None else "",
      f"<= {at_most:g}" if at_most is not None else "") if b)
  wanted = f"a finite number{' ' + bounds if bounds else ''}"

  def rule(value):
    ok = _is_real(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    return None if ok else f"must be {wanted}, got {value!r}"
  return rule


def _one_of(choices: Sequence[int]) -> Rule:
  def rule(value):
    return None if _is_int(value) and value in choices else \
        f"must be one of {', '.join(map(str, choices))}, got {value!r}"
  return rule


def _increasing_positive_ints(what: str, *, allow_empty: bool) -> Rule:
  def rule(value):
    ok = isinstance(value, Sequence) and not isinstance(value, str) and \
        (allow_empty or len(value) > 0) and all(_is_int(v) and v >= 1 for v in value) and \
        all(a < b for a, b in itertools.pairwise(value))
    return None if ok else f"must be {what}, got {value!r}"
  return rule


def _positive_ints(value) -> str | None:
  ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and \
      all(_is_int(v) and v >= 1 for v in value)
  return None if ok else f"must be a non-empty sequence of positive integers, got {value!r}"


def _optional_positive_ints(value) -> str | None:
  return None if value is None else _positive_ints(value)


def _crop_scale(value) -> str | None:
  ok = isinstance(value, Sequence) and len(value) == 2 and all(_is_real(v) for v in value) and \
      0 < value[0] <= value[1] <= 1
  return None if ok else f"must be (low, high) with 0 < low <= high <= 1, got {value!r}"


_RANGES: tuple[tuple[str, Rule], ...] = (
    ("seed", _int_at_least(0)),
    ("batch_size", _int_at_least(1)),
    ("samples_per_class", _int_at_least(2, " (with one image per class no query has a positive)")),
    ("chunk_size", _int_at_least(1)),
    ("epochs", _int_at_least(1)),
    ("max_steps", _optional_int_at_least(1, "train for `epochs`")),
    ("eval_every_epochs", _int_at_least(1)),
    ("checkpoint_every_steps", _int_at_least(1)),
    ("keep_checkpoints", _int_at_least(1, " (0 would delete every checkpoint)")),
    ("log_every_steps", _int_at_least(1)),
    ("num_grid_queries", _int_at_least(0)),
    ("data.image_size", _int_at_least(1)),
    ("data.resize_size", _int_at_least(1)),
    ("data.channels", _one_of((1, 3))),
    ("data.rotated_classes", _one_of((1, 2, 3, 4))),
    ("data.crop_scale", _crop_scale),
    ("data.worker_count", _int_at_least(0)),
    ("data.eval_batch_size", _int_at_least(1)),
    ("data.max_image_pixels", _int_at_least(1)),
    ("data.max_eval_images", _optional_int_at_least(1, "every image")),
    ("model.embedding_dim", _int_at_least(1)),
    ("optimizer.learning_rate", _finite(above=0)),
    ("optimizer.weight_decay", _finite(at_least=0)),
    ("optimizer.decay", _finite(above=0, at_most=1)),
    ("optimizer.warmup_steps", _int_at_least(0)),
    ("optimizer.milestones", _increasing_positive_ints(
        "a strictly increasing sequence of positive epochs (may be empty)", allow_empty=True)),
    ("eval.k_values", _optional_positive_ints),
    ("data.aspect_buckets", _int_at_least(0)),
    ("data.bucket_margin", _finite(at_least=0)),
    ("eval.qe_k", _int_at_least(0)),
    ("eval.qe_alpha", _finite(at_least=0)),
    ("eval.dba_k", _int_at_least(0)),
    ("eval.dba_alpha", _finite(at_least=0)),
)

# Loss options by keyword name, wherever they sit under `loss`.
_LOSS_RANGES: dict[str, Rule] = {
    "k_values": _positive_ints,
    "tau1": _finite(above=0),
    "tau2": _finite(above=0),
    "temperature": _finite(above=0),
    "alpha": _finite(above=0),
    "beta": _finite(above=0),
    "base": _finite(),
    "epsilon": _finite(at_least=0),
    "pos_margin": _finite(),
    "neg_margin": _finite(),
    "query_block": _optional_int_at_least(1, "all queries at once"),
    "max_positives": _optional_int_at_least(1, "from the labels"),
}


def _loss_options(config: Any) -> list[tuple[str, Any]]:
  """(dotted key, value) of every loss option: `loss.<kwarg>` and `loss.<section>.<kwarg>`."""
  loss = _lookup(config, "loss")
  if not isinstance(loss, (Mapping, ml_collections.ConfigDict)):
    return []
  found = []
  for name in loss:
    value = loss[name]
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      found += [(f"loss.{name}.{kw}", value[kw]) for kw in value if kw in _LOSS_RANGES]
    elif name in _LOSS_RANGES:
      found.append((f"loss.{name}", value))
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
  for key, value in _loss_options(config):
    if (problem := _LOSS_RANGES[key.rsplit(".", 1)[1]](value)) is not None:
      problems.append(f"{key} {problem}")
  return problems


# What the checkpoints and the batch sequence of a run depend on: the state's structure and
# shapes (model, image size and channels, optimizer) and which images each step sees.
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
  return lines


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
