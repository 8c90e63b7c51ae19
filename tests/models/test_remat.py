"""The scanned layers and the `remat` option of the ViT and ResNet backbones.

Scanned (stacked parameters, the default) and unrolled (per-layer parameters) models compute the
same function and gradient; every remat setting computes the same as none.
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models
from recall_jax.models import layer_stack

REPO = pathlib.Path(__file__).resolve().parents[2]
# Tiny models whose ResNet stages 1 and 3 have repeated (scanned) bottlenecks.
_MODELS = [("vit_tiny_test", {}), ("resnet_tiny_test", dict(stage_sizes=(2, 1, 3, 1)))]


def _inputs(name):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)
  targets = rng.standard_normal((3, 16)).astype(np.float32)
  return images, targets


def _loss(model, params, frozen, images, targets, **apply_kwargs):
  out = model.apply({"params": params, **frozen}, images, train=True,
                    rngs={"dropout": jax.random.key(1)}, **apply_kwargs)
  return jnp.sum(out * targets)


@pytest.mark.parametrize("name,kwargs", _MODELS)
def test_scanned_equals_unrolled_outputs_and_gradients(name, kwargs):
  scanned = models.get_model(name, **kwargs)
  unrolled = models.get_model(name, scan=False, **kwargs)
  variables = models.init_variables(scanned, jax.random.key(0), 32)
  # The unrolled model's variables are the scanned ones split per layer: the same tree as its own.
  per_layer = layer_stack.split_layers(variables)
  assert jax.tree.structure(per_layer) == jax.tree.structure(
      jax.eval_shape(lambda: models.init_variables(unrolled, jax.random.key(0), 32)))
  chex.assert_trees_all_equal(layer_stack.stack_layers(per_layer, variables), variables)
  images, targets = _inputs(name)
  results = []
  for model, v in ((scanned, variables), (unrolled, per_layer)):
    frozen = {k: x for k, x in v.items() if k != "params"}
    results.append(jax.jit(jax.value_and_grad(
        lambda p, m=model, f=frozen: _loss(m, p, f, images, targets)))(v["params"]))
  (value, grads), (want_value, want_grads) = results
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  chex.assert_trees_all_close(layer_stack.split_layers(grads), want_grads, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(want_value)) > 0


def test_scanned_resnet_equals_unrolled_with_a_padding_mask():
  kwargs = dict(stage_sizes=(2, 1, 3, 1), with_head=False)
  scanned = models.get_model("resnet_tiny_test", **kwargs)
  unrolled = models.get_model("resnet_tiny_test", scan=False, **kwargs)
  variables = models.init_variables(scanned, jax.random.key(0), 32)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), np.uint8)
  mask = np.zeros((2, 64, 64), bool)
  mask[0, :40, :64], mask[1, :64, :24] = True, True
  got = scanned.apply(variables, images, mask=mask)
  want = unrolled.apply(layer_stack.split_layers(variables), images, mask=mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs,remats", [
    # dropout: the recomputed masks must match the forward pass's.
    ("vit_tiny_test", dict(dropout_rate=0.1), ("block", "dots")),
    ("resnet_tiny_test", dict(stage_sizes=(2, 1, 3, 1)), ("block",)),
])
def test_remat_settings_give_the_same_outputs_and_gradients(name, kwargs, remats):
  plain = models.get_model(name, **kwargs)
  variables = models.init_variables(plain, jax.random.key(0), 32)
  params, frozen = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  images, targets = _inputs(name)

  def grad_fn(model):
    return jax.value_and_grad(lambda p: _loss(model, p, frozen, images, targets))

  want = jax.jit(grad_fn(plain))(params)
  assert float(jnp.abs(want[0])) > 0
  assert "remat" not in str(jax.make_jaxpr(grad_fn(plain))(params))
  for remat in remats:
    model = models.get_model(name, remat=remat, **kwargs)
    chex.assert_trees_all_equal(models.init_variables(model, jax.random.key(0), 32), variables)
    # float32 sums in a different order: gradients of size ~10 agree to ~1e-5.
    chex.assert_trees_all_close(jax.jit(grad_fn(model))(params), want, rtol=1e-4, atol=1e-5)
    # The option is not a no-op: the backward pass holds rematerialised blocks inside the scan.
    jaxpr = str(jax.make_jaxpr(grad_fn(model))(params))
    assert "remat" in jaxpr and "scan" in jaxpr


@pytest.mark.parametrize("name", ["vit_tiny_test", "resnet_tiny_test"])
def test_remat_rejects_unknown_settings(name):
  with pytest.raises(ValueError, match="remat must be"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model(name, remat="stage2"), jax.random.key(0), 32))



def _main(tmp_path, data_root, *flags):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(tmp_path), f"--config.data.root={data_root}",
       "--config.model.name=vit_tiny_test", "--config.data.image_size=32",
       "--config.data.resize_size=32",
       "--config.data.max_eval_images=200", "--config.num_grid_queries=2", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def test_main_trains_a_scanned_vit_with_block_remat(omniglot_root, tmp_path):
  proc = _main(tmp_path, omniglot_root, "--config.model.remat=block")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if r["kind"] == "train"]
  assert losses and all(np.isfinite(losses))
  assert json.loads((tmp_path / "config.json").read_text())["model"]["remat"] == "block"


def test_main_rejects_an_unknown_remat_in_one_line(omniglot_root, tmp_path):
  proc = _main(tmp_path, omniglot_root, "--config.model.remat=everything")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "remat must be one of none, block, dots" in proc.stderr
  assert "Traceback" not in proc.stderr
