"""Exported embedders (`recall_jax.serve.export`) against in-process embeddings."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from recall_jax.errors import MissingFileError
from recall_jax.models import get_model, init_variables
from recall_jax.serve import export


def _model(name: str, image_size: int):
  kwargs = {"embedding_dim": 16} if name == "small_cnn" else {}
  model = get_model(name, **kwargs)
  variables = init_variables(model, jax.random.key(0), image_size, 3)
  return jax.jit(lambda v, x: model.apply(v, x, train=False)), variables


def _images(count: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,size", [("small_cnn", 28), ("vit_tiny_test", 32)])
def test_exported_embedder_matches_in_process(tmp_path, name, size):
  apply, variables = _model(name, size)
  path = tmp_path / "embedder.bin"
  exported = export.export_embedder(apply, variables, image_shape=(size, size, 3), path=path)
  assert export.has_symbolic_batch(exported)
  # The documented jax-only loader agrees with the model at two batch sizes.
  raw = jax.export.deserialize(open(path, "rb").read())
  for batch, seed in ((1, 1), (5, 2)):
    images = _images(batch, size, seed)
    chex.assert_trees_all_close(np.asarray(raw.call(images)),
                                np.asarray(apply(variables, images)), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(export.load_embedder(path)(images),
                              np.asarray(apply(variables, images)), atol=1e-5, rtol=0)


def test_falls_back_to_fixed_batch_when_batch_cannot_be_symbolic(tmp_path, caplog):
  apply, variables = _model("small_cnn", 28)

  def batch_dependent(v, x):
    # A Python branch on the batch size cannot trace with a symbolic batch.
    return apply(v, x) * (1.0 if x.shape[0] > 3 else 1.0)

  path = tmp_path / "fixed.bin"
  exported = export.export_embedder(batch_dependent, variables, image_shape=(28, 28, 3),
                                    path=path, fallback_batch_size=4, platforms=None)
  assert not export.has_symbolic_batch(exported)
  assert exported.in_avals[0].shape == (4, 28, 28, 3)
  assert "fixed batch of 4" in caplog.text
  images = _images(9, 28, seed=3)  # two full batches and a padded one
  chex.assert_trees_all_close(export.load_embedder(path)(images),
                              np.asarray(apply(variables, images)), atol=1e-5, rtol=0)


def test_bad_arguments(tmp_path):
  apply, variables = _model("small_cnn", 28)
  with pytest.raises(ValueError, match="image_shape"):
    export.export_embedder(apply, variables, image_shape=(28, 28), path=tmp_path / "e.bin")
  with pytest.raises(ValueError, match="fallback_batch_size"):
    export.export_embedder(apply, variables, image_shape=(28, 28, 3), path=tmp_path / "e.bin",
                           fallback_batch_size=0)
  with pytest.raises(MissingFileError, match="does not exist"):
    export.load_embedder(tmp_path / "missing.bin")
