"""Backbones (ViT, ResNet-50 with frozen BatchNorm, a small CNN) and pretrained-weight loading.

Every model maps images to embeddings:

  model = get_model("vit_b16", embedding_dim=512, dtype=jnp.bfloat16)
  variables = init_variables(model, jax.random.key(0), image_size=224)
  variables = load_pretrained("vit_b16", variables, "B_16-i21k-300ep-...npz")  # optional
  emb = model.apply(variables, images, train=False, rngs={"dropout": key})

* `images`: (B, H, W, C), uint8 in [0, 255] or float in [0, 1]; C = 3 (RGB) or C = 1 (grey,
  replicated to RGB). ImageNet mean/std normalisation happens inside the model.
* Output: float32 (B, embedding_dim), unit L2 norm, when `with_head=True` (the paper's head:
  [GeM for ResNets] -> LayerNorm -> Linear -> L2-normalise). With `with_head=False`: pooled float32
  backbone features (ViT: class token after the encoder norm; ResNet / small CNN: global average
  pool). `model.apply(variables, images, method="features")` gives the unpooled tokens / map.
* Landmark retrieval: `get_model("resnet101_landmark")` (any ResNet with `head="landmark"`) ends
  in GeM -> L2 -> whitening FC -> L2 (`whiten=False`: no FC); `load_whitening(variables, path)`
  writes a whitening `.npz` into the FC. ResNets take padded images with a (B, H, W) validity
  mask, `model.apply(variables, images, mask=mask)`, and describe the real pixels only.
* Variable collections: `params` holds everything trainable (including BatchNorm scale/bias and
  GeM `p`); ResNets also have `batch_stats` (BatchNorm running mean/var), which are frozen:
  always used, never updated, never requested as mutable. A trainer optimises
  `variables['params']` only and passes every other collection through unchanged.
* `dtype` is the compute dtype of the trunk (bf16 on GPU); norms, head and outputs are float32;
  `param_dtype` (default float32) is the storage dtype.
* ViT dropout (`dropout_rate`, default 0) is active only with `train=True` and needs the flax
  'dropout' rng. ViT attention uses `jax.nn.dot_product_attention`; cuDNN flash attention rejects
  197 tokens, so `attention_implementation='cudnn'` needs `attention_pad_to` (e.g. 200).
* Repeated layers run under `nn.scan` with their variables stacked on a leading layer axis (the
  ViT's `encoderblock`, a ResNet stage's bottlenecks 1..n-1 as `layer{s}`); `scan=False` unrolls
  them with per-layer names. `remat='block'` (ViT also `'dots'`) recomputes each block in the
  backward pass, for activation memory on accelerators; the default `'none'` is faster on a CPU.
  `layer_stack.stack_layers` / `split_layers` convert variables between the two layouts.
"""

from recall_jax.models.pretrained import load_pretrained
from recall_jax.models.pretrained import load_whitening
from recall_jax.models.pretrained import read_checkpoint
from recall_jax.models.pretrained import resample_position_embedding
from recall_jax.models.common import gem_pool
from recall_jax.models.head_init import center_embedding_head
from recall_jax.models.common import l2_normalize
from recall_jax.models.common import masked_gem_pool
from recall_jax.models.common import preprocess_images
from recall_jax.models.registry import available_models
from recall_jax.models.registry import get_model
from recall_jax.models.registry import init_variables
from recall_jax.models.registry import model_family
from recall_jax.models.resnet import ResNet
from recall_jax.models.small_cnn import SmallCNN
from recall_jax.models.vit import ViT

__all__ = [
    "ResNet", "SmallCNN", "ViT", "available_models", "gem_pool", "get_model", "init_variables",
    "l2_normalize", "load_pretrained", "load_whitening", "masked_gem_pool", "model_family",
    "preprocess_images", "read_checkpoint", "resample_position_embedding",
]
