"""Tests for recall_jax.models.vit (tiny sizes; few distinct XLA compiles: CPU time is scarce)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models
from recall_jax.models import layer_stack

TINY = dict(depth=1)  # vit_tiny_test with one block: same code paths, half the compile time.


def random_variables(model, image_size, seed=0):
  """Random variables of the model's shapes from NumPy (no XLA compile of the initialisers)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1 + 0.1 * rng.normal(size=leaf.shape)
    elif name == "kernel":
      fan_in = leaf.shape[0] if path[-2].key in ("query", "key", "value") else np.prod(
          leaf.shape[:-1])
      value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def jitted(model, method="__call__", train=False):
  """One compiled apply per (model, method, train), shared by the tests of this module."""
  return jax.jit(lambda v, x, rngs=None: model.apply(v, x, train=train, rngs=rngs, method=method))


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("vit_tiny_test", **TINY)
  variables = random_variables(model, 32)
  images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
  return model, variables, images, np.asarray(jitted(model)(variables, images))


def test_param_tree_mirrors_augreg_layout():
  model = models.get_model("vit_tiny_test")
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 32))
  assert list(variables) == ["params"]
  backbone = variables["params"]["backbone"]
  assert backbone["embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert backbone["cls"].shape == (1, 1, 32)
  enc = backbone["Transformer"]
  assert enc["posembed_input"]["pos_embedding"].shape == (1, 17, 32)
  # The blocks are stacked on a leading layer axis; split, they have the checkpoints' layout.
  assert enc["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"].shape == (2, 32, 64)
  enc = jax.eval_shape(layer_stack.split_layers, enc)
  assert sorted(k for k in enc if k.startswith("encoderblock")) == [
      "encoderblock_0", "encoderblock_1"]
  attn = enc["encoderblock_1"]["MultiHeadDotProductAttention_1"]
  assert attn["query"]["kernel"].shape == (32, 2, 16)
  assert attn["out"]["kernel"].shape == (2, 16, 32)
  assert enc["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"].shape == (32, 64)
  assert set(variables["params"]["embedding_head"]) == {"norm", "proj"}
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_embeddings_unit_norm_float32_and_uint8_equals_float(tiny):
  model, variables, images, out_u8 = tiny
  assert out_u8.shape == (4, 16) and out_u8.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out_u8, axis=1), 1.0, atol=1e-6)
  out_f = jitted(model)(variables, images.astype(np.float32) / 255)
  np.testing.assert_allclose(np.asarray(out_f), out_u8, atol=1e-6)
  # Distinct images give distinct embeddings (the model is not collapsed).
  assert np.abs(out_u8[0] - out_u8[1]).max() > 1e-3


def test_grey_input_equals_replicated_rgb(tiny):
  model, variables, images, _ = tiny
  grey = images[..., :1]
  np.testing.assert_allclose(np.asarray(jitted(model)(variables, grey)),
                             np.asarray(jitted(model)(variables, np.repeat(grey, 3, -1))),
                             atol=1e-6)


def test_head_is_layernorm_linear_l2_of_class_token(tiny):
  model, variables, images, out = tiny
  tokens = np.asarray(jitted(model, "features")(variables, images))
  assert tokens.shape == (4, 17, 32) and tokens.dtype == np.float32
  head = variables["params"]["embedding_head"]
  x = tokens[:, 0].astype(np.float64)
  x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
  x = x * np.asarray(head["norm"]["scale"]) + np.asarray(head["norm"]["bias"])
  x = x @ np.asarray(head["proj"]["kernel"]) + np.asarray(head["proj"]["bias"])
  np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-5)
  # Without the head the model returns that class token and has no head parameters.
  trunk = models.get_model("vit_tiny_test", with_head=False, **TINY)
  params = {"params": {"backbone": variables["params"]["backbone"]}}
  np.testing.assert_allclose(np.asarray(jitted(trunk)(params, images)), tokens[:, 0], atol=1e-6)


def test_attention_padding_does_not_change_output(tiny):
  _, variables, images, out = tiny
  padded = models.get_model("vit_tiny_test", attention_pad_to=24, attention_implementation="xla",
                            **TINY)
  np.testing.assert_allclose(np.asarray(jitted(padded)(variables, images)), out, atol=1e-5)
  too_short = models.get_model("vit_tiny_test", attention_pad_to=10, **TINY)
  with pytest.raises(ValueError, match="smaller than the 17 tokens"):
    jax.eval_shape(lambda: too_short.apply(variables, images))


def test_output_independent_of_batch(tiny):
  model, variables, images, out = tiny
  chunks = np.concatenate([np.asarray(jitted(model)(variables, images[i:i + 2]))
                           for i in (0, 2)])
  np.testing.assert_allclose(chunks, out, atol=1e-6)


def test_dropout_only_in_training_with_rng(tiny):
  _, variables, images, out = tiny
  model = models.get_model("vit_tiny_test", dropout_rate=0.3, **TINY)
  train = jitted(model, train=True)
  a = np.asarray(train(variables, images, {"dropout": jax.random.key(1)}))
  b = np.asarray(train(variables, images, {"dropout": jax.random.key(1)}))
  c = np.asarray(train(variables, images, {"dropout": jax.random.key(2)}))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  assert np.abs(a - out).max() > 1e-3  # Dropout acts in training ...
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply(variables, images, train=True))
  # ... and not at evaluation (same model, train=False, no rng needed).
  np.testing.assert_allclose(np.asarray(jitted(model)(variables, images)), out, atol=1e-6)


def test_bf16_compute_gives_float32_outputs_close_to_float32(tiny):
  _, variables, images, out = tiny
  model = models.get_model("vit_tiny_test", dtype=jnp.bfloat16, **TINY)
  got = jitted(model)(variables, images)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), out, atol=0.05)


def test_wrong_image_size_is_rejected(tiny):
  model, variables, _, _ = tiny
  with pytest.raises(ValueError, match=r"expected images of shape \(B, 32, 32, C\)"):
    jax.eval_shape(lambda: model.apply(variables, np.zeros((1, 48, 48, 3), np.uint8)))
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model("vit_tiny_test", image_size=36), jax.random.key(0), 36))


def test_registry_sizes_and_errors():
  b16 = models.get_model("vit_b16")
  assert (b16.patch_size, b16.width, b16.depth, b16.num_heads, b16.mlp_dim) == (16, 768, 12, 12,
                                                                                3072)
  assert models.get_model("vit_b32").patch_size == 32
  assert models.get_model("vit_s16").width == 384 and models.get_model("vit_ti16").width == 192
  assert models.get_model("vit_b16", embedding_dim=128).embedding_dim == 128
  assert models.model_family("resnet50") == "resnet"
  assert {"vit_ti16", "vit_s16", "vit_b16", "vit_b32", "resnet50", "small_cnn", "vit_tiny_test",
          "resnet_tiny_test"} <= set(models.available_models())
  with pytest.raises(ValueError, match="unknown model 'vit_x'.*vit_b16"):
    models.get_model("vit_x")
  with pytest.raises(ValueError, match="bad keyword arguments for model 'vit_b16'"):
    models.get_model("vit_b16", not_an_option=1)
