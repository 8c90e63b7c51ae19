"""Range rules of config values: each takes a value and returns None or what is wrong with it.

Serves both tasks. Pure Python, with no JAX import: the config checks (`config_checks`) and the
loss specs (`losses.registry`, whose keywords each carry a rule) share them.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

Rule = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_at_least(low: int, why: str = "") -> Rule:
  def rule(value):
    if not (_is_int(value) and value >= low):
      return f"must be an integer >= {low}{why}, got {value!r}"
    return None
  return rule


def optional_int_at_least(low: int, none_means: str) -> Rule:
  def rule(value):
    if value is not None and not (_is_int(value) and value >= low):
      return f"must be None ({none_means}) or an integer >= {low}, got {value!r}"
    return None
  return rule


def finite(*, above: float | None = None, at_least: float | None = None,
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


def one_of(choices: Sequence[int]) -> Rule:
  def rule(value):
    return None if _is_int(value) and value in choices else \
        f"must be one of {', '.join(map(str, choices))}, got {value!r}"
  return rule


def increasing_positive_ints(what: str, *, allow_empty: bool) -> Rule:
  def rule(value):
    ok = isinstance(value, Sequence) and not isinstance(value, str) and \
        (allow_empty or len(value) > 0) and all(_is_int(v) and v >= 1 for v in value) and \
        all(a < b for a, b in itertools.pairwise(value))
    return None if ok else f"must be {what}, got {value!r}"
  return rule


def positive_ints(value) -> str | None:
  ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and \
      all(_is_int(v) and v >= 1 for v in value)
  return None if ok else f"must be a non-empty sequence of positive integers, got {value!r}"


def optional_positive_ints(value) -> str | None:
  return None if value is None else positive_ints(value)


def crop_scale(value) -> str | None:
  ok = isinstance(value, Sequence) and len(value) == 2 and all(_is_real(v) for v in value) and \
      0 < value[0] <= value[1] <= 1
  return None if ok else f"must be (low, high) with 0 < low <= high <= 1, got {value!r}"
