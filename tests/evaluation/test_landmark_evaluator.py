"""RevisitedEvaluator against revisited_metrics on the same descriptors (NumPy references)."""

import numpy as np
import pytest

from recall_jax.errors import DataError
from recall_jax.evaluation import landmark_evaluator
from recall_jax.evaluation import query_expansion
from recall_jax.evaluation import revisited
from recall_jax.evaluation import whitening as whitening_lib

DIM = 6
GND = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [], "junk": [0]},
       {"easy": [], "hard": [5, 6], "junk": []}]


def _vectors(seed, n):
  return np.random.default_rng(seed).integers(1, 256, (n, DIM)).astype(np.uint8)


def _batches(vectors, batch_size=3):
  """Batches whose 'image' is the vector itself (b, 1, 1, DIM), as extract_embeddings takes."""
  def make():
    for start in range(0, len(vectors), batch_size):
      rows = vectors[start:start + batch_size]
      pad = batch_size - len(rows)
      yield {"image": np.concatenate([rows, np.zeros((pad, DIM), np.uint8)])[:, None, None, :],
             "label": np.zeros(batch_size, np.int32),
             "mask": np.arange(batch_size) < len(rows),
             "index": np.where(np.arange(batch_size) < len(rows),
                               start + np.arange(batch_size), -1)}
  return make


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Embed:
  """params (a scale) -> embed_fn; counts the images it embedded."""

  def __init__(self):
    self.calls = 0

  def __call__(self, params):
    def embed(images):
      self.calls += 1
      return images.reshape(images.shape[0], -1).astype(np.float32) * params
    return embed


def _setup():
  queries, database = _vectors(0, 3), _vectors(1, 8)
  sets = {"roxford5k": landmark_evaluator.RevisitedSet(_batches(queries), _batches(database), GND)}
  return queries, database, sets


def test_metrics_equal_revisited_metrics_of_the_descriptors_and_the_table_is_logged():
  queries, database, sets = _setup()
  logged = []
  evaluator = landmark_evaluator.RevisitedEvaluator(_Embed(), sets, protocols=("medium", "hard"),
                                                    log_fn=logged.append, progress=False)
  result = evaluator(1.0, step=7)
  expected = revisited.revisited_metrics(_unit(queries), _unit(database), GND)
  assert set(result.metrics) == {f"roxford5k/{k}" for k in expected if not k.startswith("easy")}
  for key, value in result.metrics.items():
    assert value == pytest.approx(expected[key.split("/", 1)[1]], abs=1e-6)
  assert "step 7" in logged[0] and "Easy" in logged[0] and "roxford5k" in logged[0]
  np.testing.assert_allclose(result.embeddings["roxford5k"].query_embeddings, _unit(queries),
                             atol=1e-6)


def test_whitening_and_query_expansion_are_applied():
  queries, database, sets = _setup()
  rng = np.random.default_rng(3)
  whitening = whitening_lib.Whitening(rng.normal(size=DIM), rng.normal(size=(DIM, DIM)),
                                      "learned")
  evaluator = landmark_evaluator.RevisitedEvaluator(
      _Embed(), sets, whitening=whitening, qe_k=2, qe_alpha=1.0, dba_k=1, dba_alpha=2.0,
      log_fn=None, progress=False)
  white = lambda x: np.asarray(whitening_lib.apply_whitening(_unit(x), whitening))
  q, db = query_expansion.expand_descriptors(white(queries), white(database), qe_k=2,
                                             qe_alpha=1.0, dba_k=1, dba_alpha=2.0)
  expected = revisited.revisited_metrics(np.asarray(q), np.asarray(db), GND)
  result = evaluator(1.0, step=0).metrics
  for key, value in expected.items():
    assert result[f"roxford5k/{key}"] == pytest.approx(value, abs=1e-5)


def test_distractors_are_appended_and_cached_per_parameters(tmp_path):
  queries, database, sets = _setup()
  distractors = _vectors(2, 5)
  cache = tmp_path / "r1m.npy"
  embed = _Embed()
  evaluator = landmark_evaluator.RevisitedEvaluator(
      embed, sets, distractors=landmark_evaluator.DistractorSet(
          "revisitop1m", _batches(distractors), len(distractors), cache, "tiny"),
      log_fn=None, progress=False)
  result = evaluator(1.0, step=0).metrics
  expected = revisited.revisited_metrics(_unit(queries),
                                         np.concatenate([_unit(database), _unit(distractors)]),
                                         GND)
  for key, value in expected.items():
    assert result[f"roxford5k+revisitop1m/{key}"] == pytest.approx(value, abs=1e-6)
  np.testing.assert_allclose(np.load(cache), _unit(distractors), atol=1e-6)
  calls = embed.calls
  evaluator(1.0, step=1)  # same parameters: the distractors come from the cache
  assert embed.calls - calls == 4  # 3 database + 1 query batches
  calls = embed.calls
  evaluator(2.0, step=2)  # new parameters: embedded again
  assert embed.calls - calls == 6


@pytest.mark.parametrize("damage", ["float64", "rank", "not npy"])
def test_a_damaged_distractor_cache_is_refused_before_any_work(tmp_path, damage):
  _, _, sets = _setup()
  distractors = _vectors(2, 5)
  cache = tmp_path / "r1m.npy"
  if damage == "not npy":
    cache.write_bytes(b"\x00" * 64)
  else:
    np.save(cache, _unit(distractors).astype(np.float64) if damage == "float64"
            else _unit(distractors).astype(np.float32).ravel())
  embed = _Embed()
  with pytest.raises(DataError, match="distractor cache .*(unreadable|not 2-D float32)"):
    landmark_evaluator.RevisitedEvaluator(
        embed, sets, distractors=landmark_evaluator.DistractorSet(
            "revisitop1m", _batches(distractors), len(distractors), cache, "tiny"),
        log_fn=None, progress=False)
  assert embed.calls == 0


def test_bad_arguments():
  _, _, sets = _setup()
  with pytest.raises(ValueError, match="at least one"):
    landmark_evaluator.RevisitedEvaluator(_Embed(), {})
  with pytest.raises(ValueError, match="protocols"):
    landmark_evaluator.RevisitedEvaluator(_Embed(), sets, protocols=("extreme",))


def test_params_digest_changes_with_any_value():
  params = {"a": np.zeros(3, np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
  changed = {"a": np.zeros(3, np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
  changed["b"]["c"][1, 1] = 2.0
  digest = landmark_evaluator.params_digest(params)
  assert digest == landmark_evaluator.params_digest(params)
  assert digest != landmark_evaluator.params_digest(changed)
