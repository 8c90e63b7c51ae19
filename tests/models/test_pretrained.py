"""Tests for recall_jax.models.pretrained with tiny checkpoints in the real key layouts.

The exporters below are written independently of the loader (model layout -> AugReg npz / timm /
torchvision state dict), so a load after an export checks the conversion rules both ways.
"""

import re

import ml_dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from recall_jax import models


def random_variables(model, image_size, seed):
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape), np.float32), shapes)


def stack_reference(tree):
  """A per-layer tree in the scanned layout, by hand: the ViT's `encoderblock_{i}` stacked into
  `encoderblock`, a ResNet stage's `layer{s}_{j}`, j >= 1, into `layer{s}`."""
  if not isinstance(tree, dict):
    return np.asarray(tree)
  out, groups = {}, {}
  for k, v in tree.items():
    match = re.fullmatch(r"(encoderblock|layer\d)_(\d+)", k)
    if match and (match.group(1) == "encoderblock" or int(match.group(2)) > 0):
      groups.setdefault(match.group(1), {})[int(match.group(2))] = v
    else:
      out[k] = stack_reference(v)
  for name, layers in groups.items():
    out[name] = jax.tree.map(lambda *xs: np.stack(xs), *[layers[i] for i in sorted(layers)])
  return out


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def export_augreg(variables, num_classes=10):
  """Model variables -> AugReg npz dict (classifier head included, as in the real files)."""
  ckpt = flat(variables["params"]["backbone"])
  width = ckpt["cls"].shape[-1]
  rng = np.random.default_rng(9)
  ckpt["head/kernel"] = rng.normal(size=(width, num_classes)).astype(np.float32)
  ckpt["head/bias"] = np.zeros(num_classes, np.float32)
  return ckpt


def export_timm_vit(variables, num_classes=10):
  """Model variables -> timm VisionTransformer state dict (PyTorch layouts)."""
  bb = variables["params"]["backbone"]
  enc = bb["Transformer"]
  width = bb["cls"].shape[-1]
  sd = {"patch_embed.proj.weight": np.transpose(bb["embedding"]["kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": bb["embedding"]["bias"], "cls_token": bb["cls"],
        "pos_embed": enc["posembed_input"]["pos_embedding"],
        "norm.weight": enc["encoder_norm"]["scale"], "norm.bias": enc["encoder_norm"]["bias"],
        "head.weight": np.ones((num_classes, width), np.float32),
        "head.bias": np.zeros(num_classes, np.float32)}
  i = 0
  while f"encoderblock_{i}" in enc:
    b, p = enc[f"encoderblock_{i}"], f"blocks.{i}."
    att = b["MultiHeadDotProductAttention_1"]
    for torch_norm, norm in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      sd[p + f"{torch_norm}.weight"] = b[norm]["scale"]
      sd[p + f"{torch_norm}.bias"] = b[norm]["bias"]
    sd[p + "attn.qkv.weight"] = np.concatenate(
        [np.reshape(att[n]["kernel"], (width, width)).T for n in ("query", "key", "value")])
    sd[p + "attn.qkv.bias"] = np.concatenate(
        [np.reshape(att[n]["bias"], -1) for n in ("query", "key", "value")])
    sd[p + "attn.proj.weight"] = np.reshape(att["out"]["kernel"], (width, width)).T
    sd[p + "attn.proj.bias"] = att["out"]["bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      dense = b["MlpBlock_3"][f"Dense_{j}"]
      sd[p + f"mlp.{fc}.weight"], sd[p + f"mlp.{fc}.bias"] = dense["kernel"].T, dense["bias"]
    i += 1
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def export_torchvision_resnet(variables, num_classes=10):
  """Model variables -> torchvision ResNet state dict (OIHW, running stats, num_batches_tracked)."""
  params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  sd = {}

  def put(torch_scope, scope_params, scope_stats):
    for name, value in scope_params.items():
      torch_name = name.replace("downsample_conv", "downsample.0").replace("downsample_bn",
                                                                         "downsample.1")
      if "kernel" in value:
        sd[f"{torch_scope}{torch_name}.weight"] = np.transpose(value["kernel"], (3, 2, 0, 1))
      elif "scale" in value:
        sd[f"{torch_scope}{torch_name}.weight"] = value["scale"]
        sd[f"{torch_scope}{torch_name}.bias"] = value["bias"]
        sd[f"{torch_scope}{torch_name}.running_mean"] = scope_stats[name]["mean"]
        sd[f"{torch_scope}{torch_name}.running_var"] = scope_stats[name]["var"]
        sd[f"{torch_scope}{torch_name}.num_batches_tracked"] = np.array(100, np.int64)

  put("", {k: v for k, v in params.items() if not k.startswith("layer")}, stats)
  for block in (k for k in params if k.startswith("layer")):
    put(block.replace("_", ".") + ".", params[block], stats[block])
  width = params["layer4_0"]["conv3"]["kernel"].shape[-1]
  sd["fc.weight"] = np.ones((num_classes, width), np.float32)
  sd["fc.bias"] = np.zeros(num_classes, np.float32)
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# Checkpoints are exported from the per-layer (unrolled) layout, that of the files; the model
# loads them into its scanned layout.
@pytest.fixture(scope="module")
def vit():
  model = models.get_model("vit_tiny_test")
  per_layer = models.get_model("vit_tiny_test", scan=False)
  return model, random_variables(per_layer, 32, 0), random_variables(model, 32, 1)


@pytest.fixture(scope="module")
def resnet():
  # Two bottlenecks in stage 1 and three in stage 3: those stages are scanned.
  model = models.get_model("resnet_tiny_test", stage_sizes=(2, 1, 3, 1))
  per_layer = model.clone(scan=False)
  return model, random_variables(per_layer, 32, 0), random_variables(model, 32, 1)


def test_vit_augreg_npz_round_trip(vit, tmp_path):
  _, source, fresh = vit
  path = tmp_path / "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
  np.savez(path, **export_augreg(source))
  loaded = models.load_pretrained("vit_tiny_test", fresh, path)
  assert_tree_equal(loaded["params"]["backbone"], stack_reference(source)["params"]["backbone"])
  # The checkpoint's classifier is dropped; the model's head keeps its fresh values.
  assert_tree_equal(loaded["params"]["embedding_head"], fresh["params"]["embedding_head"])
  assert jax.tree.structure(loaded) == jax.tree.structure(fresh)


def test_vit_timm_safetensors_round_trip_including_bf16(vit, tmp_path):
  _, source, fresh = vit
  state = export_timm_vit(source)
  safetensors.numpy.save_file(state, tmp_path / "vit.safetensors")
  loaded = models.load_pretrained("vit_tiny_test", fresh, tmp_path / "vit.safetensors")
  assert_tree_equal(loaded["params"]["backbone"], stack_reference(source)["params"]["backbone"])
  assert_tree_equal(loaded["params"]["embedding_head"], fresh["params"]["embedding_head"])
  # bf16 checkpoints load into float32 variables.
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()},
                              tmp_path / "bf16.safetensors")
  loaded = models.load_pretrained("vit_tiny_test", fresh, tmp_path / "bf16.safetensors")
  cls = loaded["params"]["backbone"]["cls"]
  assert cls.dtype == jnp.float32
  np.testing.assert_allclose(cls, source["params"]["backbone"]["cls"], rtol=1e-2)


def test_resnet_torchvision_safetensors_round_trip(resnet, tmp_path):
  _, source, fresh = resnet
  safetensors.numpy.save_file(export_torchvision_resnet(source), tmp_path / "rn.safetensors")
  loaded = models.load_pretrained("resnet_tiny_test", fresh, tmp_path / "rn.safetensors")
  assert_tree_equal(loaded["params"]["backbone"], stack_reference(source)["params"]["backbone"])
  assert_tree_equal(loaded["batch_stats"], stack_reference(source)["batch_stats"])
  assert_tree_equal(loaded["params"]["gem"], fresh["params"]["gem"])
  assert_tree_equal(loaded["params"]["embedding_head"], fresh["params"]["embedding_head"])


def test_resnet101_landmark_loads_torchvision_keys_and_keeps_its_head(tmp_path):
  # ResNet-101's real key layout (layer3.0 ... layer3.22) at 1/16 of its width.
  model = models.get_model("resnet101_landmark", base_width=4, embedding_dim=128)
  source = random_variables(model.clone(scan=False), 32, 0)
  fresh = random_variables(model, 32, 1)
  state = export_torchvision_resnet(source)
  assert "layer3.22.bn3.running_var" in state and "layer3.23.conv1.weight" not in state
  safetensors.numpy.save_file(state, tmp_path / "resnet101.safetensors")
  loaded = models.load_pretrained("resnet101_landmark", fresh, tmp_path / "resnet101.safetensors")
  assert_tree_equal(loaded["params"]["backbone"], stack_reference(source)["params"]["backbone"])
  assert_tree_equal(loaded["batch_stats"], stack_reference(source)["batch_stats"])
  assert_tree_equal(loaded["params"]["landmark_head"], fresh["params"]["landmark_head"])
  del state["layer3.22.conv2.weight"]
  safetensors.numpy.save_file(state, tmp_path / "short.safetensors")
  with pytest.raises(ValueError, match="layer3_22/conv2/kernel"):
    models.load_pretrained("resnet101_landmark", fresh, tmp_path / "short.safetensors")


def test_position_embedding_resampled_to_new_image_size(vit, tmp_path):
  _, source, _ = vit
  np.savez(tmp_path / "vit.npz", **export_augreg(source))
  big = models.get_model("vit_tiny_test", image_size=48)
  fresh = random_variables(big, 48, 2)
  loaded = models.load_pretrained("vit_tiny_test", fresh, tmp_path / "vit.npz")
  pos = np.asarray(loaded["params"]["backbone"]["Transformer"]["posembed_input"]["pos_embedding"])
  old = source["params"]["backbone"]["Transformer"]["posembed_input"]["pos_embedding"]
  assert pos.shape == (1, 37, 32)
  np.testing.assert_array_equal(pos[:, 0], old[:, 0])  # Class token untouched.
  # Independent reference: Pillow's bicubic resize of each channel of the 4x4 grid to 6x6.
  grid = old[0, 1:].reshape(4, 4, 32)
  want = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((6, 6),
                                                                             Image.BICUBIC))
                   for c in range(32)], axis=-1)
  np.testing.assert_allclose(pos[0, 1:].reshape(6, 6, 32), want, atol=1e-5)
  out = jax.eval_shape(lambda v: big.apply(v, jnp.zeros((1, 48, 48, 3))), loaded)
  assert out.shape == (1, 16)
  same = models.resample_position_embedding(old, 17)
  np.testing.assert_allclose(same, old, atol=1e-6)
  with pytest.raises(ValueError, match="must be square"):
    models.resample_position_embedding(old, 1 + 12)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickle_files_are_refused_with_conversion_hint(vit, tmp_path, suffix):
  path = tmp_path / f"weights{suffix}"
  path.write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match=r"(?s)refusing to load.*pickle.*safetensors.*torch\.load"):
    models.load_pretrained("vit_tiny_test", vit[2], path)


def test_unreadable_files_give_clear_errors(vit, tmp_path):
  fresh = vit[2]
  with pytest.raises(FileNotFoundError, match="not found"):
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="expected a .npz .* or .safetensors"):
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "weights.h5")
  (tmp_path / "bad.safetensors").write_bytes(b"garbage" * 10)
  with pytest.raises(ValueError, match="could not read .*bad.safetensors as .safetensors"):
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "bad.safetensors")
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="could not read .*bad.npz as .npz"):
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "bad.npz")
  np.savez(tmp_path / "obj.npz", cls=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="pickled object arrays"):
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "obj.npz")
  np.savez(tmp_path / "rn.npz", x=np.zeros(1))
  with pytest.raises(ValueError, match="ResNet weights load from .* .safetensors"):
    models.load_pretrained("resnet_tiny_test", fresh, tmp_path / "rn.npz")


def test_mismatches_are_listed_in_one_error(vit, tmp_path):
  _, source, fresh = vit
  state = export_timm_vit(source)
  del state["blocks.1.norm2.weight"]
  state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
  state["blocks.0.mlp.fc1.weight"] = np.ones((48, 32), np.float32)
  state["blocks.2.norm1.bias"] = np.ones(32, np.float32)  # A block the model does not have.
  safetensors.numpy.save_file(state, tmp_path / "bad.safetensors")
  with pytest.raises(ValueError) as info:
    models.load_pretrained("vit_tiny_test", fresh, tmp_path / "bad.safetensors")
  message = str(info.value)
  assert "missing from the checkpoint (2)" in message
  assert "params/backbone/Transformer/encoderblock_1/LayerNorm_2/scale" in message
  assert "params/backbone/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in message
  assert "unexpected in the checkpoint (2)" in message
  assert "blocks.0.ls1.gamma" in message and "blocks.2.norm1.bias" in message
  assert "shape mismatches (1)" in message
  assert "blocks.0.mlp.fc1.weight" in message and "(32, 48) vs model (32, 64)" in message


def test_resnet_missing_running_stats_are_reported(resnet, tmp_path):
  _, source, fresh = resnet
  state = export_torchvision_resnet(source)
  del state["layer2.0.downsample.1.running_var"]
  safetensors.numpy.save_file(state, tmp_path / "rn.safetensors")
  with pytest.raises(ValueError, match="batch_stats/backbone/layer2_0/downsample_bn/var"):
    models.load_pretrained("resnet_tiny_test", fresh, tmp_path / "rn.safetensors")


def test_big_vision_scanned_npz_loads_as_the_per_layer_one(vit, tmp_path):
  # big_vision's scanned ViTs save the blocks stacked: `Transformer/encoderblock/...`, (depth, ...).
  _, source, fresh = vit
  stacked = stack_reference(source)
  np.savez(tmp_path / "scanned.npz", **export_augreg(stacked))
  assert "Transformer/encoderblock/LayerNorm_0/scale" in np.load(tmp_path / "scanned.npz")
  loaded = models.load_pretrained("vit_tiny_test", fresh, tmp_path / "scanned.npz")
  assert_tree_equal(loaded["params"]["backbone"], stacked["params"]["backbone"])


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_loaded_scanned_model_computes_what_the_per_layer_model_did(family, vit, resnet,
                                                                    tmp_path):
  # The reference: the per-layer (unrolled) model with the checkpoint's arrays as they are.
  model, source, fresh = vit if family == "vit" else resnet
  if family == "vit":
    path, state = tmp_path / "vit.safetensors", export_timm_vit(source)
  else:
    path, state = tmp_path / "rn.safetensors", export_torchvision_resnet(source)
  safetensors.numpy.save_file(state, path)
  loaded = models.load_pretrained("vit_tiny_test" if family == "vit" else "resnet_tiny_test",
                                  fresh, path)
  # The head is not in the checkpoint: both models use the fresh one.
  reference = dict(source, params={**source["params"], **{
      k: v for k, v in fresh["params"].items() if k != "backbone"}})
  images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), np.uint8)
  want = model.clone(scan=False).apply(reference, images)
  np.testing.assert_allclose(model.apply(loaded, images), want, rtol=1e-5, atol=1e-6)
