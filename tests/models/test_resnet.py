"""Tests for recall_jax.models.resnet: frozen BatchNorm, torchvision v1.5 layout, GeM head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models
from recall_jax.models import layer_stack
from recall_jax.models import resnet


def random_variables(model, image_size, seed=0):
  """Random params and running statistics from NumPy (no XLA compile of the initialisers)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    elif name == "scale":
      value = 1 + 0.1 * rng.normal(size=leaf.shape)
    elif name == "p":
      value = np.full(leaf.shape, 3.0)
    elif name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("resnet_tiny_test")
  variables = random_variables(model, 32)
  images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True))
  return model, variables, images, apply


def test_frozen_batch_norm_matches_numpy_and_has_no_batch_dependence(x64):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 2, 2, 5))
  variables = {"params": {"scale": rng.normal(size=5), "bias": rng.normal(size=5)},
               "batch_stats": {"mean": rng.normal(size=5), "var": rng.uniform(0.5, 2, size=5)}}
  got = resnet.FrozenBatchNorm(dtype=jnp.float64).apply(variables, jnp.asarray(x))
  p, s = variables["params"], variables["batch_stats"]
  want = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_layout_matches_torchvision_resnet50_shapes():
  model = models.get_model("resnet50")
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))
  # Bottlenecks 1..n-1 of a stage are stacked; split, they have torchvision's layout.
  assert variables["params"]["backbone"]["layer3"]["conv2"]["kernel"].shape == (5, 3, 3, 256, 256)
  assert "layer3_1" not in variables["params"]["backbone"]
  split = jax.eval_shape(layer_stack.split_layers, variables)
  params, stats = split["params"]["backbone"], split["batch_stats"]["backbone"]
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
      [f"layer1_{i}" for i in range(3)] + [f"layer2_{i}" for i in range(4)]
      + [f"layer3_{i}" for i in range(6)] + [f"layer4_{i}" for i in range(3)])
  assert params["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)
  assert "downsample_conv" not in params["layer4_1"]
  # v1.5: the stride sits in the 3x3 convolution (checked by the feature map size below).
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert stats["layer3_5"]["bn3"]["var"].shape == (1024,)
  assert variables["params"]["gem"]["p"].shape == (1,)
  fmap = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), method="features"),
                        variables)
  assert fmap.shape == (1, 2, 2, 2048)
  n_backbone = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]["backbone"]))
  assert n_backbone == 23_508_032  # torchvision resnet50 without fc: 25,557,032 - 2,049,000.


def test_embeddings_unit_norm_and_input_types(tiny):
  model, variables, images, apply = tiny
  out = np.asarray(apply(variables, images))
  assert out.shape == (6, 16) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(apply(variables, images.astype(np.float32) / 255)), out,
                             atol=1e-5)
  assert np.abs(out[0] - out[1]).max() > 1e-3


def test_train_step_leaves_batch_stats_unchanged_and_chunks_equal_full(tiny):
  model, variables, images, apply = tiny
  params, stats = variables["params"], variables["batch_stats"]

  def loss(p):
    emb = model.apply({"params": p, "batch_stats": stats}, images, train=True)
    return jnp.sum(emb[:3] * emb[3:])

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["gem"]["p"][0])) > 0
  assert float(jnp.abs(grads["backbone"]["layer1_0"]["bn1"]["scale"]).max()) > 0
  new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  new_vars = {"params": new_params, "batch_stats": stats}
  before = jax.tree.map(np.array, stats)
  full = np.asarray(apply(new_vars, images))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, stats))
  assert np.abs(full - np.asarray(apply(variables, images))).max() > 1e-4  # The step did something.
  # Frozen BN: an image's embedding does not depend on the others in the batch.
  chunks = np.concatenate([np.asarray(apply(new_vars, images[i:i + 3])) for i in (0, 3)])
  np.testing.assert_allclose(chunks, full, atol=1e-5)


def test_running_statistics_are_used(tiny):
  _, variables, images, apply = tiny
  shifted = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 2.0 if path[-1].key == "var" else x, variables["batch_stats"])
  out = np.asarray(apply({"params": variables["params"], "batch_stats": shifted}, images))
  assert np.abs(out - np.asarray(apply(variables, images))).max() > 1e-3


def test_without_head_is_global_average_pool(tiny):
  _, variables, images, _ = tiny
  trunk = models.get_model("resnet_tiny_test", with_head=False)
  trunk_vars = {"params": {"backbone": variables["params"]["backbone"]},
                "batch_stats": variables["batch_stats"]}
  both = jax.jit(lambda v, x: (trunk.apply(v, x), trunk.apply(v, x, method="features")))
  pooled, fmap = (np.asarray(a) for a in both(trunk_vars, images))
  assert fmap.shape == (6, 1, 1, 256) and pooled.shape == (6, 256)
  np.testing.assert_allclose(pooled, fmap.mean(axis=(1, 2)), atol=1e-6)
  assert "gem" not in jax.eval_shape(
      lambda: models.init_variables(trunk, jax.random.key(0), 32))["params"]


def test_resnet101_layout_matches_torchvision_shapes():
  model = models.get_model("resnet101")
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))
  params = jax.eval_shape(layer_stack.split_layers, variables)["params"]["backbone"]
  assert sum(k.startswith("layer3_") for k in params) == 23
  assert params["layer3_22"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
  n_backbone = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]["backbone"]))
  assert n_backbone == 42_500_160  # torchvision resnet101 without fc: 44,549,160 - 2,049,000.


def test_landmark_head_is_l2_gem_then_whitening_fc(tiny):
  _, variables, images, _ = tiny
  model = models.get_model("resnet_tiny_landmark_test", embedding_dim=8)
  fresh = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 32))
  assert fresh["params"]["landmark_head"]["whitening"]["kernel"].shape == (256, 8)
  assert fresh["params"]["landmark_head"]["gem"]["p"].shape == (1,)
  rng = np.random.default_rng(3)
  kernel, bias = rng.normal(size=(256, 8)), rng.normal(size=8)
  head = {"gem": {"p": np.array([2.5], np.float32)},
          "whitening": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}
  land_vars = {"params": {"backbone": variables["params"]["backbone"], "landmark_head": head},
               "batch_stats": variables["batch_stats"]}
  images = np.random.default_rng(4).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
  out, fmap = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))(
      land_vars, images)
  fmap = np.asarray(fmap, np.float64)
  gem = np.mean(np.maximum(fmap, 1e-6)**2.5, axis=(1, 2))**(1 / 2.5)
  gem /= np.linalg.norm(gem, axis=1, keepdims=True)
  want = gem @ kernel + bias
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_landmark_head_without_whitening_and_identity_init():
  model = models.get_model("resnet_tiny_landmark_test")
  plain = models.get_model("resnet_tiny_landmark_test", whiten=False)
  variables = random_variables(model, 32)
  # The FC starts as the identity, so an untrained head is the L2-normalised GeM descriptor.
  variables["params"]["landmark_head"]["whitening"] = models.init_variables(
      model, jax.random.key(0), 32)["params"]["landmark_head"]["whitening"]
  plain_vars = {"params": {"backbone": variables["params"]["backbone"],
                           "landmark_head": {"gem": variables["params"]["landmark_head"]["gem"]}},
                "batch_stats": variables["batch_stats"]}
  images = np.random.default_rng(5).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
  out = np.asarray(jax.jit(model.apply)(variables, images))
  np.testing.assert_allclose(out, np.asarray(jax.jit(plain.apply)(plain_vars, images)), atol=1e-6)
  assert out.shape == (2, 256)
  with pytest.raises(ValueError, match="head must be"):
    models.init_variables(models.get_model("resnet_tiny_test", head="arcface"),
                          jax.random.key(0), 32)


@pytest.mark.parametrize("name,kwargs", [("resnet_tiny_landmark_test", {}),
                                         ("resnet_tiny_test", {}),
                                         ("resnet_tiny_test", {"with_head": False})])
def test_padded_descriptor_equals_unpadded(name, kwargs):
  model = models.get_model(name, **kwargs)
  variables = random_variables(model, 32, seed=6)
  rng = np.random.default_rng(7)
  sizes = [(64, 96), (128, 64), (45, 77)]  # The mask makes any size exact, not only 32 k.
  apply = jax.jit(model.apply)
  canvas = rng.integers(0, 256, size=(len(sizes), 128, 128, 3), dtype=np.uint8)  # Padding: noise.
  mask = np.zeros((len(sizes), 128, 128), bool)
  want = []
  for i, (h, w) in enumerate(sizes):
    mask[i, :h, :w] = True
    want.append(np.asarray(apply(variables, canvas[i:i + 1, :h, :w]))[0])
  got = np.asarray(apply(variables, canvas, mask=mask))
  np.testing.assert_allclose(got, np.stack(want), atol=1e-4)
  # Without the mask the padding changes the descriptor (the test can fail).
  assert np.abs(np.asarray(apply(variables, canvas))[0] - want[0]).max() > 1e-3
