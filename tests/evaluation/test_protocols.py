"""Protocol table and the VehicleID re-identification protocol."""

import numpy as np
import pytest

from recall_jax.evaluation import protocol_for, vehicleid_reid_metrics


@pytest.mark.parametrize("name, k_values", [
    ("sop", (1, 10, 100, 1000)), ("inat2018", (1, 4, 16, 32)), ("cars196", (1, 2, 4, 8, 16)),
    ("cub200", (1, 2, 4, 8, 16)), ("omniglot", (1, 2, 4, 8)), ("vehicleid", (1, 5)),
])
def test_protocol_k_values(name, k_values):
  assert protocol_for(name)["k_values"] == k_values


def test_protocol_reid_only_for_vehicleid_and_unknown_gets_the_default():
  assert protocol_for("vehicleid")["reid_k_values"] == (1, 5)
  assert protocol_for("sop")["reid_k_values"] is None
  assert protocol_for("folder") == {"name": "folder", "k_values": (1, 2, 4, 8),
                                    "reid_k_values": None}


def test_reid_on_separable_identities_is_perfect():
  # Every identity's images are one unit vector (orthogonal to the others): any gallery draw
  # retrieves the right identity first.
  labels = np.repeat(np.arange(6), [1, 2, 3, 4, 2, 3])
  x = np.eye(8, dtype=np.float32)[labels]
  out = vehicleid_reid_metrics(x, labels, k_values=(1, 5), draws=3)
  assert out["recall@1"] == out["recall@5"] == out["map"] == 1.0
  assert out["num_queries"] == len(labels) - 6 and out["draws"] == 3


def test_reid_averages_draws_of_one_gallery_image_per_identity():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 12, 80)
  x = rng.standard_normal((80, 6)).astype(np.float32)
  out = vehicleid_reid_metrics(x, labels, k_values=(1, 5), draws=4, seed=3)
  assert out == vehicleid_reid_metrics(x, labels, k_values=(1, 5), draws=4, seed=3)
  assert out != vehicleid_reid_metrics(x, labels, k_values=(1, 5), draws=4, seed=4)
  # With one gallery image per identity, map is the mean reciprocal rank and r_precision = recall@1.
  assert out["r_precision"] == pytest.approx(out["recall@1"])
  assert out["num_queries"] == 80 - len(np.unique(labels))


def test_reid_draws_are_uniform_over_galleries():
  # 3 identities of sizes 2, 2, 3 allow 12 galleries; enumerate them all with a NumPy 1-NN.
  rng = np.random.default_rng(1)
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  x = rng.standard_normal((7, 3)).astype(np.float32)
  per_gallery = []
  for g0 in (0, 1):
    for g1 in (2, 3):
      for g2 in (4, 5, 6):
        gallery = np.array([g0, g1, g2])
        queries = np.setdiff1d(np.arange(7), gallery)
        nearest = gallery[np.argmax(x[queries].astype(np.float64) @ x[gallery].T, axis=1)]
        per_gallery.append(np.mean(labels[nearest] == labels[queries]))
  single = vehicleid_reid_metrics(x, labels, k_values=(1,), draws=1, seed=0)["recall@1"]
  assert min(abs(single - v) for v in per_gallery) < 1e-12
  many = vehicleid_reid_metrics(x, labels, k_values=(1,), draws=600, seed=0)["recall@1"]
  # Uniform draws: the mean over 600 draws is within ~4 standard errors of the exhaustive mean.
  assert abs(many - np.mean(per_gallery)) < 4 * np.std(per_gallery) / np.sqrt(600) + 1e-9


def test_reid_bad_input():
  with pytest.raises(ValueError, match="single image"):
    vehicleid_reid_metrics(np.eye(3, dtype=np.float32), np.arange(3), k_values=(1,))
  with pytest.raises(ValueError, match="draws"):
    vehicleid_reid_metrics(np.eye(3, dtype=np.float32), np.zeros(3, int), draws=0)
  with pytest.raises(ValueError, match="exceeds"):
    vehicleid_reid_metrics(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]), k_values=(5,))
