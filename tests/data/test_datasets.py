"""Tests of recall_jax.data.datasets / parsing / download: official formats -> prepared splits."""

import functools
import http.server
import io
import logging
import os
import pickle
import pathlib
import subprocess
import sys
import textwrap
import threading
import zipfile

from absl import logging as absl_logging

import numpy as np
import PIL.Image
import pytest
import scipy.io

from recall_jax import data
from recall_jax import errors
from recall_jax.data import paths


def _color(key: str) -> tuple[int, int, int]:
  """A colour derived from a class name, so a decoded image reveals which class it was saved as."""
  h = sum((i + 1) * ord(c) for i, c in enumerate(key)) * 2654435761
  return (h % 251, (h // 251) % 251, (h // 63001) % 251)


def _image_bytes(key: str, fmt: str = "PNG", size: tuple[int, int] = (9, 7)) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.new("RGB", size, _color(key)).save(buffer, fmt)
  return buffer.getvalue()


def _write_image(path: pathlib.Path, key: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(_image_bytes(key, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))


def _decoded_color(record) -> tuple[int, ...]:
  return tuple(np.asarray(PIL.Image.open(io.BytesIO(record["image"])).convert("RGB"))[3, 4])


def _assert_labels_match_names(source, expected_names: dict[str, str]) -> None:
  """Every record's label names the class its image was written for (checked via the colour)."""
  for i in range(len(source)):
    record = source[i]
    assert record["label"] == source.labels[i]
    name = source.class_names[record["label"]]
    assert name == expected_names[record["id"]], (record["id"], name)
    want = np.array(_color(name))
    assert np.abs(np.array(_decoded_color(record), int) - want).max() <= 12  # JPEG tolerance.


def _load(name, split, root, **kw):
  return data.load_split(name, split, data_root=root, prepared_dir=root / "prep", **kw)


# --------------------------------------------------------------------------------------------
# Paths.


def test_data_root_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv(paths.DATA_ENV_VAR, str(tmp_path / "env"))
  assert data.data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
  assert data.data_root() == tmp_path / "env"
  monkeypatch.delenv(paths.DATA_ENV_VAR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert data.data_root() == tmp_path / "cache" / "recall_jax"


def test_prepared_root_falls_back_when_read_only(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert data.prepared_root(tmp_path) == tmp_path / "prepared"
  read_only = tmp_path / "ro"
  read_only.mkdir()
  read_only.chmod(0o555)
  try:
    assert data.prepared_root(read_only) == tmp_path / "cache" / "recall_jax" / "prepared"
  finally:
    read_only.chmod(0o755)


# --------------------------------------------------------------------------------------------
# Official formats.


def _make_sop(root: pathlib.Path) -> dict[str, str]:
  folder = root / "Stanford_Online_Products"
  names, image_id = {}, 0
  for split, classes in (("train", (1, 2, 5)), ("test", (7, 8))):
    lines = ["image_id class_id super_class_id path"]
    for class_id in classes:
      for k in range(class_id % 3 + 2):
        image_id += 1
        rel = f"bike_final/{class_id}_{k}.JPG"
        _write_image(folder / rel, str(class_id))
        lines.append(f"{image_id} {class_id} {1 + class_id % 2} {rel}")
        names[str(image_id)] = str(class_id)
    (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
  return names


def test_sop_splits_and_labels(tmp_path):
  names = _make_sop(tmp_path)
  train = _load("sop", "train", tmp_path)
  test = _load("sop", "test", tmp_path)
  assert (len(train), train.num_classes, len(test), test.num_classes) == (3 + 4 + 4, 3, 3 + 4, 2)
  assert train.class_names == ["1", "2", "5"] and test.class_names == ["7", "8"]
  np.testing.assert_array_equal(np.unique(test.labels), [0, 1])
  _assert_labels_match_names(train, names)
  _assert_labels_match_names(test, names)
  assert set(test[0]) == {"image", "label", "id"}  # Super-classes are checked, not kept.


def test_second_load_reuses_prepared_copy(tmp_path):
  _make_sop(tmp_path)
  first = _load("sop", "train", tmp_path)
  stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "prep").rglob("*.array_record*")}
  second = _load("sop", "train", tmp_path)
  assert stamp and stamp == {p: p.stat().st_mtime_ns
                             for p in (tmp_path / "prep").rglob("*.array_record*")}
  np.testing.assert_array_equal(first.labels, second.labels)


def test_inat2018(tmp_path):
  folder = tmp_path / "inaturalist2018"
  names = {}
  for split, classes in (("train", ("Plantae/10", "Plantae/2", "Aves/7")),
                         ("test", ("Fungi/3", "Aves/9"))):
    lines = []
    for cls in classes:
      for k in range(2):
        rel = f"train_val2018/{cls}/{k}ab.jpg"
        _write_image(folder / rel, cls)
        lines.append(rel)
        names[rel] = cls
    (folder / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
  train = _load("inat2018", "train", tmp_path)
  assert train.class_names == ["Aves/7", "Plantae/10", "Plantae/2"]
  assert len(train) == 6
  _assert_labels_match_names(train, names)
  _assert_labels_match_names(_load("inat2018", "test", tmp_path), names)


def test_vehicleid_four_splits(tmp_path):
  folder = tmp_path / "VehicleID_V1.0"
  lists = {"train_list.txt": [(1, 10), (2, 10), (3, 4)], "test_list_800.txt": [(4, 20), (5, 21)],
           "test_list_1600.txt": [(4, 20), (5, 21), (6, 22)],
           "test_list_2400.txt": [(4, 20), (5, 21), (6, 22), (7, 23)]}
  names = {}
  for name, rows in lists.items():
    for image_id, vehicle in rows:
      _write_image(folder / "image" / f"{image_id:07d}.jpg", str(vehicle))
      names[f"{image_id:07d}"] = str(vehicle)
    (folder / "train_test_split").mkdir(parents=True, exist_ok=True)
    (folder / "train_test_split" / name).write_text("".join(f"{i:07d} {v:04d}\n" for i, v in rows))
  sizes = {s: len(_load("vehicleid", s, tmp_path))
           for s in ("train", "test_800", "test_1600", "test_2400")}
  assert sizes == {"train": 3, "test_800": 2, "test_1600": 3, "test_2400": 4}
  train = _load("vehicleid", "train", tmp_path)
  assert train.class_names == ["4", "10"]  # Numeric order, not "10" < "4".
  _assert_labels_match_names(train, names)
  with pytest.raises(ValueError, match="Unknown split"):
    _load("vehicleid", "test", tmp_path)


def _cars_mat(path: pathlib.Path, rows: list[tuple[str, int]]) -> None:
  """cars_annos.mat in the official layout: a 1xN struct array `annotations` + `class_names`."""
  fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
  annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
  for n, (rel, cls) in enumerate(rows):
    annotations[0, n] = (np.array([rel]), np.array([[1]], np.uint8), np.array([[2]], np.uint8),
                         np.array([[8]], np.uint8), np.array([[6]], np.uint8),
                         np.array([[cls]], np.uint8), np.array([[n % 2]], np.uint8))
  class_names = np.empty((1, 196), dtype=object)
  class_names[0, :] = [f"Car {i}" for i in range(1, 197)]
  scipy.io.savemat(path, {"annotations": annotations, "class_names": class_names})


def test_cars196_class_split(tmp_path):
  folder = tmp_path / "cars196"
  rows = [(f"car_ims/{n:06d}.jpg", cls)
          for n, cls in enumerate([1, 1, 98, 98, 99, 196, 196, 50], 1)]
  for rel, cls in rows:
    _write_image(folder / rel, str(cls))
  _cars_mat(folder / "cars_annos.mat", rows)
  names = {pathlib.Path(rel).stem: str(cls) for rel, cls in rows}
  train, test = _load("cars196", "train", tmp_path), _load("cars196", "test", tmp_path)
  assert train.class_names == ["1", "50", "98"] and test.class_names == ["99", "196"]
  assert (len(train), len(test)) == (5, 3)
  _assert_labels_match_names(train, names)
  _assert_labels_match_names(test, names)


def test_cub200_class_split(tmp_path):
  folder = tmp_path / "CUB_200_2011"
  rows = [(1, "001.Black_footed_Albatross/a.jpg"), (2, "001.Black_footed_Albatross/b.jpg"),
          (3, "100.Brown_Pelican/c.jpg"), (4, "101.White_Pelican/d.jpg"), (5, "200.Wren/e.jpg")]
  for _, rel in rows:
    _write_image(folder / "images" / rel, str(int(rel[:3])))
  (folder / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel in rows))
  names = {str(i): str(int(rel[:3])) for i, rel in rows}
  train, test = _load("cub200", "train", tmp_path), _load("cub200", "test", tmp_path)
  assert ((len(train), train.class_names, len(test), test.class_names)
          == (3, ["1", "100"], 2, ["101", "200"]))
  _assert_labels_match_names(train, names)
  _assert_labels_match_names(test, names)


def _omniglot_zip(path: pathlib.Path, stem: str, layout: dict[str, int],
                  images_per_char: int = 3) -> dict:
  """An archive in the official layout; returns member -> class name."""
  names = {}
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as z:
    for alphabet, characters in layout.items():
      for c in range(1, characters + 1):
        cls = f"{alphabet}/character{c:02d}"
        for k in range(images_per_char):
          member = f"{stem}/{cls}/{c:04d}_{k + 1:02d}.png"
          buffer = io.BytesIO()
          PIL.Image.new("RGB", (9, 7), _color(cls)).convert("1").save(buffer, "PNG")
          z.writestr(member, buffer.getvalue())
          names[member] = cls
  return names


def test_omniglot_fake_archives(tmp_path):
  folder = tmp_path / "omniglot"
  _omniglot_zip(folder / "images_background.zip", "images_background", {"Greek": 2, "Latin": 3})
  _omniglot_zip(folder / "images_evaluation.zip", "images_evaluation", {"Atlantean": 2})
  train = _load("omniglot", "train", tmp_path, download=False)
  test = _load("omniglot", "test", tmp_path, download=False)
  assert (len(train), train.num_classes, len(test), test.num_classes) == (15, 5, 6, 2)
  assert train.class_names[:2] == ["Greek/character01", "Greek/character02"]
  assert train.channels == 1
  record = train[0]
  assert record["id"].startswith("images_background/") and record["image"][:4] == b"\x89PNG"
  assert train.class_names[record["label"]] == record["id"].split("/", 1)[1].rsplit("/", 1)[0]


def test_omniglot_download_from_local_server(tmp_path):
  served = tmp_path / "served"
  _omniglot_zip(served / "images_background.zip", "images_background", {"Greek": 2})
  _omniglot_zip(served / "images_evaluation.zip", "images_evaluation", {"Mongolian": 1})
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    root = tmp_path / "root"
    test = _load("omniglot", "test", root, url_base=url)
    assert (len(test), test.num_classes) == (3, 1)
    for name in ("images_background.zip", "images_evaluation.zip"):
      assert (root / "omniglot" / name).read_bytes() == (served / name).read_bytes()
    assert not list((root / "omniglot").glob(".*part"))
    with pytest.raises(OSError, match="Could not download"):
      data.download_file(f"{url}/missing.zip", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
  finally:
    server.shutdown()
    server.server_close()


def test_omniglot_missing_without_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="images_background.zip"):
    _load("omniglot", "train", tmp_path, download=False)


def test_folder_tree_and_csv(tmp_path):
  tree = tmp_path / "folder"
  names = {}
  for cls, count in (("zebra", 2), ("apple", 3)):
    for k in range(count):
      rel = f"{cls}/{k}.png"
      _write_image(tree / "train" / rel, cls)
      names[rel] = cls
  source = _load("folder", "train", tmp_path)
  assert source.class_names == ["apple", "zebra"] and len(source) == 5
  _assert_labels_match_names(source, names)
  # CSV `path,label` with a header; paths relative to the CSV.
  rows = ["path,label"] + [f"train/{rel},{cls}" for rel, cls in names.items()]
  (tree / "val.csv").write_text("\n".join(rows) + "\n")
  via_csv = _load("folder", "val", tmp_path)
  assert via_csv.class_names == ["apple", "zebra"]
  _assert_labels_match_names(via_csv, {f"train/{k}": v for k, v in names.items()})
  direct = data.load_split("folder", "whatever", path=tree / "val.csv",
                           prepared_dir=tmp_path / "prep")
  np.testing.assert_array_equal(np.sort(direct.labels), np.sort(via_csv.labels))


# --------------------------------------------------------------------------------------------
# Bad input.


def test_malformed_line_names_file_and_line(tmp_path):
  _make_sop(tmp_path)
  listing = tmp_path / "Stanford_Online_Products" / "Ebay_train.txt"
  lines = listing.read_text().splitlines()
  lines[3] = "4 2 bike_final/2_0.JPG"
  listing.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"Ebay_train\.txt:4: malformed line"):
    _load("sop", "train", tmp_path)
  lines[3] = "4 two 1 bike_final/2_0.JPG"
  listing.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"Ebay_train\.txt:4: class_id 'two' is not an integer"):
    _load("sop", "train", tmp_path)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _load("sop", "train", tmp_path)
  _make_sop(tmp_path)
  image = tmp_path / "Stanford_Online_Products" / "bike_final" / "5_1.JPG"
  content = image.read_bytes()
  image.unlink()
  with pytest.raises(FileNotFoundError, match=r"5_1\.JPG \(listed at Ebay_train\.txt:\d+\)"):
    _load("sop", "train", tmp_path)
  image.write_bytes(content)
  (tmp_path / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
  with pytest.raises(FileNotFoundError, match="Ebay_test.txt not found"):
    _load("sop", "test", tmp_path)


def test_empty_class_folder_and_bad_csv(tmp_path):
  tree = tmp_path / "folder"
  _write_image(tree / "train" / "a" / "0.png", "a")
  (tree / "train" / "b").mkdir()
  with pytest.raises(ValueError, match="class folder .*b holds no images"):
    _load("folder", "train", tmp_path)
  (tree / "val.csv").write_text("path,label\ntrain/a/0.png,a\ntrain/a/0.png\n")
  with pytest.raises(ValueError, match=r"val\.csv:3: malformed row"):
    _load("folder", "val", tmp_path)
  with pytest.raises(FileNotFoundError, match="neither"):
    _load("folder", "nothing", tmp_path)
  with pytest.raises(ValueError, match="Unknown dataset"):
    _load("imagenet", "train", tmp_path)


def test_corrupt_images_are_skipped_with_one_warning(tmp_path):
  tree = tmp_path / "folder" / "train"
  for cls in ("a", "b"):
    for k in range(3):
      _write_image(tree / cls / f"{k}.jpg", cls)
  (tree / "a" / "1.jpg").write_bytes(b"not an image")
  good = (tree / "b" / "2.jpg").read_bytes()
  (tree / "b" / "2.jpg").write_bytes(good[: len(good) // 2])  # Truncated JPEG.
  with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 6"):
    source = _load("folder", "train", tmp_path)
  assert len(source) == 4 and len(source.skipped) == 2 and source.listed == 6
  # Every later load repeats the count (the prepared copy is reused, not rebuilt).
  with pytest.warns(UserWarning, match=r"folder/train: skipped 2 unreadable image\(s\) of 6; "
                    r"first: \['a/1\.jpg"):
    again = _load("folder", "train", tmp_path)
  assert again.prepared_dir == source.prepared_dir and again.skipped == source.skipped
  np.testing.assert_array_equal(np.bincount(source.labels), [2, 2])
  assert {source[i]["id"] for i in range(4)} == {"a/0.jpg", "a/2.jpg", "b/0.jpg", "b/1.jpg"}


def test_class_with_only_corrupt_images_is_an_error(tmp_path):
  tree = tmp_path / "folder" / "train"
  _write_image(tree / "a" / "0.png", "a")
  (tree / "b").mkdir(parents=True)
  (tree / "b" / "0.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(ValueError, match=r"every image of class\(es\) \['b'\] is unreadable"):
    _load("folder", "train", tmp_path)


def test_cars_mat_without_annotations(tmp_path):
  (tmp_path / "cars196").mkdir()
  scipy.io.savemat(tmp_path / "cars196" / "cars_annos.mat", {"something": np.zeros(3)})
  with pytest.raises(ValueError, match="no `annotations` variable"):
    _load("cars196", "train", tmp_path)


# --------------------------------------------------------------------------------------------
# The real Omniglot archives (../shared/data), prepared once into the user cache.


def test_omniglot_shared_copy(omniglot_root):
  train = data.load_split("omniglot", "train", data_root=omniglot_root)
  assert (len(train), train.num_classes) == (19280, 964)
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(964, 20))
  assert len({name.split("/")[0] for name in train.class_names}) == 30  # Alphabets.
  for i in (0, 12345, len(train) - 1):
    record = train[i]
    member = record["id"]
    assert train.class_names[record["label"]] == "/".join(member.split("/")[1:3])
    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_background.zip") as z:
      assert record["image"] == z.read(member)
    assert PIL.Image.open(io.BytesIO(record["image"])).size == (105, 105)
  test = data.load_split("omniglot", "test", data_root=omniglot_root)
  assert (len(test), test.num_classes) == (13180, 659)


# --------------------------------------------------------------------------------------------
# A user's folder / CSV data: query and gallery splits, CSV labels, freshness.


def test_query_gallery_folders_share_one_label_space(tmp_path):
  tree = tmp_path / "folder"
  layout = {"query": ("bird", "cat"), "gallery": ("ant", "bird", "cat", "dog")}
  names = {}
  for split, classes in layout.items():
    for cls in classes:
      for k in range(2):
        _write_image(tree / split / cls / f"{k}.png", cls)
        names[f"{cls}/{k}.png"] = cls
  query = _load("folder", "query", tmp_path)
  gallery = _load("folder", "gallery", tmp_path)
  assert query.class_names == gallery.class_names == ["ant", "bird", "cat", "dog"]
  assert query.num_classes == gallery.num_classes == 4
  np.testing.assert_array_equal(np.unique(query.labels), [1, 2])  # bird, cat: as in the gallery.
  _assert_labels_match_names(query, names)
  _assert_labels_match_names(gallery, names)
  # Without the pairing (an explicit label space of one split), labels are the split's own.
  alone = _load("folder", "query", tmp_path, label_splits=("query",))
  assert alone.class_names == ["bird", "cat"]
  with pytest.raises(errors.ConfigError, match="do not include it"):
    _load("folder", "query", tmp_path, label_splits=("gallery", "train"))
  with pytest.raises(errors.ConfigError, match="folder` data only"):
    _load("sop", "train", tmp_path, label_splits=("train",))


def test_query_gallery_csvs_share_one_label_space(tmp_path):
  tree = tmp_path / "folder"
  names = {}
  for split, classes in {"query": ("12", "3"), "gallery": ("3", "007", "12")}.items():
    rows = ["path,label"]
    for cls in classes:
      rel = f"images/{split}-{cls}.png"
      _write_image(tree / rel, str(int(cls)))
      rows.append(f"{rel},{cls}")
      names[rel] = str(int(cls))
    (tree / f"{split}.csv").write_text("\n".join(rows) + "\n")
  query = _load("folder", "query", tmp_path)
  gallery = _load("folder", "gallery", tmp_path)
  assert query.class_names == gallery.class_names == ["3", "7", "12"]
  _assert_labels_match_names(query, names)
  _assert_labels_match_names(gallery, names)


def test_csv_numeric_labels_are_one_class_and_bom_is_accepted(tmp_path):
  tree = tmp_path / "folder"
  spellings = {"1": ("1", "1.0", "01"), "2": ("2", "+2", "2e0")}
  rows, names = ["path,label"], {}
  for cls, forms in spellings.items():
    for k, form in enumerate(forms):
      rel = f"img/{cls}-{k}.png"
      _write_image(tree / rel, cls)
      rows.append(f"{rel},{form}")
      names[rel] = cls
  # As spreadsheet programs save "CSV UTF-8": a byte-order mark before the header.
  (tree / "train.csv").write_bytes(("\n".join(rows) + "\n").encode("utf-8-sig"))
  source = _load("folder", "train", tmp_path)
  assert source.class_names == ["1", "2"] and len(source) == 6
  np.testing.assert_array_equal(np.bincount(source.labels), [3, 3])
  _assert_labels_match_names(source, names)


@pytest.mark.parametrize("labels, message", [
    (("1", "cat"), r"mix numbers \(train\.csv:2: '1'\) and names \(train\.csv:3: 'cat'\)"),
    (("1", "1.5"), r"train\.csv:3: label '1\.5' is a number but not a whole one"),
])
def test_csv_bad_labels_are_refused(tmp_path, labels, message):
  tree = tmp_path / "folder"
  rows = ["path,label"]
  for k, label in enumerate(labels):
    _write_image(tree / f"{k}.png", "x")
    rows.append(f"{k}.png,{label}")
  (tree / "train.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(errors.DataError, match=message):
    _load("folder", "train", tmp_path)


def test_changed_csv_image_is_prepared_again(tmp_path):
  tree = tmp_path / "folder"
  _write_image(tree / "img" / "a.png", "a")
  _write_image(tree / "img" / "b.png", "b")
  (tree / "train.csv").write_text("path,label\nimg/a.png,a\nimg/b.png,b\n")
  first = _load("folder", "train", tmp_path)
  _assert_labels_match_names(first, {"img/a.png": "a", "img/b.png": "b"})
  # Replace an image's content, not the CSV: the prepared copy must not be reused.
  image = tree / "img" / "a.png"
  image.write_bytes(_image_bytes("other", size=(11, 8)))
  os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
  second = _load("folder", "train", tmp_path)
  assert second.prepared_dir != first.prepared_dir
  record = next(second[i] for i in range(len(second)) if second[i]["id"] == "img/a.png")
  assert record["image"] == image.read_bytes()


# --------------------------------------------------------------------------------------------
# Preparation: atomic, quiet.


def _tiny_folder(root: pathlib.Path, per_class: int = 3) -> None:
  for cls in ("a", "b"):
    for k in range(per_class):
      _write_image(root / "folder" / "train" / cls / f"{k}.png", cls)


def test_preparation_killed_midway_leaves_nothing_that_breaks_the_next_load(tmp_path):
  _tiny_folder(tmp_path, per_class=4)
  # A preparation that the kernel kills (SIGKILL, no clean-up code runs) on its fifth image.
  script = textwrap.dedent(f"""
      import os, signal
      from recall_jax import data
      from recall_jax.data import datasets
      seen = []
      check = datasets.check_image
      def dying_check(blob):
        seen.append(1)
        if len(seen) == 5:
          os.kill(os.getpid(), signal.SIGKILL)
        return check(blob)
      datasets.check_image = dying_check
      data.load_split("folder", "train", data_root={str(tmp_path)!r},
                      prepared_dir={str(tmp_path / "prep")!r})
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=pathlib.Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == -9, result.stderr[-2000:]
  leftovers = list((tmp_path / "prep").iterdir())
  assert leftovers and all(p.name.startswith(".folder-") and ".partial-" in p.name
                           for p in leftovers)
  source = _load("folder", "train", tmp_path)
  assert len(source) == 8
  assert [p.name for p in (tmp_path / "prep").iterdir()] == [source.prepared_dir.name]


def test_incomplete_prepared_copy_is_rebuilt(tmp_path):
  _tiny_folder(tmp_path)
  first = _load("folder", "train", tmp_path)
  info = next(first.prepared_dir.rglob("dataset_info.json"))
  info.unlink()  # What an interrupted copy without the final rename would look like.
  again = _load("folder", "train", tmp_path)
  assert again.prepared_dir == first.prepared_dir and info.is_file()
  np.testing.assert_array_equal(again.labels, first.labels)
  assert [p.name for p in (tmp_path / "prep").iterdir()] == [first.prepared_dir.name]


def test_preparation_shows_one_bar_per_split_and_nothing_of_tfds(tmp_path, capfd):
  _tiny_folder(tmp_path)
  absl_logger = logging.getLogger("absl")
  verbosity, level = absl_logging.get_verbosity(), absl_logger.level
  absl_logging.set_verbosity(absl_logging.INFO)  # As under absl.app with --verbosity=0.
  try:
    _load("folder", "train", tmp_path)
    out, err = capfd.readouterr()
    assert absl_logger.level == logging.INFO  # Restored after preparing.
    _load("folder", "train", tmp_path)  # Reused: not a word.
    out_again, err_again = capfd.readouterr()
  finally:
    absl_logging.set_verbosity(verbosity)
    absl_logger.setLevel(level)
  for unwanted in ("Downloading and preparing", "Unknown size", "Shuffling", "incomplete",
                   "Generating", "Subsequent calls", "dataset_info", "INFO",
                   "recall_jax_retrieval"):
    assert unwanted not in out + err, (unwanted, out, err)
  assert out == "" and "preparing folder/train: 6 images" in err
  assert (out_again, err_again) == ("", "")


def test_folder_images_of_any_mode_are_prepared_and_decoded(tmp_path):
  """A 16-bit PNG and a CMYK TIFF go through preparation and the loader with correct scaling."""
  tree = tmp_path / "folder" / "train"
  (tree / "deep").mkdir(parents=True)
  (tree / "print").mkdir(parents=True)
  values = np.full((8, 8), 40000, np.uint16)  # 40000 >> 8 = 156, not saturated to 255.
  PIL.Image.fromarray(values).save(tree / "deep" / "0.png")
  PIL.Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tree / "print" / "0.tiff")  # Pure red.
  source = _load("folder", "train", tmp_path)
  batch = next(iter(data.make_eval_loader(source, image_size=8, resize_size=8, batch_size=2)))
  by_class = {source.class_names[label]: image
              for label, image in zip(batch["label"], batch["image"])}
  np.testing.assert_array_equal(by_class["deep"], np.full((8, 8, 3), 156, np.uint8))
  np.testing.assert_array_equal(by_class["print"],
                                np.broadcast_to(np.uint8([255, 0, 0]), (8, 8, 3)))


# --------------------------------------------------------------------------------------------
# Landmark training sets, each in its official layout.


def _write_landmark_jpeg(path: pathlib.Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), np.uint8)
  PIL.Image.fromarray(pixels).save(path, format="JPEG")


def test_gldv2_clean_loads_as_a_train_split(tmp_path):
  folder = tmp_path / "gldv2"
  rows = {7: ["abc001", "abd002", "abe003"], 1234: ["f00aaa", "f00bbb"]}
  for n, image_id in enumerate(i for ids in rows.values() for i in ids):
    _write_landmark_jpeg(folder / "train" / image_id[0] / image_id[1] / image_id[2] /
                         f"{image_id}.jpg", n)
  (folder / "train_clean.csv").write_text(
      "landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in rows.items()))
  source = _load("gldv2_clean", "train", tmp_path)
  assert len(source) == 5 and source.class_names == ["7", "1234"]
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1])
  assert [source[i]["id"] for i in range(5)] == rows[7] + rows[1234]
  with pytest.raises(errors.ConfigError, match="split"):
    _load("gldv2_clean", "test", tmp_path)


def test_gldv1_skips_missing_images_and_reprepares_when_they_arrive(tmp_path):
  folder = tmp_path / "gldv1"
  listed = [("aa01", 3), ("aa02", 3), ("bb01", 9), ("bb02", 9), ("cc01", 4)]
  for n, (image_id, _) in enumerate(listed[:4]):
    _write_landmark_jpeg(folder / "train" / f"{image_id}.jpg", n)
  (folder / "train.csv").write_text("id,url,landmark_id\n" + "".join(
      f"{i},http://example.com/{i}.jpg,{k}\n" for i, k in listed) + "dd01,http://x,None\n")
  with pytest.warns(UserWarning, match="skipped 1 listed image"):
    source = _load("gldv1", "train", tmp_path)
  assert source.class_names == ["3", "9"]
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1])
  _write_landmark_jpeg(folder / "train" / "cc01.jpg", 5)
  with pytest.warns(UserWarning, match="skipped 0 listed image"):
    source = _load("gldv1", "train", tmp_path)
  assert source.class_names == ["3", "4", "9"] and len(source) == 5


def test_sfm120k_loads_train_and_val_from_its_pickle(tmp_path):
  folder = tmp_path / "retrieval-SfM-120k"
  db = {"train": {"cids": ["0123456789ab", "0123456789cd", "fedcba987654"], "cluster": [5, 5, 2],
                  "qidxs": [0], "pidxs": [1]},
        "val": {"cids": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "cluster": [8, 8]}}
  for n, cid in enumerate(db["train"]["cids"] + db["val"]["cids"]):
    _write_landmark_jpeg(folder / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid, n)
  (folder / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db))
  train = _load("sfm120k", "train", tmp_path)
  assert train.class_names == ["2", "5"]
  np.testing.assert_array_equal(train.labels, [1, 1, 0])
  assert len(_load("sfm120k", "val", tmp_path)) == 2
