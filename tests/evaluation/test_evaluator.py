"""Evaluator: embeds each set with the factory's embed_fn, reports the protocol's metrics and
returns the embeddings it scored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.evaluation import Evaluator, QueryGallery, extract_embeddings, retrieval_metrics
from recall_jax.evaluation import vehicleid_reid_metrics


def make_split(num, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 6, num).astype(np.int32)

  def batches():
    for start in range(0, num, 8):
      size = min(8, num - start)
      yield {"image": np.pad(images[start:start + 8], ((0, 8 - size), (0, 0), (0, 0), (0, 0))),
             "label": np.pad(labels[start:start + 8], (0, 8 - size)),
             "mask": np.arange(8) < size, "index": np.arange(start, start + 8)}
  return batches


def factory(params):
  return jax.jit(lambda images: images.reshape(images.shape[0], -1).astype(jnp.float32) @ params)


def test_metrics_per_split_match_direct_computation():
  params = jnp.asarray(np.random.default_rng(0).standard_normal((16, 5)), jnp.float32)
  splits = {"test": make_split(30, 1), "val": make_split(20, 2)}
  lines = []
  evaluator = Evaluator(factory, splits, "omniglot", log_fn=lines.append, progress=False)
  result = evaluator(params, step=7)
  out = result.metrics
  for split, make in splits.items():
    emb, labels, _ = extract_embeddings(factory(params), make(), progress=False)
    expected = retrieval_metrics(emb, labels, k_values=(1, 2, 4, 8))
    assert {f"{split}/{k}": v for k, v in expected.items()}.items() <= out.items()
    np.testing.assert_array_equal(result.embeddings[split].embeddings, emb)
    np.testing.assert_array_equal(result.embeddings[split].labels, labels)
    assert result.embeddings[split].query_embeddings is None
  assert "test/recall@8" in out and "val/map@r" in out
  assert len(lines) == 1 and lines[0].startswith("[eval] step 7:") and "test/recall@1=" in lines[0]


def test_embed_fn_directly_and_reid_keys():
  params = jnp.asarray(np.random.default_rng(3).standard_normal((16, 5)), jnp.float32)
  split = make_split(40, 4)
  evaluator = Evaluator(None, {"small": split}, "vehicleid", reid_protocol=True, log_fn=None,
                        progress=False)
  out = evaluator(factory(params), step=0).metrics
  emb, labels, _ = extract_embeddings(factory(params), split(), progress=False)
  assert out["small/reid_recall@1"] == vehicleid_reid_metrics(emb, labels)["recall@1"]
  assert set(k for k in out if not k.startswith("small/reid_")) == {
      "small/recall@1", "small/recall@5", "small/precision@1", "small/r_precision", "small/map@r",
      "small/map", "small/num_queries", "small/num_queries_without_positives"}


def test_query_gallery_set_and_dataset_without_protocol():
  params = jnp.asarray(np.random.default_rng(5).standard_normal((16, 5)), jnp.float32)
  queries, gallery = make_split(12, 6), make_split(30, 7)
  evaluator = Evaluator(factory, {"query": QueryGallery(queries=queries, gallery=gallery)},
                        "folder", log_fn=None, progress=False)
  assert evaluator.k_values == (1, 2, 4, 8)
  result = evaluator(params, step=0)
  q_emb, q_labels, _ = extract_embeddings(factory(params), queries(), progress=False)
  g_emb, g_labels, _ = extract_embeddings(factory(params), gallery(), progress=False)
  expected = retrieval_metrics(g_emb, g_labels, query_embeddings=q_emb, query_labels=q_labels,
                               k_values=(1, 2, 4, 8))
  assert result.metrics == {f"query/{k}": v for k, v in expected.items()}
  embedded = result.embeddings["query"]
  np.testing.assert_array_equal(embedded.embeddings, g_emb)
  np.testing.assert_array_equal(embedded.query_embeddings, q_emb)
  np.testing.assert_array_equal(embedded.query_labels, q_labels)


def test_bad_configuration():
  with pytest.raises(ValueError, match="re-identification"):
    Evaluator(None, {"test": make_split(8, 0)}, "sop", reid_protocol=True)
  with pytest.raises(ValueError, match="at least one split"):
    Evaluator(None, {}, "sop")
