"""One spec per loss: its function, its config section and what the trainer must know about it.

Serves both tasks. Pure Python, with no JAX import: the config (`config.base_config`), its checks
(`config_checks`), the train step's loss (`train.experiment.make_loss_fn`) and the cold-start
check (`train.trainer`) all read a loss's facts from its `LossSpec`, and its module is imported
only when the function is first asked for (`LossSpec.load`). Adding a loss is one new module
under `recall_jax/losses/` plus one entry in `LOSSES` (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from recall_jax import ranges
from recall_jax.lazy import load_function


@dataclasses.dataclass(frozen=True)
class Option:
  """One keyword of a loss, as its config section `loss.<name>.<keyword>` holds it.

  Attributes:
    default: the value in `base_config` (the function's own default).
    comment: one line saying what the keyword does (shown beside the config key).
    rule: the range rule of its values (`ranges`), or None for a keyword not range-checked.
    field_type: the type a None default takes from the command line (e.g. int).
  """
  default: Any
  comment: str
  rule: ranges.Rule | None = None
  field_type: type | None = None


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Everything the library knows about a loss besides its maths.

  Attributes:
    name: the config name (`loss.name`, `loss.warmup_name`, the section `loss.<name>`).
    function: 'module:function' of `loss(embeddings (B, D), labels (B,), **options) -> scalar`,
      imported on first use.
    summary: one line describing the section in `base_config`.
    options: keyword -> `Option`: the config section, in order.
    takes_layout: the function takes `samples_per_class` (its static sizes follow from m).
    simix: SiMix may precede it (it must then take the layout of the mixed batch).
    cold_start_check: the RS@k cold-start check (`train.cold_start`) applies to it.
  """
  name: str
  function: str
  summary: str
  options: Mapping[str, Option]
  takes_layout: bool = False
  simix: bool = False
  cold_start_check: bool = False

  def load(self) -> Callable[..., Any]:
    """The loss function (importing its module, and JAX, on the first call)."""
    return load_function(self.function)


_BUDGET = ranges.int_at_least(1)
_QUERY_BLOCK = ranges.optional_int_at_least(1, "all queries at once")
_BLOCK_COMMENT = "queries per block; None: sized to the budget"
_BUDGET_COMMENT = "the loss's temporaries when query_block=None, bytes"

RECALL_AT_K = LossSpec(
    "recall_at_k", "recall_jax.losses.recall_at_k:recall_at_k_loss",
    "RS@k (losses.recall_at_k_surrogate)", {
        "k_values": Option((1, 2, 4, 8, 16), "the k of the recall@k terms averaged",
                           ranges.positive_ints),
        "tau1": Option(1.0, "temperature of the sigmoid on k - rank", ranges.finite(above=0)),
        "tau2": Option(0.01, "temperature of the sigmoid on similarity differences",
                       ranges.finite(above=0)),
        "count_query_in_rank": Option(True, "the official code's rank, counting the query"),
        "query_block": Option(None, _BLOCK_COMMENT, _QUERY_BLOCK, int),
        "memory_budget_bytes": Option(1 << 30, _BUDGET_COMMENT, _BUDGET),
    }, takes_layout=True, simix=True, cold_start_check=True)
SMOOTH_AP = LossSpec(
    "smooth_ap", "recall_jax.losses.smooth_ap:smooth_ap_loss",
    "Smooth-AP (losses.smooth_ap_loss)", {
        "temperature": Option(0.01, "temperature of the sigmoid on similarity differences",
                              ranges.finite(above=0)),
        "include_query": Option(False, "count the query in the ranking as the official code"),
        "query_block": Option(None, _BLOCK_COMMENT, _QUERY_BLOCK, int),
        "memory_budget_bytes": Option(1 << 30, _BUDGET_COMMENT, _BUDGET),
    }, takes_layout=True)
CONTRASTIVE = LossSpec(
    "contrastive", "recall_jax.losses.contrastive:contrastive_loss",
    "contrastive (losses.contrastive_loss)", {
        "pos_margin": Option(0.0, "positive pairs are pulled above 1 - pos_margin",
                             ranges.finite()),
        "neg_margin": Option(0.5, "negative pairs are pushed below this similarity",
                             ranges.finite()),
    })
MULTI_SIMILARITY = LossSpec(
    "multi_similarity", "recall_jax.losses.multi_similarity:multi_similarity_loss",
    "multi-similarity (losses.multi_similarity_loss)", {
        "alpha": Option(2.0, "scale of the positive term", ranges.finite(above=0)),
        "beta": Option(50.0, "scale of the negative term", ranges.finite(above=0)),
        "base": Option(0.5, "similarity offset lambda", ranges.finite()),
        "epsilon": Option(0.1, "margin of the pair mining", ranges.finite(at_least=0)),
    })

# The registered losses, one entry each (a spec, or a name above): config name -> spec.
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    RECALL_AT_K,
    SMOOTH_AP,
    CONTRASTIVE,
    MULTI_SIMILARITY,
)}


def loss_names() -> tuple[str, ...]:
  """The registered losses' config names, in registry order."""
  return tuple(LOSSES)


def loss_spec(name: str) -> LossSpec:
  """The spec registered as `name`.

  Raises:
    ValueError: if no loss is registered as `name`.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
  return LOSSES[name]
