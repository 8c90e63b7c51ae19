"""Parity with timm on random weights: the same state dict loaded into timm and into our models.

Needs torch and timm, which are not part of the CPU test environment (timm does not import next to
its CPU torch wheel); run it in a venv with `torch==2.14.1 torchvision==0.29.1 timm`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from recall_jax import models
from recall_jax.models import common

torch = pytest.importorskip("torch", reason="timm parity needs PyTorch (not installed here)")
timm = pytest.importorskip("timm", reason="timm parity needs timm (not installed here)")


def randomised_state_dict(module, seed):
  """timm's random init, with every norm parameter and running statistic made non-trivial."""
  gen = torch.Generator().manual_seed(seed)
  state = {}
  for key, value in module.state_dict().items():
    value = value.detach().clone()
    if value.is_floating_point():
      noise = torch.randn(value.shape, generator=gen)
      if key.endswith("running_var"):
        value = 0.5 + torch.rand(value.shape, generator=gen)
      elif key.endswith("running_mean") or key.endswith("bias"):
        value = 0.1 * noise
      elif value.ndim == 1:  # Norm scales (timm zero-initialises some of them).
        value = 1.0 + 0.1 * noise
        if key.endswith("bn3.weight"):
          # Trained ResNets have small last-BN scales in their residual branches; with 1s the
          # 16 residual additions blow the features up to ~1e2 and float32 rounding grows along.
          value = 0.2 * value
      elif key in ("cls_token", "pos_embed"):
        value = 0.1 * noise
    state[key] = value.contiguous()
  module.load_state_dict(state)
  # Like a trained network, set BN running statistics to the activations' actual statistics
  # (one cumulative pass over a calibration batch); otherwise ResNet-50's random features grow to
  # ~1e3 and an absolute tolerance says little.
  norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  if norms:
    for m in norms:
      m.reset_running_stats()
      m.momentum = None
    module.train()
    with torch.no_grad():
      module(torch.randn((8, 3, 224, 224), generator=gen))
    module.eval()
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def compare(name, timm_name, image_size, tmp_path, to_nhwc):
  torch.manual_seed(0)
  reference = timm.create_model(timm_name, pretrained=False).eval()
  state = randomised_state_dict(reference, seed=1)
  path = tmp_path / f"{timm_name}.safetensors"
  safetensors.numpy.save_file(state, path)

  model = models.get_model(name)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_size))
  variables = models.load_pretrained(name, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                        shapes), path)

  images = np.random.default_rng(2).uniform(size=(2, image_size, image_size, 3)).astype(
      np.float32)
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, images))
  standardised = np.asarray(common.preprocess_images(jnp.asarray(images)))
  with torch.no_grad():
    theirs = reference.forward_features(
        torch.from_numpy(standardised.copy()).permute(0, 3, 1, 2).contiguous()).numpy()
  theirs = to_nhwc(theirs)
  assert ours.shape == theirs.shape
  diff = np.abs(ours - theirs).max()
  print(f"\n{name} vs timm {timm_name}: max |diff| = {diff:.3g}, max |feature| = "
        f"{np.abs(theirs).max():.3g}")
  return diff


def test_vit_b16_matches_timm(tmp_path):
  diff = compare("vit_b16", "vit_base_patch16_224", 224, tmp_path, lambda x: x)
  assert diff <= 1e-4


def test_resnet50_matches_timm(tmp_path):
  diff = compare("resnet50", "resnet50", 224, tmp_path, lambda x: np.transpose(x, (0, 2, 3, 1)))
  assert diff <= 1e-4
