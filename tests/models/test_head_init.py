"""center_embedding_head: the head LayerNorm's output is centred on the batch it saw."""

import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import models


def test_centring_removes_the_batch_mean_and_changes_only_the_bias():
  model = models.get_model("small_cnn", embedding_dim=8)
  variables = models.init_variables(model, jax.random.key(0), 28, channels=1)
  images = jax.random.randint(jax.random.key(1), (16, 28, 28, 1), 0, 256).astype(jnp.uint8)
  centred = models.center_embedding_head(model, variables, images)

  def head_input(v):  # The LayerNorm output, through flax's own capture.
    _, captured = model.apply(v, images, train=False, capture_intermediates=True)
    return captured["intermediates"]["embedding_head"]["norm"]["__call__"][0]

  before, after = head_input(variables), head_input(centred)
  np.testing.assert_allclose(np.mean(after, axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(after, before - np.mean(before, axis=0), atol=1e-5)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), variables, centred)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(changed)}
  assert [k for k, v in flat.items() if v] == ["['params']['embedding_head']['norm']['bias']"]
