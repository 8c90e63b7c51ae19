"""Building a run from a config: each loss gets the keywords of its own config section.

Serves both tasks.
"""

import functools

import jax
import numpy as np
import pytest

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax import losses
from recall_jax.train import experiment


def batch(m=4, classes=4, dim=8):
  embeddings = jax.random.normal(jax.random.key(0), (m * classes, dim))
  embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  return embeddings, np.repeat(np.arange(classes), m).astype(np.int32)


@pytest.mark.parametrize("name, key, value, max_positives", [
    ("recall_at_k", "tau2", 0.05, True), ("smooth_ap", "temperature", 0.05, True),
    ("contrastive", "neg_margin", 0.2, False), ("multi_similarity", "beta", 10.0, False),
])
def test_loss_fn_passes_its_section(name, key, value, max_positives):
  c = config_lib.base_config()
  # 8 classes of 4: RS@k's largest default k (16) must stay below B - 1.
  c.loss.name, c.batch_size, c.samples_per_class = name, 32, 4
  c.loss[name][key] = value
  loss_fn, uses_rng = experiment.make_loss_fn(c)
  assert not uses_rng
  embeddings, labels = batch(classes=8)
  kwargs = {k: (tuple(v) if isinstance(v, tuple) else v) for k, v in c.loss[name].items()}
  if max_positives:
    kwargs["max_positives"] = 3
  expected = losses.get_loss(name)(embeddings, labels, **kwargs)
  np.testing.assert_allclose(loss_fn(embeddings, labels), expected, rtol=1e-6)
  default = losses.get_loss(name)(embeddings, labels)
  assert abs(float(expected) - float(default)) > 1e-6  # the configured value reached the loss


def test_simix_loss_takes_the_step_key():
  c = config_lib.base_config()
  c.simix, c.batch_size, c.samples_per_class = True, 16, 4
  loss_fn, uses_rng = experiment.make_loss_fn(c)
  embeddings, labels = batch()
  assert uses_rng
  a = loss_fn(embeddings, labels, jax.random.key(1))
  b = loss_fn(embeddings, labels, jax.random.key(2))
  assert np.isfinite(float(a)) and float(a) != float(b)


def test_train_source_held_decoded_gives_the_same_batches(omniglot_root):
  # `data.decode_once` holds uint8 images instead of PNG bytes: the loader must not notice.
  from recall_jax import data
  c = config_lib.base_config()
  c.data.name, c.data.root, c.data.channels, c.data.rotated_classes = "omniglot", str(
      omniglot_root), 1, 4
  c.data.in_memory = True
  encoded = experiment.make_train_source(c, progress=False)
  c.data.decode_once = True
  decoded = experiment.make_train_source(c, progress=False)
  sampler = data.MPerClassSampler(encoded.labels, 64, 4, seed=0)
  kw = dict(image_size=28, seed=0, channels=1, crop_scale=(1.0, 1.0), flip=False, num_steps=2)
  for a, b in zip(data.make_train_loader(encoded, sampler, **kw),
                  data.make_train_loader(decoded, sampler, **kw), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  c.data.in_memory = False
  with pytest.raises(errors.ConfigError, match="data.decode_once needs data.in_memory"):
    config_lib.validate(c)


@pytest.mark.parametrize("name", ["recall_at_k", "smooth_ap"])
def test_memory_loss_slots_hold_every_positive_of_a_filled_memory(name):
  """The query/database loss, sized by `batch_layout.memory_max_positives`, equals the loss
  sized from the concrete labels once the sampler's batches have filled (and wrapped) the
  memory; 4 classes of m = 4 in batches of 16 put every class in every batch (the worst case)."""
  from recall_jax.data import sampler as sampler_lib
  from recall_jax.train import cross_batch_memory
  c = config_lib.base_config()
  c.loss.name, c.batch_size, c.samples_per_class, c.loss.memory_size = name, 16, 4, 40
  if name == "recall_at_k":
    c.loss[name].k_values = (1, 2, 4)  # below N - 1 from the first step (N = 16)
  loss_fn, _ = experiment.make_loss_fn(c)
  assert loss_fn.keywords["max_positives"] == 3 + 4 * 3  # far below m + M - 1 = 43
  labels = np.repeat(np.arange(4), 6)
  sampler = sampler_lib.MPerClassSampler(labels, 16, 4, seed=0)
  memory = cross_batch_memory.init(40, 8)
  key = jax.random.key(0)
  for step in range(4):
    batch_labels = jax.numpy.asarray(labels[sampler.batch_indices(step)], jax.numpy.int32)
    embeddings = jax.random.normal(jax.random.fold_in(key, step), (16, 8))
    embeddings = embeddings / jax.numpy.linalg.norm(embeddings, axis=1, keepdims=True)
    database, database_labels, valid = cross_batch_memory.database(memory, embeddings,
                                                                   batch_labels)
    got = loss_fn(embeddings, batch_labels, database, database_labels, database_valid=valid)
    exact = functools.partial(loss_fn.func, **{**loss_fn.keywords, "max_positives": None})(
        embeddings, batch_labels, database, database_labels, database_valid=valid)
    assert np.isfinite(float(got)), step
    np.testing.assert_allclose(float(got), float(exact), rtol=1e-6)
    memory = cross_batch_memory.update(memory, embeddings, batch_labels)
  assert int(memory.count) == 40
