"""The `remat` option of the ViT and ResNet backbones: same function and gradient, recomputed."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax import models


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_test", dict(dropout_rate=0.1)),  # dropout: the recomputed masks must match
    ("resnet_tiny_test", {}),
])
def test_remat_blocks_give_the_same_outputs_and_gradients(name, kwargs):
  plain = models.get_model(name, **kwargs)
  remat = models.get_model(name, remat="block", **kwargs)
  variables = models.init_variables(plain, jax.random.key(0), 32)
  chex.assert_trees_all_equal(models.init_variables(remat, jax.random.key(0), 32), variables)
  params, frozen = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  targets = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)

  def loss(model, p):
    out = model.apply({"params": p, **frozen}, images, train=True,
                      rngs={"dropout": jax.random.key(1)})
    return jnp.sum(out * targets)

  results = [jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params)
             for m in (plain, remat)]
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(results[0][0])) > 0
  # The option is not a no-op: the backward pass holds rematerialised blocks.
  jaxprs = [str(jax.make_jaxpr(jax.grad(lambda p, m=m: loss(m, p)))(params))
            for m in (plain, remat)]
  assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]


@pytest.mark.parametrize("name", ["vit_tiny_test", "resnet_tiny_test"])
def test_remat_rejects_unknown_settings(name):
  with pytest.raises(ValueError, match="remat must be"):
    jax.eval_shape(lambda: models.init_variables(
        models.get_model(name, remat="stage2"), jax.random.key(0), 32))
