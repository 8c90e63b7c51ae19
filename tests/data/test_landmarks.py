"""Landmark datasets read from tiny fixtures written in each official layout."""

import io
import pickle

import numpy as np
import PIL.Image
import pytest
import scipy.io

from recall_jax.data import landmarks, parsing, safe_pickle
from recall_jax.errors import ConfigError, DataError, MissingFileError

DATABASE = ["all_souls_000001", "ashmolean_000007", "balliol_000012", "bodleian_000030",
            "christ_church_000179"]
QUERIES = ["all_souls_000013", "radcliffe_camera_000519"]
GND = [
    {"easy": [0, 3], "hard": [1], "junk": [4], "bbx": [3.4, 2.6, 21.5, 17.49]},
    {"easy": [], "hard": [2], "junk": [0, 1], "bbx": [0.0, 0.0, 32.0, 24.0]},
]


def write_jpeg(path, seed, size=(32, 24)):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  PIL.Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def write_revisited(root, name="roxford5k", gnd=GND, fmt="pkl"):
  folder = root / name
  for n, image in enumerate(DATABASE + QUERIES):
    write_jpeg(folder / "jpg" / f"{image}.jpg", n)
  if fmt == "pkl":
    (folder / f"gnd_{name}.pkl").write_bytes(
        pickle.dumps({"imlist": DATABASE, "qimlist": QUERIES, "gnd": gnd}))
  else:  # the .mat layout: cell arrays of names, a struct array with 1-based indices
    struct = np.zeros((1, len(gnd)), dtype=[(k, object) for k in ("easy", "hard", "junk", "bbx")])
    for q, entry in enumerate(gnd):
      for key in ("easy", "hard", "junk"):
        struct[0, q][key] = np.asarray(entry[key], np.float64).reshape(1, -1) + 1
      struct[0, q]["bbx"] = np.asarray(entry["bbx"], np.float64).reshape(1, 4)
    scipy.io.savemat(folder / f"gnd_{name}.mat", {
        "imlist": np.array(DATABASE, dtype=object).reshape(-1, 1),
        "qimlist": np.array(QUERIES, dtype=object).reshape(1, -1), "gnd": struct})
  return folder


@pytest.mark.parametrize("fmt", ["pkl", "mat"])
def test_revisited_ground_truth_and_files(tmp_path, fmt):
  write_revisited(tmp_path, fmt=fmt)
  dataset = landmarks.load_revisited("roxford5k", data_root=tmp_path, expected_sizes=(5, 2))
  assert [f.name for f in dataset.database_files] == [f"{n}.jpg" for n in DATABASE]
  assert [f.name for f in dataset.query_files] == [f"{n}.jpg" for n in QUERIES]
  assert set(dataset.query_files).isdisjoint(dataset.database_files)
  for actual, expected in zip(dataset.gnd, GND):
    for key in ("easy", "hard", "junk"):
      assert actual[key].dtype == np.int64
      np.testing.assert_array_equal(actual[key], expected[key])
    np.testing.assert_allclose(actual["bbx"], expected["bbx"])
  np.testing.assert_allclose(dataset.query_boxes, [g["bbx"] for g in GND])


def test_official_sizes_are_checked(tmp_path):
  write_revisited(tmp_path)
  with pytest.raises(DataError, match=r"\(5, 2\).*\(4993, 70\)"):
    landmarks.load_revisited("roxford5k", data_root=tmp_path)
  write_revisited(tmp_path, name="rparis6k")
  with pytest.raises(DataError, match=r"\(6322, 70\)"):
    landmarks.load_revisited("rparis6k", data_root=tmp_path)
  assert len(landmarks.load_revisited("rparis6k", data_root=tmp_path,
                                      expected_sizes=False).gnd) == 2


def test_queries_are_cropped_at_full_resolution_and_database_kept_whole(tmp_path):
  folder = write_revisited(tmp_path)
  dataset = landmarks.load_revisited("roxford5k", path=folder, expected_sizes=None)
  queries = landmarks.RevisitedSource(dataset, "queries")
  database = landmarks.RevisitedSource(dataset, "database")
  assert len(queries) == 2 and len(database) == 5
  record = queries[0]
  assert record["label"] == 0 and record["id"] == QUERIES[0]
  crop = np.asarray(PIL.Image.open(io.BytesIO(record["image"])))
  original = np.asarray(PIL.Image.open(folder / "jpg" / f"{QUERIES[0]}.jpg").convert("RGB"))
  # (3.4, 2.6, 21.5, 17.49) rounds as PIL.Image.crop rounds: columns 3..22, rows 3..17.
  np.testing.assert_array_equal(crop, original[3:17, 3:22])
  whole_box = np.asarray(PIL.Image.open(io.BytesIO(queries[1]["image"])))
  np.testing.assert_array_equal(whole_box, np.asarray(
      PIL.Image.open(folder / "jpg" / f"{QUERIES[1]}.jpg").convert("RGB")))
  assert database[3]["image"] == (folder / "jpg" / f"{DATABASE[3]}.jpg").read_bytes()
  np.testing.assert_array_equal(database.labels, np.arange(5))
  with pytest.raises(IndexError):
    database[5]


def test_boxes_reaching_past_the_image_are_cropped_as_pil_crops_and_counted(tmp_path):
  # The reference code crops queries with PIL: what lies outside the image is black.
  boxes = [[-6.0, 4.0, 20.0, 30.0], [10.0, 2.0, 40.0, 12.0]]  # both reach past the 32 x 24 image
  folder = write_revisited(tmp_path, gnd=[{**GND[0], "bbx": boxes[0]}, {**GND[1], "bbx": boxes[1]}])
  with pytest.warns(UserWarning, match="2 of 2 query boxes reach past their image"):
    dataset = landmarks.load_revisited("roxford5k", path=folder, expected_sizes=None)
  queries = landmarks.RevisitedSource(dataset, "queries")
  for index, box in enumerate(boxes):
    crop = np.asarray(PIL.Image.open(io.BytesIO(queries[index]["image"])))
    with PIL.Image.open(folder / "jpg" / f"{QUERIES[index]}.jpg") as image:
      reference = np.asarray(image.convert("RGB").crop(tuple(box)))
    np.testing.assert_array_equal(crop, reference)
  assert crop.shape == (10, 30, 3) and not crop[:, 22:].any()  # columns 32..39 are black


@pytest.mark.parametrize("bbx, match", [
    ([40.0, 2.0, 60.0, 20.0], "lies outside its 32x24 image"),
    ([3.0, 3.0, 8.0, 8.0], "too small: 5 x 5 pixels"),
    (["3", "2", "21", "17"], "must be 4 numbers"),
    ("3 2 21 17", "must be 4 numbers"),
    ([3.0, 2.0, 21.0], "must be 4 numbers"),
])
def test_bad_query_boxes_are_refused_in_one_line_when_the_benchmark_opens(tmp_path, bbx, match):
  write_revisited(tmp_path, gnd=[{**GND[0], "bbx": bbx}, GND[1]])
  with pytest.raises(DataError, match=match) as raised:
    landmarks.load_revisited("roxford5k", data_root=tmp_path, expected_sizes=None)
  assert "\n" not in str(raised.value)


def test_a_malicious_ground_truth_pickle_is_refused(tmp_path):
  folder = write_revisited(tmp_path)
  marker = tmp_path / "executed"

  class RunsShell:
    def __reduce__(self):
      import os
      return (os.system, (f"touch {marker}",))

  (folder / "gnd_roxford5k.pkl").write_bytes(
      pickle.dumps({"imlist": DATABASE, "qimlist": QUERIES, "gnd": [RunsShell()]}))
  with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
    landmarks.load_revisited("roxford5k", data_root=tmp_path, expected_sizes=None)
  assert not marker.exists()


@pytest.mark.parametrize("gnd, match", [
    ([{**GND[0], "easy": [5]}, GND[1]], "outside"),
    ([{k: v for k, v in GND[0].items() if k != "junk"}, GND[1]], "junk"),
    ([GND[0]], "one entry per query"),
    ([{**GND[0], "bbx": [5, 5, 1, 1]}, GND[1]], "bbx"),
    ([{**GND[0], "hard": ["a"]}, GND[1]], "integer"),
])
def test_malformed_ground_truth(tmp_path, gnd, match):
  write_revisited(tmp_path, gnd=gnd)
  with pytest.raises(DataError, match=match):
    landmarks.load_revisited("roxford5k", data_root=tmp_path, expected_sizes=None)


def test_missing_files(tmp_path):
  with pytest.raises(MissingFileError, match="gnd_roxford5k"):
    landmarks.load_revisited("roxford5k", data_root=tmp_path)
  folder = write_revisited(tmp_path)
  (folder / "jpg" / f"{DATABASE[2]}.jpg").unlink()
  with pytest.raises(MissingFileError, match=r"1 of 7 images.*balliol_000012"):
    landmarks.load_revisited("roxford5k", data_root=tmp_path, expected_sizes=None)
  with pytest.raises(ConfigError):
    landmarks.load_revisited("oxford105k", data_root=tmp_path)


def test_sha256_is_checked_against_the_recorded_table(tmp_path):
  path = tmp_path / "gnd_roxford5k.pkl"
  path.write_bytes(b"not the official file")
  assert landmarks.check_sha256(path, {}) is None
  digest = landmarks.sha256_of(path)
  assert digest == __import__("hashlib").sha256(b"not the official file").hexdigest()
  assert landmarks.check_sha256(path, {"gnd_roxford5k.pkl": digest}) is True
  with pytest.warns(UserWarning, match="SHA-256"):
    assert landmarks.check_sha256(path, {"gnd_roxford5k.pkl": "0" * 64}) is False


def test_revisitop1m_distractors(tmp_path):
  folder = tmp_path / "revisitop1m"
  names = ["a/b/c/000001.jpg", "a/b/c/000002", "d/e/f/000003.jpg"]
  for n, name in enumerate(names):
    write_jpeg(folder / "jpg" / (name if name.endswith(".jpg") else name + ".jpg"), n)
  (folder / "revisitop1m.txt").write_text("\n".join(names) + "\n")
  files = landmarks.read_distractors(data_root=tmp_path, expected_size=3)
  assert [f.relative_to(folder / "jpg").as_posix() for f in files] == [
      "a/b/c/000001.jpg", "a/b/c/000002.jpg", "d/e/f/000003.jpg"]
  source = landmarks.DistractorSource(files)
  assert len(source) == 3 and source[1]["image"] == files[1].read_bytes()
  with pytest.raises(DataError, match="1001001"):
    landmarks.read_distractors(data_root=tmp_path)
  files[2].unlink()
  with pytest.raises(MissingFileError, match="1 of 3"):
    landmarks.read_distractors(data_root=tmp_path, expected_size=None)


def test_gldv2_clean(tmp_path):
  folder = tmp_path / "gldv2"
  rows = {"1": ["6e158a47eb2ca3f6", "202cd79556f30760"], "7": ["3ad87684c99c06e1"]}
  for ids in rows.values():
    for image_id in ids:
      write_jpeg(folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", 0)
  (folder / "train_clean.csv").write_text(
      "landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in rows.items()))
  plan = parsing.parse_gldv2_clean(folder)["train"]
  assert plan.class_names == ["1", "7"]
  assert [(r.label, r.image_id) for r in plan.records] == [
      (0, "6e158a47eb2ca3f6"), (0, "202cd79556f30760"), (1, "3ad87684c99c06e1")]
  assert plan.records[0].file == folder / "train/6/e/1/6e158a47eb2ca3f6.jpg"
  assert plan.records[2].origin == "train_clean.csv:3"
  plan.records[1].file.unlink()
  with pytest.raises(MissingFileError, match="202cd79556f30760"):
    parsing.parse_gldv2_clean(folder)
  (folder / "train_clean.csv").write_text("landmark_id,images\nx,6e158a47eb2ca3f6\n")
  with pytest.raises(DataError, match="landmark_id 'x'"):
    parsing.parse_gldv2_clean(folder)


def test_gldv1_skips_and_counts_missing_images(tmp_path):
  folder = tmp_path / "gldv1"
  listing = ('id,url,landmark_id\n'
             '97c0a12e07ae8dd5,"http://lh4.ggpht.com/-f8xYA5l4apw/RSz/s1600/x.jpg",6347\n'
             '650c989dd3493748,"https://lh5.ggpht.com/y/s1600/y.jpg",12519\n'
             '05e63ca9b2cde1f4,"http://mw2.google.com/z.jpg",None\n'
             'a1a2a3a4a5a6a7a8,"https://lh3.ggpht.com/w/s1600/w.jpg",6347\n')
  folder.mkdir()
  (folder / "train.csv").write_text(listing)
  for image_id in ("97c0a12e07ae8dd5", "a1a2a3a4a5a6a7a8", "05e63ca9b2cde1f4"):
    write_jpeg(folder / "train" / f"{image_id}.jpg", 1)
  with pytest.warns(UserWarning, match=r"skipped 1 listed image\(s\) missing.* 1 row\(s\) "
                    r"without a landmark_id; 2 kept"):
    plan = parsing.parse_gldv1(folder)["train"]
  assert plan.class_names == ["6347"]
  assert [(r.label, r.image_id) for r in plan.records] == [(0, "97c0a12e07ae8dd5"),
                                                           (0, "a1a2a3a4a5a6a7a8")]
  (folder / "train.csv").write_text("id,landmark_id\n")
  with pytest.raises(DataError, match="header"):
    parsing.parse_gldv1(folder)


def write_sfm120k(root, payload=None):
  folder = root / "retrieval-SfM-120k"
  folder.mkdir(parents=True, exist_ok=True)
  cids = ["f4bd6b7e3b2a9a1e4d9ad6ce7c8c4a17", "0a9ec1d3b95f1d4c8cc9b2fd0bf7e512",
          "77d5c8a0e55d2ff4e1ac3d9b7f2c6e08"]
  db = {"train": {"cids": cids[:2], "cluster": [12, 12], "qidxs": [0], "pidxs": [1],
                  "bbxs": [None, None]},
        "val": {"cids": cids[2:], "cluster": [40], "qidxs": [], "pidxs": [], "bbxs": [None]}}
  for n, cid in enumerate(cids):
    write_jpeg(parsing.sfm120k_image_file(folder / "ims", cid), n)
  (folder / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db if payload is None else payload))
  return folder, cids


def test_sfm120k(tmp_path):
  folder, cids = write_sfm120k(tmp_path)
  splits = parsing.parse_sfm120k(folder)
  assert splits["train"].class_names == ["12"] and splits["val"].class_names == ["40"]
  assert [r.image_id for r in splits["train"].records] == cids[:2]
  assert [r.image_id for r in splits["val"].records] == [cids[2]]
  assert splits["train"].records[0].file == folder / "ims/17/4a/8c" / cids[0]
  splits["val"].records[0].file.unlink()
  with pytest.raises(MissingFileError):
    parsing.parse_sfm120k(folder)


def test_sfm120k_pickle_is_read_safely(tmp_path):
  marker = tmp_path / "executed"

  class RunsShell:
    def __reduce__(self):
      import os
      return (os.system, (f"touch {marker}",))

  folder, _ = write_sfm120k(tmp_path, {"train": {"cids": RunsShell(), "cluster": []}})
  with pytest.raises(safe_pickle.UnsafePickleError):
    parsing.parse_sfm120k(folder)
  assert not marker.exists()
  write_sfm120k(tmp_path, {"train": {"cids": ["abcdefgh"], "cluster": [1, 2]}})
  with pytest.raises(DataError, match="1 cids but 2 clusters"):
    parsing.parse_sfm120k(folder)
