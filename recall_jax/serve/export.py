"""A portable embedder: the embedding function and its parameters serialised with `jax.export`.

The file holds StableHLO with the parameters as constants, so a service needs only `jax` (and
`flatbuffers`, which `jax.export` serialisation uses), not this package or its config:

    import jax, numpy as np
    exported = jax.export.deserialize(open("embedder.bin", "rb").read())
    images = np.zeros((8, 224, 224, 3), np.uint8)  # decoded, resized, center-cropped
    embeddings = exported.call(images)             # (8, D) float32, L2-normalised

The batch size is symbolic (any batch runs) when the backbone traces with a symbolic leading
dimension; otherwise the function is exported for one fixed batch and `load_embedder` pads and
splits batches to it. By default the module is lowered for CPU, CUDA and TPU, so a file written on
a CPU runs on a GPU service unchanged.

Serves both tasks.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from recall_jax.errors import MissingFileError

_log = logging.getLogger(__name__)

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def _export(fn: Callable[[jax.Array], jax.Array], batch, image_shape: tuple[int, int, int],
            dtype, platforms: Sequence[str]) -> jax.export.Exported:
  spec = jax.ShapeDtypeStruct((batch, *image_shape), dtype)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def export_embedder(embed_fn_of_params: Callable[[Any, jax.Array], jax.Array], params: Any, *,
                    image_shape: tuple[int, int, int], path: str | pathlib.Path,
                    dtype=np.uint8, fallback_batch_size: int = 32,
                    platforms: Sequence[str] | None = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """Serialises `images -> embed_fn_of_params(params, images)` to `path`.

  Args:
    embed_fn_of_params: `(params, images (b, H, W, C)) -> (b, D)` embeddings, e.g.
      `lambda v, x: model.apply(v, x, train=False)`. It is traced once; `params` become constants
      of the exported module.
    params: the variables pytree (e.g. `{'params': ..., 'batch_stats': ...}`).
    image_shape: (H, W, C) of one input image.
    path: the file to write (parent folders are created).
    dtype: dtype of the input images (uint8: the decoded pixels the model normalises itself).
    fallback_batch_size: the fixed batch exported when a symbolic batch does not trace.
    platforms: platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu'); None: the current backend.

  Returns:
    The `jax.export.Exported`; its `in_avals[0].shape[0]` is a symbolic dimension when the batch
    size is symbolic, else `fallback_batch_size`.

  Raises:
    ValueError: if `image_shape` is not three positive sizes or `fallback_batch_size` < 1.
  """
  image_shape = tuple(int(s) for s in image_shape)
  if len(image_shape) != 3 or min(image_shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C) of positive sizes, got {image_shape}")
  if fallback_batch_size < 1:
    raise ValueError(f"fallback_batch_size must be >= 1, got {fallback_batch_size}")
  platforms = (jax.default_backend(),) if platforms is None else tuple(platforms)
  # Host copies: the constants must not carry the training mesh's sharding into the module.
  params = jax.device_get(params)

  def fn(images):
    return embed_fn_of_params(params, images)

  (batch,) = jax.export.symbolic_shape("b")
  try:
    exported = _export(fn, batch, image_shape, dtype, platforms)
  except Exception as e:  # pylint: disable=broad-except
    # Shape polymorphism fails in many ways (inconclusive comparisons, ops without a symbolic
    # rule); a real bug fails the fixed-batch export below as well and surfaces there.
    _log.warning("the embedding function does not trace with a symbolic batch size (%s: %s); "
                 "exporting it for a fixed batch of %d images instead (load_embedder pads and "
                 "splits other batch sizes)", type(e).__name__, str(e).splitlines()[0],
                 fallback_batch_size)
    exported = _export(fn, fallback_batch_size, image_shape, dtype, platforms)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exported.serialize())
  return exported


def has_symbolic_batch(exported: jax.export.Exported) -> bool:
  """Whether the exported embedder accepts any batch size."""
  return not isinstance(exported.in_avals[0].shape[0], (int, np.integer))


def load_embedder(path: str | pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
  """Loads an exported embedder as `images (n, H, W, C) -> (n, D)` NumPy embeddings, any n.

  Uses only `jax.export`. A fixed-batch export is called on chunks of its batch size, the last
  one zero-padded.

  Raises:
    FileNotFoundError: (`recall_jax.errors.MissingFileError`) if `path` does not exist.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"exported embedder {path} does not exist")
  exported = jax.export.deserialize(path.read_bytes())
  if has_symbolic_batch(exported):
    return lambda images: np.asarray(exported.call(images))
  batch = int(exported.in_avals[0].shape[0])

  def embed(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    count = images.shape[0]
    padded = np.zeros((-(-count // batch) * batch, *images.shape[1:]), images.dtype)
    padded[:count] = images
    chunks = [np.asarray(exported.call(padded[s:s + batch]))
              for s in range(0, len(padded), batch)]
    return np.concatenate(chunks)[:count]

  return embed
