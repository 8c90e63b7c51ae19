"""Parsers of each benchmark's official on-disk files into per-split record lists.

Nothing here decodes an image: a parser only reads the annotation files (and lists folders or
zip archives), checks that every referenced image exists, and maps class names to contiguous
labels 0..C-1 within each split (sorted numerically when the names are integers, else
lexicographically), so a label never depends on file order. A user's query and gallery splits
share one mapping, built over the class names of both.

Serves both tasks: the category-level benchmarks, a user's `folder` data and the instance-level
training sets (Google Landmarks v1 / v2-clean, SfM-120k). A parser is `parse(folder) -> {split:
SplitPlan}`, built with `split_plan`, `require_file` and `check_images_exist`; the dataset's
spec (`registry.DATASETS`) names it.

A user's CSV labels are class names, with one normalisation: when every label of the CSV(s)
parses as a decimal number (`1`, `01`, `1.0`, `+1`, `1e0`), each is the integer it equals, so
`1`, `01` and `1.0` are one class; a number that is not whole (`1.5`) is refused, and so is a
CSV mixing numbers with other names (`1` beside `cat`), since a numeric column with a stray name
is far more often a mistake than a deliberate class called `1`.
"""

from __future__ import annotations

import csv
import dataclasses
import decimal
import logging
import os
import pathlib
import re
import warnings
import zipfile
from collections.abc import Hashable, Sequence

import numpy as np

from recall_jax.data import safe_pickle
from recall_jax.errors import ConfigError, DataError, MissingFileError

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One image of a split before preparation.

  Attributes:
    file: the image file, or the zip archive holding it.
    member: the member name inside `file` when it is a zip archive, else None.
    label: contiguous class index within the split (or within the query/gallery pair).
    image_id: the dataset's own identifier of the image (a string).
    origin: where the record was read, e.g. `Ebay_train.txt:17`, for error messages.
  """
  file: pathlib.Path
  member: str | None
  label: int
  image_id: str
  origin: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """All records of one split plus the names behind the labels (label i is `class_names[i]`)."""
  records: list[RawRecord]
  class_names: list[str]


# (file, zip member or None, class name, image id, origin): one image before labels are assigned.
Entry = tuple[pathlib.Path, "str | None", Hashable, str, str]


def _sort_key(name: Hashable) -> tuple[int, int | str]:
  """Integers (or integer strings) sort numerically and before any other name."""
  text = str(name)
  return (0, int(text)) if re.fullmatch(r"-?\d+", text) else (1, text)


def _sorted_names(names: Sequence[Hashable]) -> list[Hashable]:
  return sorted(set(names), key=_sort_key)


def split_plan(entries: list[Entry], what: str,
               class_names: Sequence[Hashable] | None = None) -> SplitPlan:
  """Builds a split from its entries (what every parser returns, per split).

  Args:
    entries: (file, member, class name, image id, origin) of each image.
    what: names the split in error messages.
    class_names: the label space, label i being `class_names[i]`; default: the split's own
      class names, sorted (so labels are 0..C-1).
  """
  if not entries:
    raise DataError(f"{what}: the split has no images")
  names = _sorted_names([e[2] for e in entries]) if class_names is None else list(class_names)
  index = {name: i for i, name in enumerate(names)}
  records = [RawRecord(file=f, member=m, label=index[c], image_id=str(i), origin=o)
             for f, m, c, i, o in entries]
  return SplitPlan(records, [str(n) for n in names])


def require_file(path: pathlib.Path, hint: str = "") -> pathlib.Path:
  """`path`, or MissingFileError naming it (and `hint`: how to get it) when it is no file."""
  if not path.is_file():
    raise MissingFileError(f"{path} not found{': ' + hint if hint else ''}")
  return path


def check_images_exist(entries: list[Entry], what: str) -> None:
  """Raises MissingFileError naming the first missing image, its origin and the count."""
  missing = [e for e in entries if e[1] is None and not e[0].is_file()]
  if missing:
    first = missing[0]
    raise MissingFileError(
        f"{what}: {len(missing)} listed image(s) do not exist, first {first[0]} "
        f"(listed at {first[4]})")


def _read_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  """Non-empty lines with their 1-based line numbers."""
  with open(path, encoding="utf-8") as f:
    return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _fields(path: pathlib.Path, lineno: int, line: str, count: int, layout: str) -> list[str]:
  parts = line.split()
  if len(parts) != count:
    raise DataError(f"{path}:{lineno}: malformed line {line!r}, expected {count} fields `{layout}`")
  return parts


def _int_field(path: pathlib.Path, lineno: int, value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DataError(f"{path}:{lineno}: {name} {value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------
# Stanford Online Products.


def parse_sop(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`Ebay_{train,test}.txt`: header, then `image_id class_id super_class_id path`."""
  plans = {}
  for split in ("train", "test"):
    listing = require_file(folder / f"Ebay_{split}.txt", "download Stanford_Online_Products")
    lines = _read_lines(listing)
    if not lines or lines[0][1].split()[:2] != ["image_id", "class_id"]:
      raise DataError(f"{listing}:1: expected the header `image_id class_id super_class_id path`")
    entries = []
    for lineno, line in lines[1:]:
      image_id, class_id, super_id, rel = _fields(listing, lineno, line, 4,
                                                 "image_id class_id super_class_id path")
      _int_field(listing, lineno, super_id, "super_class_id")  # Checked, not kept.
      entries.append((folder / rel, None, _int_field(listing, lineno, class_id, "class_id"),
                      image_id, f"{listing.name}:{lineno}"))
    check_images_exist(entries, f"sop/{split}")
    plans[split] = split_plan(entries, f"sop/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# iNaturalist 2018 with the Smooth-AP class-disjoint split.


def parse_inat2018(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`Inaturalist_{train,test}_set1.txt`: one `train_val2018/<Super>/<id>/<file>.jpg` per line."""
  plans = {}
  for split in ("train", "test"):
    listing = require_file(folder / f"Inaturalist_{split}_set1.txt",
                            "get the Smooth-AP split lists (github.com/Andrew-Brown1/Smooth_AP)")
    entries = []
    for lineno, line in _read_lines(listing):
      parts = line.split("/")
      if len(parts) != 4 or not parts[3]:
        raise DataError(f"{listing}:{lineno}: malformed line {line!r}, expected "
                        "`train_val2018/<Super>/<id>/<file>.jpg`")
      _, super_name, class_id, _ = parts
      entries.append((folder / line, None, f"{super_name}/{class_id}", line,
                      f"{listing.name}:{lineno}"))
    check_images_exist(entries, f"inat2018/{split}")
    plans[split] = split_plan(entries, f"inat2018/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# PKU VehicleID.

VEHICLEID_LISTS = {
    "train": "train_list.txt",
    "test_800": "test_list_800.txt",
    "test_1600": "test_list_1600.txt",
    "test_2400": "test_list_2400.txt",
}


def parse_vehicleid(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`train_test_split/<list>.txt`: `image_id vehicle_id`; images are `image/<image_id>.jpg`."""
  plans = {}
  for split, name in VEHICLEID_LISTS.items():
    listing = require_file(folder / "train_test_split" / name, "download VehicleID_V1.0")
    entries = []
    for lineno, line in _read_lines(listing):
      image_id, vehicle_id = _fields(listing, lineno, line, 2, "image_id vehicle_id")
      entries.append((folder / "image" / f"{image_id}.jpg", None,
                      _int_field(listing, lineno, vehicle_id, "vehicle_id"), image_id,
                      f"{listing.name}:{lineno}"))
    check_images_exist(entries, f"vehicleid/{split}")
    plans[split] = split_plan(entries, f"vehicleid/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# CARS196.


def parse_cars196(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`cars_annos.mat` (`annotations` struct: `relative_im_path`, `class` 1-196); train = 1-98."""
  import scipy.io  # Only this dataset needs scipy; keep the import local.

  mat_path = require_file(folder / "cars_annos.mat", "download CARS196 (cars_annos.mat + car_ims)")
  try:
    mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=True)
  except Exception as e:
    raise DataError(f"{mat_path}: not a readable MATLAB file: {e}") from e
  if "annotations" not in mat:
    raise DataError(f"{mat_path}: no `annotations` variable "
                    f"(found {sorted(k for k in mat if not k.startswith('__'))})")
  annotations = np.atleast_1d(mat["annotations"])
  names = annotations.dtype.names or ()
  for field in ("relative_im_path", "class"):
    if field not in names:
      raise DataError(f"{mat_path}: `annotations` has no field {field!r} (fields: {names})")
  by_split = {"train": [], "test": []}
  for n, entry in enumerate(annotations):
    rel = str(entry["relative_im_path"])
    try:
      class_id = int(entry["class"])
    except (TypeError, ValueError):
      raise DataError(
          f"{mat_path}: annotations[{n}].class {entry['class']!r} is not an integer") from None
    if not 1 <= class_id <= 196:
      raise DataError(f"{mat_path}: annotations[{n}].class = {class_id}, expected 1..196")
    split = "train" if class_id <= 98 else "test"
    by_split[split].append((folder / rel, None, class_id, pathlib.PurePosixPath(rel).stem,
                            f"{mat_path.name}:annotations[{n}]"))
  plans = {}
  for split, entries in by_split.items():
    check_images_exist(entries, f"cars196/{split}")
    plans[split] = split_plan(entries, f"cars196/{split} ({mat_path})")
  return plans


# ---------------------------------------------------------------------------------------------
# CUB-200-2011.


def parse_cub200(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`images.txt`: `image_id <NNN>.<Name>/<file>.jpg`; class = NNN; train = 1-100."""
  listing = require_file(folder / "images.txt", "download CUB_200_2011")
  by_split = {"train": [], "test": []}
  for lineno, line in _read_lines(listing):
    image_id, rel = _fields(listing, lineno, line, 2, "image_id <NNN>.<Class>/<file>.jpg")
    match = re.fullmatch(r"(\d+)\.[^/]+/[^/]+", rel)
    if not match:
      raise DataError(f"{listing}:{lineno}: path {rel!r} is not `<NNN>.<Class>/<file>`")
    class_id = int(match.group(1))
    if not 1 <= class_id <= 200:
      raise DataError(f"{listing}:{lineno}: class {class_id}, expected 1..200")
    split = "train" if class_id <= 100 else "test"
    by_split[split].append((folder / "images" / rel, None, class_id, image_id,
                            f"{listing.name}:{lineno}"))
  plans = {}
  for split, entries in by_split.items():
    check_images_exist(entries, f"cub200/{split}")
    plans[split] = split_plan(entries, f"cub200/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# Omniglot.

OMNIGLOT_SPLITS = {"train": "images_background", "test": "images_evaluation"}
_OMNIGLOT_MEMBER = re.compile(r"(images_\w+)/([^/]+)/(character\d+)/([^/]+\.png)")


def parse_omniglot(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`images_{background,evaluation}.zip`; class = `<Alphabet>/character<NN>`."""
  plans = {}
  for split, stem in OMNIGLOT_SPLITS.items():
    archive = require_file(folder / f"{stem}.zip", "run with download=True or copy the archive")
    try:
      with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if not m.endswith("/")]
    except zipfile.BadZipFile as e:
      raise DataError(f"{archive}: not a valid zip archive ({e})") from e
    entries = []
    for member in members:
      if not member.lower().endswith(".png"):
        continue
      match = _OMNIGLOT_MEMBER.fullmatch(member)
      if not match or match.group(1) != stem:
        raise DataError(
            f"{archive}: member {member!r} is not `{stem}/<Alphabet>/character<NN>/<file>.png`")
      _, alphabet, character, _ = match.groups()
      entries.append((archive, member, f"{alphabet}/{character}", member,
                      f"{archive.name}:{member}"))
    plans[split] = split_plan(entries, f"omniglot/{split} ({archive})")
  return plans


# ---------------------------------------------------------------------------------------------
# A user's folder-per-class tree or CSV.


QUERY_GALLERY = ("query", "gallery")

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _tree_entries(tree: pathlib.Path, what: str) -> list[Entry]:
  entries = []
  classes = sorted(p for p in tree.iterdir() if p.is_dir())
  if not classes:
    raise DataError(f"{what}: {tree} has no class sub-folders")
  for class_dir in classes:
    images = sorted(p for p in class_dir.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
      raise DataError(f"{what}: class folder {class_dir} holds no images "
                      f"({', '.join(IMAGE_EXTENSIONS)})")
    for p in images:
      rel = p.relative_to(tree).as_posix()
      entries.append((p, None, class_dir.name, rel, rel))
  return entries


def _csv_rows(listing: pathlib.Path) -> list[tuple[int, list[str]]]:
  """Non-empty rows with their 1-based line numbers, without the `path,label` header.

  A UTF-8 byte-order mark (as spreadsheet programs write) is accepted.
  """
  rows = []
  with open(listing, encoding="utf-8-sig", newline="") as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      if not row or not "".join(row).strip():
        continue
      if lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
        continue
      rows.append((lineno, row))
  return rows


def _csv_entries(listing: pathlib.Path, what: str) -> list[Entry]:
  entries, first_line, repeated = [], {}, []
  for lineno, row in _csv_rows(listing):
    if len(row) != 2 or not row[0].strip() or not row[1].strip():
      raise DataError(f"{listing}:{lineno}: malformed row {row!r}, expected `path,label`")
    rel, label = row[0].strip(), row[1].strip()
    # A row listed again (a merged or appended listing) is stored once: twice would weigh the
    # image double in sampling and count it as its own positive in evaluation.
    key = (os.path.normpath(rel), label)
    if key in first_line:
      repeated.append(f"{lineno} (as {first_line[key]})")
      continue
    first_line[key] = lineno
    entries.append((listing.parent / rel, None, label, rel, f"{listing.name}:{lineno}"))
  if repeated:
    _log.warning("%s: %d rows repeat an earlier row and are stored once: lines %s%s", listing,
                 len(repeated), ", ".join(repeated[:5]), ", ..." if len(repeated) > 5 else "")
  check_images_exist(entries, what)
  return entries


def _normalise_csv_labels(entries: list[Entry], what: str) -> list[Entry]:
  """Whole numbers in any spelling -> one integer class name; see the module docstring."""
  numbers = [decimal.Decimal(e[2]) if _DECIMAL.fullmatch(e[2]) else None for e in entries]
  numeric = [e for e, n in zip(entries, numbers) if n is not None]
  if not numeric:
    return entries
  if len(numeric) < len(entries):
    name = next(e for e, n in zip(entries, numbers) if n is None)
    raise DataError(f"{what}: the labels mix numbers ({numeric[0][4]}: {numeric[0][2]!r}) and "
                    "names "
                    f"({name[4]}: {name[2]!r}); give every class the same form")
  out = []
  for entry, number in zip(entries, numbers):
    if number != number.to_integral_value():
      raise DataError(f"{entry[4]}: label {entry[2]!r} is a number but not a whole one; numeric "
                      "labels are class ids")
    out.append((entry[0], entry[1], str(int(number)), entry[3], entry[4]))
  return out


def _split_input(folder: pathlib.Path, split: str) -> pathlib.Path | None:
  """`<folder>/<split>.csv` or the tree `<folder>/<split>/` (the CSV wins), or None."""
  if (folder / f"{split}.csv").is_file():
    return folder / f"{split}.csv"
  if (folder / split).is_dir():
    return folder / split
  return None


def label_splits(folder: pathlib.Path, split: str,
                 shared: Sequence[str] | None = None) -> tuple[str, ...]:
  """The splits of a `folder` dataset whose class names `split`'s labels are mapped over.

  Args:
    folder: the dataset folder (or a CSV file, which has one split).
    split: the split being read.
    shared: splits sharing one label space with `split` (which must be among them); default:
      `query` and `gallery` for either of them when both exist, else `split` alone.

  Raises:
    ConfigError: `shared` does not include `split`.
  """
  if shared:
    shared = tuple(dict.fromkeys(shared))
    if split not in shared:
      raise ConfigError(f"folder/{split}: the shared label splits {shared} do not include it")
    return shared
  if split in QUERY_GALLERY and not folder.is_file() and all(
      _split_input(folder, s) is not None for s in QUERY_GALLERY):
    return QUERY_GALLERY
  return (split,)


def folder_inputs(folder: pathlib.Path, splits: Sequence[str]) -> list[pathlib.Path]:
  """Every file that defines these splits of a `folder` dataset: each CSV and the images it
  names, or every file under each tree (sorted; missing ones left out). What a prepared copy's
  fingerprint covers."""
  files = []
  for split in splits:
    source = folder if folder.is_file() else _split_input(folder, split)
    if source is None:
      continue
    if source.is_file():
      files.append(source)
      try:
        rows = _csv_rows(source)
      except (OSError, UnicodeDecodeError, csv.Error):
        continue  # Parsing reports it.
      files.extend(source.parent / row[0].strip() for _, row in rows if row and row[0].strip())
    else:
      files.extend(p for p in source.rglob("*") if p.is_file())
  return sorted({p for p in files if p.is_file()}, key=os.fspath)


def parse_folder(folder: pathlib.Path, split: str,
                 shared: Sequence[str] | None = None) -> dict[str, SplitPlan]:
  """A CSV file `path,label`, `<folder>/<split>.csv`, or `<folder>/<split>/<class>/<image>`.

  Args:
    folder: a CSV file (then `split` only names the result) or a folder holding `<split>.csv`
      or `<split>/`.
    split: the split to read.
    shared: see `label_splits`: the splits whose class names make up `split`'s label space
      (query and gallery by default), so a class has the same label in each of them.

  Returns:
    `{name: plan}` for `split` and every split sharing its label space (prepared together);
    each plan's `class_names` span them all.
  """
  what = f"folder/{split}"
  splits = (split,) if folder.is_file() else label_splits(folder, split, shared)
  per_split = {}
  for name in splits:
    source = folder if folder.is_file() else _split_input(folder, name)
    if source is None:
      raise MissingFileError(
          f"folder/{name}: neither {folder / (name + '.csv')} nor the folder {folder / name} "
          "exists "
          "(give `--config.data.path=` a CSV `path,label` file or a folder of "
          "`<split>/<class>/<image>`; see docs/data.md)")
    if source.is_file():
      per_split[name] = ("csv", _csv_entries(source, f"folder/{name}"))
    else:
      per_split[name] = ("tree", _tree_entries(source, f"folder/{name}"))
  csv_entries = [e for kind, entries in per_split.values() if kind == "csv" for e in entries]
  if csv_entries:
    normalised = iter(_normalise_csv_labels(csv_entries, what))
    per_split = {n: (k, [next(normalised) for _ in e] if k == "csv" else e)
                 for n, (k, e) in per_split.items()}
  class_names = _sorted_names([e[2] for _, entries in per_split.values() for e in entries])
  return {name: split_plan(entries, f"folder/{name}", class_names)
          for name, (_, entries) in per_split.items()}


# ---------------------------------------------------------------------------------------------
# Landmark training sets: the class of an image is its landmark (Google Landmarks v1 / v2-clean)
# or its 3D model (`cluster`, SfM-120k).


def _landmark_rows(listing: pathlib.Path, header: Sequence[str]) -> list[tuple[int, list[str]]]:
  """The CSV rows after the header `header` (checked), with their 1-based line numbers."""
  require_file(listing)
  with open(listing, encoding="utf-8", newline="") as f:
    rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if row and "".join(row).strip()]
  if not rows or [c.strip() for c in rows[0][1]] != list(header):
    raise DataError(f"{listing}:1: expected the header `{','.join(header)}`")
  return rows[1:]


def _landmark_id(listing: pathlib.Path, lineno: int, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DataError(f"{listing.name}:{lineno}: landmark_id {value!r} is not an integer") from None


def parse_gldv2_clean(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`train_clean.csv` rows `landmark_id,<id> <id> ...`; image `<id>` at
  `train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`; one split, `train`."""
  listing = folder / "train_clean.csv"
  entries = []
  for lineno, row in _landmark_rows(listing, ("landmark_id", "images")):
    if len(row) != 2 or not row[1].split():
      raise DataError(f"{listing}:{lineno}: malformed row, expected `landmark_id,<id> <id> ...`")
    landmark = _landmark_id(listing, lineno, row[0].strip())
    for image_id in row[1].split():
      if len(image_id) < 3:
        raise DataError(f"{listing}:{lineno}: image id {image_id!r} is shorter than 3 characters")
      file = folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
      entries.append((file, None, landmark, image_id, f"{listing.name}:{lineno}"))
  check_images_exist(entries, f"gldv2_clean ({folder / 'train'})")
  return {"train": split_plan(entries, f"gldv2_clean/train ({listing})")}


def parse_gldv1(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`train.csv` rows `id,url,landmark_id`, images `train/<id>.jpg`; one split, `train`.

  Many of the listed URLs no longer resolve, so images missing on disk are skipped and counted
  (one warning); rows whose landmark_id is `None` (unlabelled) are skipped likewise.
  """
  listing = folder / "train.csv"
  entries, missing, unlabelled = [], 0, 0
  for lineno, row in _landmark_rows(listing, ("id", "url", "landmark_id")):
    if len(row) != 3 or not row[0].strip():
      raise DataError(f"{listing}:{lineno}: malformed row, expected `id,url,landmark_id`")
    image_id, landmark = row[0].strip(), row[2].strip()
    if landmark in ("", "None"):
      unlabelled += 1
      continue
    landmark = _landmark_id(listing, lineno, landmark)
    file = folder / "train" / f"{image_id}.jpg"
    if not file.is_file():
      missing += 1
      continue
    entries.append((file, None, landmark, image_id, f"{listing.name}:{lineno}"))
  if missing or unlabelled:
    warnings.warn(f"gldv1: skipped {missing} listed image(s) missing under {folder / 'train'} and "
                  f"{unlabelled} row(s) without a landmark_id; {len(entries)} kept", stacklevel=2)
  if not entries:
    raise DataError(f"gldv1: none of the images listed in {listing} is present")
  return {"train": split_plan(entries, f"gldv1/train ({listing})")}


def sfm120k_image_file(images: pathlib.Path, cid: str) -> pathlib.Path:
  """`<images>/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`: where SfM-120k stores an image."""
  return images / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def parse_sfm120k(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`retrieval-SfM-120k.pkl` {'train'|'val': {'cids': [...], 'cluster': [...], ...}}, read with
  the plain-data unpickler (`safe_pickle`); class = cluster; the splits the file holds."""
  listing = folder / "retrieval-SfM-120k.pkl"
  data = safe_pickle.load(listing)
  if not isinstance(data, dict) or not any(s in data for s in ("train", "val")):
    raise DataError(f"{listing}: expected a dict with 'train' and 'val' entries")
  plans = {}
  for split in ("train", "val"):
    if split not in data:
      continue
    db = data[split]
    if not isinstance(db, dict) or "cids" not in db or "cluster" not in db:
      raise DataError(f"{listing}: ['{split}'] must hold 'cids' and 'cluster'")
    cids, clusters = list(db["cids"]), list(db["cluster"])
    if len(cids) != len(clusters):
      raise DataError(f"{listing}: ['{split}'] has {len(cids)} cids but {len(clusters)} clusters")
    entries = []
    for n, (cid, cluster) in enumerate(zip(cids, clusters)):
      where = f"{listing.name}:{split}[{n}]"
      if not isinstance(cid, str) or len(cid) < 6:
        raise DataError(f"{where}: cid {cid!r} is not an image name of at least 6 characters")
      if isinstance(cluster, bool) or not isinstance(cluster, (int, np.integer)):
        raise DataError(f"{where}: cluster {cluster!r} is not an integer")
      entries.append((sfm120k_image_file(folder / "ims", cid), None, int(cluster), cid, where))
    check_images_exist(entries, f"sfm120k/{split} ({folder / 'ims'})")
    plans[split] = split_plan(entries, f"sfm120k/{split} ({listing})")
  return plans
