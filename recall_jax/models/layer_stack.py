"""Maps variables between per-layer names and layers stacked on a leading axis (both tasks).

The ViT encoder blocks and the repeated bottlenecks of each ResNet stage run under `nn.scan`:
their variables are one module whose arrays have a leading layer axis (`encoderblock/...` of
shape (depth, ...); `layer3/...` of shape (n - 1, ...) holding bottlenecks 1..n-1 of stage 3,
whose bottleneck 0 stays `layer3_0`). Checkpoints and the unrolled layout name each layer on its
own (`encoderblock_{i}`, `layer3_{j}`). A per-layer name `X_{i}` belongs to the stacked module
`X` at index i - o, o being the number of `X_{j}` the stacked tree keeps as modules of their own
(0 for the ViT, 1 for a ResNet stage).

Paths are tuples of names (`flax.traverse_util.flatten_dict` keys).
"""

import re
from typing import Any
from collections.abc import Iterable, Mapping

import flax
import numpy as np

from recall_jax import errors

Path = tuple[str, ...]
# Names of the scanned modules: the ViT encoder's blocks and a ResNet stage's bottlenecks 1..n-1.
STACKED_MODULES = frozenset({"encoderblock", "layer1", "layer2", "layer3", "layer4"})
_LAYER = re.compile(r"(.+)_(\d+)")
# Per-layer names that the stacked layout does not have (a stage's bottleneck 0 it keeps).
_UNROLLED = re.compile(r"\b(encoderblock_\d+|layer[1-4]_[1-9]\d*)\b")


def _prefixes(paths: Iterable[Path]) -> set[Path]:
  return {path[:k] for path in paths for k in range(1, len(path) + 1)}


def layer_slot(path: Path, stacked: Mapping[Path, Any],
               prefixes: set[Path] | None = None) -> tuple[Path, int] | None:
  """Where a per-layer path lives in a stacked tree.

  Args:
    path: e.g. ('params', 'backbone', 'Transformer', 'encoderblock_3', 'LayerNorm_0', 'scale').
    stacked: flat stacked tree {path: array or shape-like}.
    prefixes: `_prefixes(stacked)`, when calling many times.

  Returns:
    (stacked path, layer index) when `path` names one layer of a stacked module of `stacked`
    (the index may be out of range), None otherwise.
  """
  if prefixes is None:
    prefixes = _prefixes(stacked)
  for k, name in enumerate(path):
    match = _LAYER.fullmatch(name)
    if not match:
      continue
    target = path[:k] + (match.group(1),) + path[k + 1:]
    if target in stacked:
      offset = 0
      while path[:k] + (f"{match.group(1)}_{offset}",) in prefixes:
        offset += 1
      return target, int(match.group(2)) - offset
  return None


def stack_layers(variables: Any, template: Any) -> dict[str, Any]:
  """Converts a per-layer (unrolled) tree into the stacked layout of `template`.

  Args:
    variables: nested dict in the per-layer layout (e.g. a checkpoint of the unrolled model).
    template: nested dict (arrays or `jax.ShapeDtypeStruct`s) in the stacked layout.

  Returns:
    A nested dict with the structure of `template`, stacked arrays as NumPy arrays.

  Raises:
    ValueError: listing the template paths that `variables` cannot fill.
  """
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  prefixes = _prefixes(want)
  layers: dict[Path, dict[int, np.ndarray]] = {}
  out: dict[Path, Any] = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items():
    if path in want:
      out[path] = value
      continue
    slot = layer_slot(path, want, prefixes)
    if slot is not None:
      layers.setdefault(slot[0], {})[slot[1]] = np.asarray(value)
  for path, by_index in layers.items():
    if sorted(by_index) == list(range(want[path].shape[0])):
      out[path] = np.stack([by_index[i] for i in range(len(by_index))])
  bad = sorted("/".join(p) for p in want if p not in out or np.shape(out[p]) != want[p].shape)
  if bad:
    raise ValueError(f"cannot stack the layers into the scanned layout: {len(bad)} variables "
                     f"missing or of the wrong shape, e.g. {bad[0]}")
  return flax.traverse_util.unflatten_dict(out)


def split_layers(variables: Any) -> dict[str, Any]:
  """The inverse of `stack_layers`: every stacked module of `STACKED_MODULES` split into layers.

  Args:
    variables: nested dict in the stacked layout (arrays).

  Returns:
    The same variables in the per-layer layout (`X` at index i -> `X_{i + o}`), as slices.
  """
  have = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  prefixes = _prefixes(have)
  out: dict[Path, Any] = {}
  for path, value in have.items():
    k = next((k for k, name in enumerate(path) if name in STACKED_MODULES), None)
    if k is None:
      out[path] = value
      continue
    offset = 0
    while path[:k] + (f"{path[k]}_{offset}",) in prefixes:
      offset += 1
    for i in range(value.shape[0]):
      out[path[:k] + (f"{path[k]}_{offset + i}",) + path[k + 1:]] = value[i]
  return flax.traverse_util.unflatten_dict(out)


def raise_if_unrolled(error: Exception, where: str) -> None:
  """Turns a restore's structure mismatch on per-layer (unrolled) block names into a DataError.

  Checkpoints written before the blocks were scanned hold `encoderblock_{i}` / `layer{s}_{j}`;
  restoring them into the stacked layout fails deep inside Orbax.

  Raises:
    recall_jax.errors.DataError: one line, when `error` names such a layer.
  """
  if isinstance(error, (ValueError, KeyError)) and _UNROLLED.search(str(error)):
    raise errors.DataError(
        f"checkpoint {where} has the older per-layer layout of the ViT/ResNet blocks "
        f"(e.g. {_UNROLLED.search(str(error)).group(0)}), which this version stacks on a layer "
        f"axis; convert its variables with recall_jax.models.layer_stack.stack_layers or start "
        f"a new run") from None
