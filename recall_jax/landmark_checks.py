"""Config checks of the landmark-retrieval keys (revisited evaluation, aspect buckets, heads).

Pure functions of the config, with no JAX or data import, called by `config.validate`: a problem
is a line of text, reported with every other problem of the config at once.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import ml_collections
import numpy as np

# Kept here rather than imported, so that validating a config imports no data or JAX code; the
# tests check them against `data.landmarks` and `evaluation.revisited`.
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
  problems = []
  e = c.eval
  if e.get("whitening_target", "eval") not in WHITENING_TARGETS:
    problems.append(f"eval.whitening_target must be one of {WHITENING_TARGETS}, got "
                    f"{e.whitening_target!r}")
  if e.get("whitening_kind", "learned") not in WHITENING_KINDS:
    problems.append(f"eval.whitening_kind must be one of {WHITENING_KINDS}, got "
                    f"{e.whitening_kind!r}")
  power = e.get("whitening_power", 0.5)
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power <= 1:
    problems.append(f"eval.whitening_power must be a number in [0, 1], got {power!r}")
  dim = e.get("whitening_dim")
  if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
    problems.append(f"eval.whitening_dim must be None or a positive integer, got {dim!r}")
  ridge = e.get("whitening_ridge", 0.0)
  if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (
      math.isfinite(ridge) and ridge >= 0):
    problems.append(f"eval.whitening_ridge must be a finite number >= 0, got {ridge!r}")
  if not isinstance(e.get("upscale", False), bool):
    problems.append(f"eval.upscale must be True or False, got {e.upscale!r}")
  return problems


def landmark_problems(c: ml_collections.ConfigDict) -> list[str]:
  """Every problem of the landmark keys, one line each (empty when there is none)."""
  problems = []
  datasets = tuple(c.eval.get("datasets", ()))
  unknown = [d for d in datasets if d not in REVISITED_DATASETS]
  if unknown:
    problems.append(f"eval.datasets {unknown} are not among {REVISITED_DATASETS}")
  protocols = tuple(c.eval.get("protocols", PROTOCOLS))
  if not protocols or any(p not in PROTOCOLS for p in protocols):
    problems.append(f"eval.protocols must name some of {PROTOCOLS}, got {protocols}")
  distractors = c.data.get("distractors")
  if distractors is not None and distractors not in DISTRACTORS:
    problems.append(f"data.distractors must be None or one of {DISTRACTORS}, got "
                    f"{distractors!r}")
  if distractors and not datasets:
    problems.append("data.distractors extends the revisited databases: set eval.datasets too")
  scales = c.eval.get("scales", (1.0,))
  if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float))
                       or not math.isfinite(s) or s <= 0 for s in scales):
    problems.append(f"eval.scales must be positive numbers, got {scales}")
  buckets = c.data.get("aspect_buckets", 0)
  if (buckets or datasets) and not c.model.name.startswith(_MASKED_MODEL_PREFIX):
    problems.append(f"data.aspect_buckets and eval.datasets need a model taking a pixel mask (a "
                    f"ResNet), not {c.model.name!r}")
  if buckets and c.model.get("center_head_init"):
    problems.append("model.center_head_init is not available with data.aspect_buckets")
  head = c.model.get("head")
  if head is not None and head not in HEADS:
    problems.append(f"model.head must be None or one of {HEADS}, got {head!r}")
  if head is not None and not c.model.name.startswith(_MASKED_MODEL_PREFIX):
    problems.append(f"model.head applies to ResNets, not {c.model.name!r}")
  if c.model.get("whitening_init") and (head or ("landmark" if "landmark" in c.model.name
                                                 else "embedding")) != "landmark":
    problems.append("model.whitening_init needs the landmark head (model.head='landmark')")
  if c.model.get("whitening_init") and not c.model.get("whiten", True):
    problems.append("model.whitening_init needs the whitening FC (model.whiten=True)")
  problems += _file_problem("model.whitening_init", c.model.get("whitening_init"))
  problems += _file_problem("eval.whitening", c.eval.get("whitening"))
  problems += _whitening_option_problems(c)
  problems += _whitening_space_problem(c, "eval.whitening", "eval")
  problems += _whitening_space_problem(c, "model.whitening_init", "fc_init")
  return problems
