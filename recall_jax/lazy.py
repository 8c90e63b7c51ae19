"""A function named as 'module:function', imported when first needed.

Serves both tasks: the loss and dataset registries name their functions this way, so importing a
registry (and the config, which reads them) imports no JAX or data library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_function(target: str) -> Callable[..., Any]:
  """The object `function` of `module`, for `target` = 'module:function' (importing `module`)."""
  module, function = target.split(":")
  return getattr(importlib.import_module(module), function)
