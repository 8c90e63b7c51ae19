"""Config checks of the landmark-retrieval keys (revisited evaluation, aspect buckets, heads).

Pure functions of the config, with no JAX or data import, called by `config.validate`: a problem
is a line of text, reported with every other problem of the config at once.
"""

from __future__ import annotations

import math
import os

import ml_collections

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
  return problems
