"""revisited_metrics against a brute-force NumPy ranking (full argsort) and the published values."""

import math

import numpy as np
import pytest

from recall_jax.evaluation import format_revisited_table, revisited_metrics, scores_from_ranks

KAPPAS = (1, 5, 10)
PROTOCOL_ROLES = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                  "hard": (("hard",), ("junk", "easy"))}


def reference_metrics(queries, database, gnd, kappas=KAPPAS):
  """Float64 cosine ranking by full sort (lower index first on ties), the protocol by loops."""
  q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
  d = database.astype(np.float64) / np.linalg.norm(database.astype(np.float64), axis=1,
                                                   keepdims=True)
  sims = q @ d.T
  num_items = database.shape[0]
  scores = {p: [] for p in PROTOCOL_ROLES}
  for i, entry in enumerate(gnd):
    ranking = np.lexsort((np.arange(num_items), -sims[i]))
    for protocol, (ok_keys, junk_keys) in PROTOCOL_ROLES.items():
      ok = np.concatenate([np.asarray(entry[k], np.int64) for k in ok_keys])
      junk = np.concatenate([np.asarray(entry[k], np.int64) for k in junk_keys])
      if ok.size == 0:
        continue
      kept = ranking[~np.isin(ranking, junk)]  # the ranking with the ignored items removed
      positions = np.flatnonzero(np.isin(kept, ok))
      ap = 0.0
      for j, rank in enumerate(positions):
        left = 1.0 if rank == 0 else j / rank
        ap += (left + (j + 1) / (rank + 1)) / 2 / ok.size
      values = {"map": ap}
      one_based = positions + 1
      for k in kappas:
        cut = min(one_based.max(), k)
        values[f"mp@{k}"] = np.count_nonzero(one_based <= cut) / cut
      scores[protocol].append(values)
  out = {}
  for protocol, per_query in scores.items():
    for key in ["map"] + [f"mp@{k}" for k in kappas]:
      out[f"{protocol}/{key}"] = (float(np.mean([v[key] for v in per_query])) if per_query
                                  else math.nan)
  return out


def assert_metrics_equal(actual, expected, atol=1e-12):
  assert set(actual) == set(expected)
  for key, value in expected.items():
    if math.isnan(value):
      assert math.isnan(actual[key]), key
    else:
      assert actual[key] == pytest.approx(value, abs=atol), key


def random_gnd(rng, num_queries, num_items, sizes=(4, 6, 5)):
  gnd = []
  for _ in range(num_queries):
    chosen = rng.choice(num_items, sum(sizes), replace=False)
    easy, hard, junk = np.split(chosen, np.cumsum(sizes)[:-1])
    gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist(),
                "bbx": [0.0, 0.0, 10.0, 10.0]})
  return gnd


def ranked_database(num_items, seed=0):
  """A 2-D database whose cosine ranking for the query (1, 0) is a known permutation.

  Returns (query, database, index_at_rank): the item at 0-based rank r is index_at_rank[r].
  """
  index_at_rank = np.random.default_rng(seed).permutation(num_items)
  angles = 0.05 * np.arange(num_items)
  database = np.zeros((num_items, 2), np.float32)
  database[index_at_rank, 0] = np.cos(angles)
  database[index_at_rank, 1] = np.sin(angles)
  return np.array([[1.0, 0.0]], np.float32), database, index_at_rank


def test_published_unit_values():
  scores = scores_from_ranks([5, 0, 2], [], kappas=KAPPAS)
  assert scores["ap"] == pytest.approx(0.677778, abs=1e-6)
  assert (scores["mp@1"], scores["mp@5"], scores["mp@10"]) == pytest.approx((1.0, 0.4, 0.5))


def test_ignored_items_move_positives_up():
  with_ignored = scores_from_ranks([0, 2, 6, 10, 20], [1, 8, 9, 30], kappas=KAPPAS)
  assert with_ignored == pytest.approx(scores_from_ranks([0, 1, 5, 7, 17], [], kappas=KAPPAS))


def test_unit_values_through_the_ranking():
  query, database, at_rank = ranked_database(40)
  gnd = [{"easy": at_rank[[0, 2, 5]], "hard": [], "junk": []}]
  metrics = revisited_metrics(query, database, gnd, block=7)
  assert metrics["easy/map"] == pytest.approx(0.677778, abs=1e-6)
  assert metrics["medium/map"] == pytest.approx(0.677778, abs=1e-6)
  assert (metrics["easy/mp@1"], metrics["easy/mp@5"], metrics["easy/mp@10"]) == pytest.approx(
      (1.0, 0.4, 0.5))
  assert all(math.isnan(metrics[f"hard/{k}"]) for k in ("map", "mp@1", "mp@5", "mp@10"))


def test_junk_and_other_protocol_lists_are_removed_from_the_ranking():
  query, database, at_rank = ranked_database(40, seed=1)
  gnd = [{"easy": at_rank[[0, 2, 6]], "hard": at_rank[[10, 20]], "junk": at_rank[[1, 8, 9, 30]]}]
  metrics = revisited_metrics(query, database, gnd, block=16)
  medium = scores_from_ranks([0, 1, 5, 7, 17], [], kappas=KAPPAS)  # junk at 1, 8, 9, 30 removed
  easy = scores_from_ranks([0, 1, 5], [], kappas=KAPPAS)  # junk and hard (10, 20) removed
  hard = scores_from_ranks([10 - 6, 20 - 6], [], kappas=KAPPAS)  # junk and easy removed
  for protocol, expected in (("medium", medium), ("easy", easy), ("hard", hard)):
    assert metrics[f"{protocol}/map"] == pytest.approx(expected["ap"], abs=1e-12)
    for k in KAPPAS:
      assert metrics[f"{protocol}/mp@{k}"] == pytest.approx(expected[f"mp@{k}"], abs=1e-12)


@pytest.mark.parametrize("block", [7, 64, None])
def test_matches_brute_force(block):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(11, 16)).astype(np.float32)
  database = rng.normal(size=(300, 16)).astype(np.float32)
  gnd = random_gnd(rng, 11, 300)
  assert_metrics_equal(revisited_metrics(queries, database, gnd, block=block),
                       reference_metrics(queries, database, gnd))


def test_ties_rank_the_lower_index_first():
  # Four entries of +-1 per row: cosines are exact multiples of 1/4 in float32 and float64, so most
  # similarities tie, and duplicated rows tie exactly.
  rng = np.random.default_rng(3)
  def rows(n):
    x = np.zeros((n, 8), np.float32)
    for r in range(n):
      x[r, rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x
  database = rows(120)
  database[100:] = database[:20]
  queries = rows(9)
  gnd = random_gnd(rng, 9, 120, sizes=(6, 5, 4))
  expected = reference_metrics(queries, database, gnd)
  assert_metrics_equal(revisited_metrics(queries, database, gnd, block=13), expected)
  # The tie rule matters: the reverse rule (higher index first) gives other values here.
  flipped = [{k: (119 - np.asarray(v) if k != "bbx" else v) for k, v in g.items()} for g in gnd]
  reversed_metrics = revisited_metrics(queries, database[::-1].copy(), flipped, block=13)
  assert any(abs(reversed_metrics[k] - expected[k]) > 1e-9 for k in expected)


def test_cosine_similarity_ignores_row_norms():
  rng = np.random.default_rng(4)
  queries = rng.normal(size=(5, 12)).astype(np.float32)
  database = rng.normal(size=(150, 12)).astype(np.float32)
  scaled = database * rng.uniform(0.1, 10.0, size=(150, 1)).astype(np.float32)
  gnd = random_gnd(rng, 5, 150)
  assert_metrics_equal(revisited_metrics(queries * 3, scaled, gnd, block=32),
                       reference_metrics(queries, database, gnd))


def test_queries_without_positives_are_left_out():
  rng = np.random.default_rng(5)
  queries = rng.normal(size=(4, 8)).astype(np.float32)
  database = rng.normal(size=(80, 8)).astype(np.float32)
  gnd = random_gnd(rng, 4, 80)
  gnd[0]["hard"] = []  # positives only under Easy and Medium; its easy items are ignored by Hard
  gnd[1]["easy"] = []  # left out of Easy
  gnd[2] = {"easy": [], "hard": [], "junk": [1, 2, 3]}  # left out of every protocol
  metrics = revisited_metrics(queries, database, gnd, block=32)
  assert_metrics_equal(metrics, reference_metrics(queries, database, gnd))
  # Each protocol's means run over its own queries only, not counting the others as zeros.
  for protocol, kept in (("easy", [0, 3]), ("medium", [0, 1, 3]), ("hard", [1, 3])):
    subset = revisited_metrics(queries[kept], database, [gnd[i] for i in kept], block=32)
    for key in ("map", "mp@1", "mp@5", "mp@10"):
      assert metrics[f"{protocol}/{key}"] == pytest.approx(subset[f"{protocol}/{key}"], abs=1e-12)


def test_empty_protocols_are_nan():
  rng = np.random.default_rng(6)
  queries = rng.normal(size=(3, 8)).astype(np.float32)
  database = rng.normal(size=(50, 8)).astype(np.float32)
  gnd = [{"easy": [i, i + 10], "hard": [], "junk": [i + 20]} for i in range(3)]
  metrics = revisited_metrics(queries, database, gnd)
  assert math.isnan(metrics["hard/map"]) and math.isnan(metrics["hard/mp@10"])
  assert_metrics_equal(metrics, reference_metrics(queries, database, gnd))
  nothing = revisited_metrics(queries, database, [{"easy": [], "hard": [], "junk": []}] * 3)
  assert set(nothing) == set(metrics) and all(math.isnan(v) for v in nothing.values())


def test_memory_mapped_database(tmp_path):
  rng = np.random.default_rng(7)
  queries = rng.normal(size=(6, 16)).astype(np.float32)
  database = rng.normal(size=(257, 16)).astype(np.float32)
  gnd = random_gnd(rng, 6, 257)
  path = tmp_path / "database.npy"
  np.save(path, database)
  expected = reference_metrics(queries, database, gnd)
  assert_metrics_equal(revisited_metrics(queries, np.load(path, mmap_mode="r"), gnd, block=50),
                       expected)
  assert_metrics_equal(revisited_metrics(queries, path, gnd, block=50), expected)
  # The benchmark's images then the distractors, as separate parts (blocks straddle them).
  np.save(tmp_path / "distractors.npy", database[70:])
  assert_metrics_equal(revisited_metrics(queries, [database[:70], tmp_path / "distractors.npy"],
                                         gnd, block=50), expected)
  raw = np.memmap(tmp_path / "database.f32", np.float32, "w+", shape=database.shape)
  raw[:] = database
  raw.flush()
  reopened = np.memmap(tmp_path / "database.f32", np.float32, "r", shape=database.shape)
  assert_metrics_equal(revisited_metrics(queries, reopened, gnd, block=50), expected)


def test_custom_kappas():
  query, database, at_rank = ranked_database(30, seed=2)
  gnd = [{"easy": at_rank[[1, 3]], "hard": [], "junk": []}]
  metrics = revisited_metrics(query, database, gnd, kappas=(2, 3))
  assert set(metrics) == {f"{p}/{k}" for p in ("easy", "medium", "hard")
                          for k in ("map", "mp@2", "mp@3")}
  assert metrics["easy/mp@2"] == pytest.approx(0.5)
  assert metrics["easy/mp@3"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("change, match", [
    (lambda q, d, g: (q, d, g[:-1]), "entries"),
    (lambda q, d, g: (q, d, [{**g[0], "easy": [999]}] + g[1:]), "outside"),
    (lambda q, d, g: (q, d, [{**g[0], "junk": g[0]["easy"][:1]}] + g[1:]), "twice"),
    (lambda q, d, g: (q, d, [{"easy": [1], "hard": []}] + g[1:]), "junk"),
    (lambda q, d, g: (q, d, [{**g[0], "easy": [0.5]}] + g[1:]), "integer"),
    (lambda q, d, g: (q[:, :4], d, g), "dimension"),
    (lambda q, d, g: (q, np.where(np.arange(40)[:, None] == 39, np.nan, d), g), "NaN"),
    (lambda q, d, g: (q, d.astype(np.int32), g), "floating"),
    (lambda q, d, g: (q, [d, d[:, :4]], g), "different dimensions"),
])
def test_bad_input(change, match):
  rng = np.random.default_rng(8)
  queries = rng.normal(size=(2, 8)).astype(np.float32)
  database = rng.normal(size=(40, 8)).astype(np.float32)
  gnd = random_gnd(rng, 2, 40, sizes=(2, 2, 2))
  with pytest.raises(ValueError, match=match):
    revisited_metrics(*change(queries, database, gnd), block=16)


def test_bad_kappas():
  with pytest.raises(ValueError, match="kappas"):
    revisited_metrics(np.ones((1, 2)), np.ones((3, 2)), [{"easy": [0], "hard": [], "junk": []}],
                      kappas=(0,))
  with pytest.raises(ValueError, match="positive"):
    scores_from_ranks([], [1])
  with pytest.raises(ValueError, match="twice"):
    scores_from_ranks([1, 2], [2])


def test_table_has_one_row_per_setting():
  metrics = {f"{p}/{k}": 0.5 for p in ("easy", "medium", "hard") for k in ("map", "mp@1", "mp@10")}
  table = format_revisited_table(
      {**{f"roxford5k/{k}": v for k, v in metrics.items()},
       **{f"roxford5k+revisitop1m/{k}": 0.25 for k in metrics}, "num_steps": 3})
  lines = table.splitlines()
  assert len(lines) == 4
  assert [w for w in lines[0].split()] == ["Easy", "Medium", "Hard"]
  assert lines[1].split() == ["setting"] + ["mAP", "mP@1", "mP@10"] * 3
  assert lines[2].split() == ["roxford5k"] + ["50.00"] * 9
  assert lines[3].split() == ["roxford5k+revisitop1m"] + ["25.00"] * 9
  with pytest.raises(ValueError, match="protocol"):
    format_revisited_table({"recall@1": 0.5})


MULTI_DEVICE_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
import numpy as np
from recall_jax.evaluation import revisited_metrics
assert jax.device_count() == 4, jax.devices()
data = np.load(sys.argv[1], allow_pickle=False)
gnd = [{"easy": data[f"easy{i}"], "hard": data[f"hard{i}"], "junk": data[f"junk{i}"]}
       for i in range(len(data["queries"]))]
print(json.dumps(revisited_metrics(data["queries"], data["database"], gnd, block=40)))
"""


def test_queries_split_over_four_devices(tmp_path):
  import json
  import os
  import subprocess
  import sys

  rng = np.random.default_rng(9)
  queries = rng.normal(size=(13, 8)).astype(np.float32)
  database = rng.normal(size=(150, 8)).astype(np.float32)
  database[100:110] = database[:10]  # exact ties, so both search paths run on the mesh
  gnd = random_gnd(rng, 13, 150)
  arrays = {"queries": queries, "database": database}
  for i, entry in enumerate(gnd):
    arrays.update({f"{k}{i}": np.asarray(entry[k], np.int64) for k in ("easy", "hard", "junk")})
  np.savez(tmp_path / "data.npz", **arrays)
  result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(tmp_path / "data.npz")],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  assert_metrics_equal(json.loads(result.stdout.strip().splitlines()[-1]),
                       reference_metrics(queries, database, gnd))
