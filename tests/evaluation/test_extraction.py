"""extract_embeddings on a padded split, against a NumPy reference of the same linear embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.evaluation import extract_embeddings

WEIGHTS = np.random.default_rng(0).standard_normal((4 * 4 * 3, 8)).astype(np.float32)


def linear_embed(images):
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  return flat @ jnp.asarray(WEIGHTS)


def make_batches(num, batch_size, seed=1):
  """Batches like the eval loader's: the last one padded to `batch_size` with mask False."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, num).astype(np.int32)
  batches = []
  for start in range(0, num, batch_size):
    size = min(batch_size, num - start)
    pad = batch_size - size
    batches.append({
        "image": np.concatenate([images[start:start + size],
                                 np.full((pad, 4, 4, 3), 7, np.uint8)]),
        "label": np.concatenate([labels[start:start + size], np.full(pad, -1, np.int32)]),
        "mask": np.arange(batch_size) < size,
        "index": np.arange(start, start + batch_size, dtype=np.int64) + 1000,
    })
  return batches, images, labels


def test_padded_last_batch_matches_reference():
  batches, images, labels = make_batches(21, 8)
  emb, out_labels, indices = extract_embeddings(jax.jit(linear_embed), batches,
                                                num_examples=21, progress=False)
  expected = (images.reshape(21, -1).astype(np.float64) / 255.0) @ WEIGHTS.astype(np.float64)
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  assert emb.dtype == np.float32 and out_labels.dtype == np.int64 and indices.dtype == np.int64
  assert emb.shape == (21, 8)
  np.testing.assert_allclose(emb, expected, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(out_labels, labels)
  np.testing.assert_array_equal(indices, np.arange(21) + 1000)


def test_mask_and_index_are_optional():
  batches, images, _ = make_batches(8, 8)
  del batches[0]["mask"], batches[0]["index"]
  emb, _, indices = extract_embeddings(linear_embed, batches, progress=False)
  assert emb.shape == (8, 8)
  np.testing.assert_array_equal(indices, np.full(8, -1))


def test_non_finite_embeddings_raise():
  batches, _, _ = make_batches(8, 4)
  with pytest.raises(ValueError, match="NaN or infinite embeddings in batch 0"):
    extract_embeddings(lambda x: jnp.full((x.shape[0], 3), jnp.nan), batches, progress=False)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.update(image=b["image"].astype(np.float32)), "uint8"),
    (lambda b: b.update(label=b["label"][:3]), "'label' must have shape"),
    (lambda b: b.update(mask=b["mask"][:3]), "'mask' must have shape"),
    (lambda b: b.pop("image"), "no 'image'"),
])
def test_bad_batches(mutate, message):
  batches, _, _ = make_batches(8, 4)
  mutate(batches[1])
  with pytest.raises(ValueError, match=message):
    extract_embeddings(linear_embed, batches, progress=False)


def test_bad_embed_fn_output_and_empty_split():
  batches, _, _ = make_batches(8, 4)
  with pytest.raises(ValueError, match="\\(b, D\\)"):
    extract_embeddings(lambda x: jnp.zeros((x.shape[0],)), batches, progress=False)
  with pytest.raises(ValueError, match="no examples"):
    extract_embeddings(linear_embed, [], progress=False)
