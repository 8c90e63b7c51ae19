"""Loading pretrained weights from local files into freshly initialised variables.

Supported files (nothing is ever unpickled; nothing is downloaded):

* ViT, `.npz` in the AugReg / vit_jax layout (the paper's `B_16-i21k-300ep-lr_0.001-aug_medium1-
  wd_0.1-do_0.0-sd_0.0.npz`): keys `embedding/kernel`, `cls`, `Transformer/posembed_input/
  pos_embedding`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel`, ...
  Read with `np.load(allow_pickle=False)`. A leading `params/` or `opt/target/` is ignored; the
  blocks may also come stacked (`Transformer/encoderblock/...`, big_vision's scanned layout).
* ViT, `.safetensors` in the timm layout (e.g. `vit_base_patch16_224.augreg_in21k`):
  `patch_embed.proj.weight`, `cls_token`, `pos_embed`, `blocks.{i}.attn.qkv.weight`, ...
  (PyTorch (out, in) Linear and OIHW conv weights are transposed; the fused qkv is split.)
* ResNet, `.safetensors` in the torchvision / timm layout (`resnet50.tv_in1k`): `conv1.weight`,
  `bn1.running_mean`, `layer1.0.downsample.0.weight`, ... (OIHW -> HWIO; BN running statistics
  go to the `batch_stats` collection; `num_batches_tracked` is ignored).

The checkpoint's classifier (`head`, `pre_logits`, `fc`) is dropped; the model's own head (the
`embedding_head` and GeM `p`) keeps its fresh initialisation. When the model's image size differs
from the checkpoint's, the ViT position embedding grid is resampled (bicubic). Any missing or
unexpected key and any shape mismatch raise one `ValueError` that lists all of them. The
checkpoints' per-layer arrays are stacked into the scanned layers' leading axis
(`recall_jax.models.layer_stack`). Serves both tasks.
"""

import pathlib
import re
import zipfile
from typing import Any
from collections.abc import Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax.models import layer_stack
from recall_jax.models import registry

Path = tuple[str, ...]
# (model variable path, array, checkpoint key it came from)
Converted = tuple[Path, np.ndarray, str]

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# Model variables that a backbone checkpoint never provides: they keep their fresh values.
_FRESH_PREFIXES: tuple[Path, ...] = (("params", "embedding_head"), ("params", "gem"),
                                     ("params", "landmark_head"))
_POS_EMBEDDING: Path = ("params", "backbone", "Transformer", "posembed_input", "pos_embedding")

_CONVERT_HINT = (
    "Convert it once to safetensors where PyTorch is installed (this reads the pickle, so only do "
    "it for files you trust):\n"
    "  python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('IN.pth', map_location='cpu', weights_only=True); "
    "sd = sd.get('state_dict', sd.get('model', sd)); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"\n"
    "or download the `.safetensors` file that timm publishes on the Hugging Face Hub "
    "(e.g. timm/resnet50.tv_in1k/model.safetensors).")


class _UnknownKey(Exception):
  """A checkpoint key that no conversion rule recognises."""


def read_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a `.npz` (allow_pickle=False) or `.safetensors` file into {key: numpy array}.

  Raises:
    ValueError: for pickle-based formats (with conversion instructions), unknown suffixes and
      unreadable files.
    FileNotFoundError: if the file does not exist.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in _PICKLE_SUFFIXES:
    raise ValueError(f"refusing to load {path}: {suffix} files are Python pickles, which can run "
                     f"arbitrary code when loaded. {_CONVERT_HINT}")
  if suffix not in (".npz", ".safetensors"):
    raise ValueError(f"cannot load {path}: expected a .npz (AugReg/big_vision ViT) or "
                     f".safetensors (timm/torchvision) checkpoint, got suffix {suffix!r}")
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if suffix == ".npz":
    # np.load falls back to unpickling non-zip files; check the container first.
    if not zipfile.is_zipfile(path):
      raise ValueError(f"could not read {path} as .npz: it is not a zip archive")
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
    except ValueError as e:
      if "allow_pickle" in str(e):
        raise ValueError(f"{path} holds pickled object arrays, which are never loaded; "
                         f"expected plain numeric arrays") from e
      raise ValueError(f"could not read {path} as .npz: {e}") from e
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ...
      raise ValueError(f"could not read {path} as .npz: {type(e).__name__}: {e}") from e
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  try:
    return dict(safetensors.numpy.load_file(str(path)))
  except Exception as e:  # safetensors.SafetensorError and friends.
    raise ValueError(f"could not read {path} as .safetensors: {type(e).__name__}: {e}") from e


def _strip_prefixes(checkpoint: dict[str, np.ndarray],
                    prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  for prefix in prefixes:
    if checkpoint and all(k.startswith(prefix) for k in checkpoint):
      checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
  return checkpoint


def _torch_conv(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW convolution kernel -> flax HWIO."""
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _heads(w: np.ndarray, num_heads: int, axis: int) -> np.ndarray:
  """Splits `axis` of size D into (num_heads, D / num_heads); left as is if indivisible."""
  d = w.shape[axis]
  if d % num_heads:
    return w
  return np.reshape(w, w.shape[:axis] + (num_heads, d // num_heads) + w.shape[axis + 1:])


def _vit_augreg_rules(key: str, w: np.ndarray, num_heads: int) -> list[Converted] | None:
  """AugReg/vit_jax npz key -> model paths (None: a classifier key to drop)."""
  del num_heads  # The npz layout already splits the heads.
  top = key.split("/")[0]
  if top in ("head", "pre_logits"):
    return None
  if top not in ("embedding", "cls", "Transformer"):
    raise _UnknownKey(key)
  return [(("params", "backbone", *key.split("/")), w, key)]


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TIMM_BLOCK_LEAVES = {
    "norm1.weight": ("LayerNorm_0", "scale"), "norm1.bias": ("LayerNorm_0", "bias"),
    "norm2.weight": ("LayerNorm_2", "scale"), "norm2.bias": ("LayerNorm_2", "bias"),
    "mlp.fc1.weight": ("MlpBlock_3", "Dense_0", "kernel"),
    "mlp.fc1.bias": ("MlpBlock_3", "Dense_0", "bias"),
    "mlp.fc2.weight": ("MlpBlock_3", "Dense_1", "kernel"),
    "mlp.fc2.bias": ("MlpBlock_3", "Dense_1", "bias"),
}


def _vit_timm_rules(key: str, w: np.ndarray, num_heads: int) -> list[Converted] | None:
  """timm ViT state-dict key -> model paths (None: a classifier key to drop)."""
  root = ("params", "backbone")
  enc = root + ("Transformer",)
  if key.split(".")[0] in ("head", "pre_logits"):
    return None
  simple = {
      "patch_embed.proj.weight": (root + ("embedding", "kernel"), _torch_conv(w)),
      "patch_embed.proj.bias": (root + ("embedding", "bias"), w),
      "cls_token": (root + ("cls",), w),
      "pos_embed": (enc + ("posembed_input", "pos_embedding"), w),
      "norm.weight": (enc + ("encoder_norm", "scale"), w),
      "norm.bias": (enc + ("encoder_norm", "bias"), w),
  }
  if key in simple:
    path, value = simple[key]
    return [(path, value, key)]
  match = _BLOCK.fullmatch(key)
  if not match:
    raise _UnknownKey(key)
  block = enc + (f"encoderblock_{match.group(1)}",)
  leaf = match.group(2)
  attn = block + ("MultiHeadDotProductAttention_1",)
  if leaf in _TIMM_BLOCK_LEAVES:
    value = w.T if leaf.endswith("weight") and w.ndim == 2 else w
    return [(block + _TIMM_BLOCK_LEAVES[leaf], value, key)]
  if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
    if w.shape[0] % 3:
      raise _UnknownKey(key)
    parts = np.split(w, 3, axis=0)  # (3 D, D) rows: query, key, value.
    kind = "kernel" if leaf.endswith("weight") else "bias"
    out = []
    for name, part in zip(("query", "key", "value"), parts):
      value = _heads(part.T, num_heads, 1) if kind == "kernel" else _heads(part, num_heads, 0)
      out.append((attn + (name, kind), value, key))
    return out
  if leaf == "attn.proj.weight":
    return [(attn + ("out", "kernel"), _heads(w.T, num_heads, 0), key)]
  if leaf == "attn.proj.bias":
    return [(attn + ("out", "bias"), w, key)]
  raise _UnknownKey(key)


_RESNET_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(.+)")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _resnet_torch_rules(key: str, w: np.ndarray, num_heads: int) -> list[Converted] | None:
  """torchvision/timm ResNet key -> model paths (None: classifier or bookkeeping to drop)."""
  del num_heads
  if key.split(".")[0] == "fc" or key.endswith("num_batches_tracked"):
    return None
  match = _RESNET_BLOCK.fullmatch(key)
  if match:
    scope = (f"layer{match.group(1)}_{match.group(2)}",)
    rest = match.group(3)
    rest = rest.replace("downsample.0.", "downsample_conv.").replace("downsample.1.",
                                                                     "downsample_bn.")
  else:
    scope, rest = (), key
  module, _, leaf = rest.rpartition(".")
  if re.fullmatch(r"(conv\d|downsample_conv)", module) and leaf == "weight":
    return [(("params", "backbone", *scope, module, "kernel"), _torch_conv(w), key)]
  if re.fullmatch(r"(bn\d|downsample_bn)", module) and leaf in _BN_LEAVES:
    collection, name = _BN_LEAVES[leaf]
    return [((collection, "backbone", *scope, module, name), w, key)]
  raise _UnknownKey(key)


def resample_position_embedding(pos_embedding: np.ndarray, num_tokens: int,
                                num_prefix_tokens: int = 1) -> np.ndarray:
  """Resamples a (1, prefix + g*g, D) position embedding to (1, num_tokens, D).

  The prefix (class) token is kept; the g x g grid is resized bicubically (`jax.image.resize`,
  Keys cubic a = -0.5, antialiased when shrinking) to the new square grid, in float32.

  Raises:
    ValueError: if either grid is not square.
  """
  if pos_embedding.ndim != 3 or pos_embedding.shape[0] != 1:
    raise ValueError(f"position embedding must have shape (1, T, D), got {pos_embedding.shape}")
  old_grid = pos_embedding.shape[1] - num_prefix_tokens
  new_grid = num_tokens - num_prefix_tokens
  old_side, new_side = int(round(old_grid**0.5)), int(round(new_grid**0.5))
  if old_side**2 != old_grid or new_side**2 != new_grid:
    raise ValueError(f"cannot resample a position embedding of {pos_embedding.shape[1]} tokens to "
                     f"{num_tokens}: the patch grids must be square")
  d = pos_embedding.shape[-1]
  prefix = pos_embedding[:, :num_prefix_tokens].astype(np.float32)
  grid = np.reshape(pos_embedding[0, num_prefix_tokens:].astype(np.float32),
                    (old_side, old_side, d))
  grid = np.asarray(jax.image.resize(jnp.asarray(grid), (new_side, new_side, d), "bicubic"))
  return np.concatenate([prefix, np.reshape(grid, (1, new_grid, d))], axis=1)


def _convert(checkpoint: dict[str, np.ndarray], rules: Callable[..., list[Converted] | None],
             num_heads: int) -> tuple[list[Converted], list[str]]:
  converted, unknown = [], []
  for key in sorted(checkpoint):
    try:
      out = rules(key, checkpoint[key], num_heads)
    except _UnknownKey:
      unknown.append(key)
      continue
    if out:
      converted.extend(out)
  return converted, unknown


def _fmt(path: Path) -> str:
  return "/".join(path)


def _is_fresh(path: Path) -> bool:
  return any(path[:len(p)] == p for p in _FRESH_PREFIXES)


def _iter_flat(variables: Any) -> Iterator[tuple[Path, Any]]:
  yield from flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()


def load_pretrained(name: str, variables: Any, path: str | pathlib.Path) -> dict[str, Any]:
  """Loads a local checkpoint into freshly initialised variables of model `name`.

  Args:
    name: registry name of the model (`get_model(name)`), which selects the key layout.
    variables: the model's initialised variables (`init_variables`); they define the expected
      shapes and dtypes and provide the head's fresh values.
    path: a `.npz` (ViT, AugReg layout) or `.safetensors` (ViT: timm layout, or AugReg keys;
      ResNet: torchvision/timm layout) file.

  Returns:
    Variables with the same tree structure, shapes and dtypes as `variables`; backbone values come
    from the checkpoint, head values (`params/embedding_head`, `params/gem`) are unchanged.

  Raises:
    ValueError: for pickles, unreadable files, or one error listing every missing key,
      unexpected key and shape mismatch.
  """
  family = registry.model_family(name)
  if family == "small_cnn":
    raise ValueError(f"model {name!r} is trained from scratch; there are no pretrained "
                     f"checkpoints for it")
  path = pathlib.Path(path)
  checkpoint = read_checkpoint(path)
  # Checkpoints name each layer; the scanned layers are matched one by one, then stacked again.
  fresh = dict(_iter_flat(layer_stack.split_layers(variables)))

  num_heads = 1
  if family == "vit":
    checkpoint = _strip_prefixes(checkpoint, ("opt/target/", "params/", "module."))
    query = [v for k, v in fresh.items() if k[-3:] == ("MultiHeadDotProductAttention_1", "query",
                                                       "kernel")]
    num_heads = query[0].shape[1] if query else 1
    # AugReg keys use '/', timm keys use '.'; either may come in either container.
    rules = _vit_augreg_rules if any("/" in k for k in checkpoint) or "cls" in checkpoint else (
        _vit_timm_rules)
    if rules is _vit_augreg_rules:  # big_vision's scanned ViTs save the blocks stacked.
      checkpoint = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
          layer_stack.split_layers(flax.traverse_util.unflatten_dict(checkpoint, sep="/"))).items()}
  else:
    if path.suffix.lower() == ".npz":
      raise ValueError(f"ResNet weights load from torchvision/timm .safetensors files, got {path}")
    checkpoint = _strip_prefixes(checkpoint, ("module.", "model."))
    rules = _resnet_torch_rules
  converted, unexpected = _convert(checkpoint, rules, num_heads)

  loaded: dict[Path, Any] = {}
  mismatched = []
  for target, value, source in converted:
    if target not in fresh or _is_fresh(target):
      unexpected.append(f"{source} (-> {_fmt(target)})")
      continue
    want = fresh[target].shape
    if value.shape != tuple(want) and target == _POS_EMBEDDING and value.ndim == 3 and (
        value.shape[-1] == want[-1]):
      try:
        value = resample_position_embedding(value, want[1])
      except ValueError:
        pass  # Reported as a shape mismatch below.
    if value.shape != tuple(want):
      mismatched.append(f"{source} -> {_fmt(target)}: checkpoint {tuple(value.shape)} vs model "
                        f"{tuple(want)}")
      continue
    loaded[target] = jnp.asarray(value, dtype=fresh[target].dtype)
  missing = [_fmt(k) for k in fresh if k not in loaded and not _is_fresh(k)]

  if missing or unexpected or mismatched:
    lines = [f"checkpoint {path} does not match model {name!r} "
             f"({len(checkpoint)} checkpoint arrays, {len(loaded)} variables matched):"]
    for title, items in (("missing from the checkpoint", missing),
                         ("unexpected in the checkpoint", sorted(set(unexpected))),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    raise ValueError("\n".join(lines))

  merged = flax.traverse_util.unflatten_dict({k: loaded.get(k, v) for k, v in fresh.items()})
  return jax.tree.map(jnp.asarray, layer_stack.stack_layers(merged, variables))


def load_whitening(variables: Any, path: str | pathlib.Path) -> dict[str, Any]:
  """Initialises the landmark head's whitening FC from a whitening `.npz`.

  The file holds `mean` m (D,) and `projection` P (D_out, D) (as written by
  `recall_jax.evaluation.whitening.save_whitening`); the FC computes x W + b, so W = P[:k]^T and
  b = -P[:k] m, with k the FC's output size (the leading k rows are a dimension reduction).

  Args:
    variables: variables of a ResNet with `head='landmark'` and `whiten=True`.
    path: the whitening `.npz`.

  Returns:
    `variables` with `params/landmark_head/whitening/{kernel,bias}` replaced.

  Raises:
    ValueError: the model has no whitening FC, the file is unreadable or lacks `mean` /
      `projection`, or the shapes do not fit the FC.
    FileNotFoundError: the file does not exist.
  """
  variables = flax.core.unfreeze(variables)
  try:
    fc = variables["params"]["landmark_head"]["whitening"]
  except KeyError:
    raise ValueError("the model has no whitening FC: use a ResNet with head='landmark' and "
                     "whiten=True") from None
  data = read_checkpoint(path)
  if "mean" not in data or "projection" not in data:
    raise ValueError(f"whitening file {path} must hold arrays 'mean' and 'projection', got "
                     f"{sorted(data)}")
  mean, projection = data["mean"].astype(np.float64), data["projection"].astype(np.float64)
  width, out = fc["kernel"].shape
  if mean.shape != (width,) or projection.ndim != 2 or projection.shape[1] != width or (
      len(projection) < out):
    raise ValueError(f"whitening {path} (mean {mean.shape}, projection {projection.shape}) does "
                     f"not fit the {width} -> {out} whitening FC")
  projection = projection[:out]
  fc["kernel"] = jnp.asarray(projection.T, fc["kernel"].dtype)
  fc["bias"] = jnp.asarray(-projection @ mean, fc["bias"].dtype)
  return variables
