"""Tests for recall_jax.models.layer_stack: per-layer <-> stacked variables, old checkpoints."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recall_jax import errors
from recall_jax import models
from recall_jax.models import layer_stack
from recall_jax.train import checkpointing


def _zeros(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _shapes(name, **kwargs):
  model = models.get_model(name, **kwargs)
  return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 32))


def test_split_and_stack_are_inverse_and_give_the_unrolled_layout():
  stacked = _shapes("resnet_tiny_test", stage_sizes=(3, 1, 2, 1))
  unrolled = _shapes("resnet_tiny_test", stage_sizes=(3, 1, 2, 1), scan=False)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), stacked)
  split = layer_stack.split_layers(variables)
  assert jax.tree.structure(split) == jax.tree.structure(unrolled)
  conv = variables["params"]["backbone"]["layer1"]["conv2"]["kernel"]
  np.testing.assert_array_equal(split["params"]["backbone"]["layer1_2"]["conv2"]["kernel"],
                                conv[1])
  back = layer_stack.stack_layers(split, stacked)
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_stack_layers_reports_missing_layers():
  stacked = _shapes("vit_tiny_test")
  per_layer = _zeros(jax.eval_shape(layer_stack.split_layers, stacked))
  del per_layer["params"]["backbone"]["Transformer"]["encoderblock_1"]
  with pytest.raises(ValueError, match="cannot stack .* e.g. params/backbone/Transformer/"
                                       "encoderblock/"):
    layer_stack.stack_layers(per_layer, stacked)


def test_restoring_an_unrolled_checkpoint_is_a_one_line_error(tmp_path):
  old = _zeros(_shapes("vit_tiny_test", scan=False))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                            meta=ocp.args.JsonSave({"step": 3})))
    manager.wait_until_finished()
    with pytest.raises(errors.DataError, match="older per-layer layout .* encoderblock_") as info:
      checkpointing.restore(manager, 3, _zeros(_shapes("vit_tiny_test")))
    assert "\n" not in str(info.value)
    # The conversion the message names: restore per layer, then stack.
    restored, meta = checkpointing.restore(manager, 3, old)
    assert meta == {"step": 3}
    stacked = layer_stack.stack_layers(restored, _shapes("vit_tiny_test"))
    assert stacked["params"]["backbone"]["Transformer"]["encoderblock"]["LayerNorm_0"][
        "scale"].shape == (2, 32)
