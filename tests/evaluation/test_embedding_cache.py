"""cached_embeddings: computed once in chunks, reused while the fingerprint matches."""

import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.errors import DataError
from recall_jax.evaluation import embedding_cache, extract_embeddings


def make_batches(num, batch=4, shuffle=False):
  images = np.random.default_rng(0).integers(0, 256, (num, 6, 6, 3), np.uint8)
  order = np.random.default_rng(1).permutation(num) if shuffle else np.arange(num)

  def batches():
    for s in range(0, num, batch):
      ids = order[s:s + batch]
      padded = np.zeros((batch, 6, 6, 3), np.uint8)
      padded[:ids.size] = images[ids]
      mask = np.arange(batch) < ids.size
      index = np.full(batch, -1)
      index[:ids.size] = ids
      yield {"image": padded, "label": np.zeros(batch, np.int32), "mask": mask, "index": index}
  return batches


class CountingEmbed:
  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    x = images.astype(jnp.float32)
    return jnp.stack([x.mean(axis=(1, 2, 3)), x[:, 0, 0, 0] + 1, x[:, -1, -1, -1]], axis=1)


def test_computed_once_and_reused(tmp_path):
  path = tmp_path / "cache" / "revisitop1m.npy"
  embed = CountingEmbed()
  first = embedding_cache.cached_embeddings(path, embed, make_batches(11, shuffle=True),
                                            num_examples=11, fingerprint="a", batches_per_chunk=2,
                                            progress=False)
  expected, _, _ = extract_embeddings(CountingEmbed(), make_batches(11)(), progress=False)
  np.testing.assert_allclose(first, expected, rtol=1e-6)
  assert isinstance(first, np.memmap) and not first.flags.writeable
  calls = embed.calls
  again = embedding_cache.cached_embeddings(path, embed, make_batches(11), num_examples=11,
                                            fingerprint="a", progress=False)
  assert embed.calls == calls
  np.testing.assert_array_equal(again, first)
  embedding_cache.cached_embeddings(path, embed, make_batches(11), num_examples=11,
                                    fingerprint="b", progress=False)
  assert embed.calls > calls


def test_incomplete_batches_are_an_error_and_leave_no_cache(tmp_path):
  path = tmp_path / "distractors.npy"
  with pytest.raises(DataError, match="covered 8 of 12"):
    embedding_cache.cached_embeddings(path, CountingEmbed(), make_batches(8), num_examples=12,
                                      fingerprint="a", progress=False)
  assert not path.exists()


def test_an_altered_cache_is_not_used(tmp_path):
  path = tmp_path / "revisitop1m.npy"
  compute = lambda embed, said: embedding_cache.cached_embeddings(
      path, embed, make_batches(9), num_examples=9, fingerprint="a", progress=False,
      log_fn=said.append)
  first = np.array(compute(CountingEmbed(), []))
  # Same shape and header, one value changed: only the checksum can tell.
  values = np.load(path)
  values[4, 1] += 0.5
  np.save(path, values)
  embed, said = CountingEmbed(), []
  again = compute(embed, said)
  assert embed.calls > 0
  np.testing.assert_array_equal(again, first)
  assert len(said) == 1 and "do not match the checksum" in said[0]
  embed, said = CountingEmbed(), []
  compute(embed, said)  # the recomputed cache verifies: reused, nothing said
  assert embed.calls == 0 and said == []
