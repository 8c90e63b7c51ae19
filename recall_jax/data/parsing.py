"""Parsers of each benchmark's official on-disk files into per-split record lists.

Nothing here decodes an image: a parser only reads the annotation files (and lists folders or
zip archives), checks that every referenced image exists, and maps class names to contiguous
labels 0..C-1 within each split (sorted numerically when the names are integers, else
lexicographically), so a label never depends on file order.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re
import zipfile
from collections.abc import Callable, Hashable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One image of a split before preparation.

  Attributes:
    file: the image file, or the zip archive holding it.
    member: the member name inside `file` when it is a zip archive, else None.
    label: contiguous class index within the split.
    image_id: the dataset's own identifier of the image (a string).
    super_label: contiguous super-class index within the split, or -1 when there is none.
    origin: where the record was read, e.g. `Ebay_train.txt:17`, for error messages.
  """
  file: pathlib.Path
  member: str | None
  label: int
  image_id: str
  super_label: int
  origin: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """All records of one split plus the names behind the contiguous labels."""
  records: list[RawRecord]
  class_names: list[str]
  super_class_names: list[str]


def _sort_key(name: Hashable) -> tuple[int, int | str]:
  """Integers (or integer strings) sort numerically and before any other name."""
  text = str(name)
  return (0, int(text)) if re.fullmatch(r"-?\d+", text) else (1, text)


def _contiguous(names: Sequence[Hashable]) -> tuple[np.ndarray, list[str]]:
  """Maps names to 0..C-1 in sorted order; returns the int64 labels and the sorted names."""
  unique = sorted(set(names), key=_sort_key)
  index = {name: i for i, name in enumerate(unique)}
  return np.array([index[n] for n in names], dtype=np.int64), [str(n) for n in unique]


def _plan(entries: list[tuple[pathlib.Path, str | None, Hashable, str, Hashable | None, str]],
          what: str) -> SplitPlan:
  """Builds a split from (file, member, class name, image id, super-class name, origin)."""
  if not entries:
    raise ValueError(f"{what}: the split has no images")
  labels, class_names = _contiguous([e[2] for e in entries])
  if all(e[4] is not None for e in entries):
    supers, super_names = _contiguous([e[4] for e in entries])
  else:
    supers, super_names = np.full(len(entries), -1, np.int64), []
  records = [
      RawRecord(file=f, member=m, label=int(l), image_id=str(i), super_label=int(s), origin=o)
      for (f, m, _, i, _, o), l, s in zip(entries, labels, supers)
  ]
  return SplitPlan(records, class_names, super_names)


def _require_file(path: pathlib.Path, hint: str = "") -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found{': ' + hint if hint else ''}")
  return path


def _check_images_exist(entries: list[tuple], what: str) -> None:
  """Raises FileNotFoundError naming the first missing image, its origin and the count."""
  missing = [e for e in entries if e[1] is None and not e[0].is_file()]
  if missing:
    first = missing[0]
    raise FileNotFoundError(
        f"{what}: {len(missing)} listed image(s) do not exist, first {first[0]} (listed at {first[5]})")


def _read_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  """Non-empty lines with their 1-based line numbers."""
  with open(path, encoding="utf-8") as f:
    return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _fields(path: pathlib.Path, lineno: int, line: str, count: int, layout: str) -> list[str]:
  parts = line.split()
  if len(parts) != count:
    raise ValueError(f"{path}:{lineno}: malformed line {line!r}, expected {count} fields `{layout}`")
  return parts


def _int_field(path: pathlib.Path, lineno: int, value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{path}:{lineno}: {name} {value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------
# Stanford Online Products.


def parse_sop(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`Ebay_{train,test}.txt`: header, then `image_id class_id super_class_id path`."""
  plans = {}
  for split in ("train", "test"):
    listing = _require_file(folder / f"Ebay_{split}.txt", "download Stanford_Online_Products")
    lines = _read_lines(listing)
    if not lines or lines[0][1].split()[:2] != ["image_id", "class_id"]:
      raise ValueError(f"{listing}:1: expected the header `image_id class_id super_class_id path`")
    entries = []
    for lineno, line in lines[1:]:
      image_id, class_id, super_id, rel = _fields(listing, lineno, line, 4,
                                                 "image_id class_id super_class_id path")
      entries.append((folder / rel, None, _int_field(listing, lineno, class_id, "class_id"), image_id,
                      _int_field(listing, lineno, super_id, "super_class_id"), f"{listing.name}:{lineno}"))
    _check_images_exist(entries, f"sop/{split}")
    plans[split] = _plan(entries, f"sop/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# iNaturalist 2018 with the Smooth-AP class-disjoint split.


def parse_inat2018(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`Inaturalist_{train,test}_set1.txt`: one `train_val2018/<Super>/<id>/<file>.jpg` per line."""
  plans = {}
  for split in ("train", "test"):
    listing = _require_file(folder / f"Inaturalist_{split}_set1.txt",
                            "get the Smooth-AP split lists (github.com/Andrew-Brown1/Smooth_AP)")
    entries = []
    for lineno, line in _read_lines(listing):
      parts = line.split("/")
      if len(parts) != 4 or not parts[3]:
        raise ValueError(f"{listing}:{lineno}: malformed line {line!r}, expected "
                         "`train_val2018/<Super>/<id>/<file>.jpg`")
      _, super_name, class_id, _ = parts
      entries.append((folder / line, None, f"{super_name}/{class_id}", line, super_name,
                      f"{listing.name}:{lineno}"))
    _check_images_exist(entries, f"inat2018/{split}")
    plans[split] = _plan(entries, f"inat2018/{split} ({listing})")
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
    listing = _require_file(folder / "train_test_split" / name, "download VehicleID_V1.0")
    entries = []
    for lineno, line in _read_lines(listing):
      image_id, vehicle_id = _fields(listing, lineno, line, 2, "image_id vehicle_id")
      entries.append((folder / "image" / f"{image_id}.jpg", None,
                      _int_field(listing, lineno, vehicle_id, "vehicle_id"), image_id, None,
                      f"{listing.name}:{lineno}"))
    _check_images_exist(entries, f"vehicleid/{split}")
    plans[split] = _plan(entries, f"vehicleid/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# CARS196.


def parse_cars196(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`cars_annos.mat` (`annotations` struct: `relative_im_path`, `class` 1-196); train = 1-98."""
  import scipy.io  # Only this dataset needs scipy; keep the import local.

  mat_path = _require_file(folder / "cars_annos.mat", "download CARS196 (cars_annos.mat + car_ims)")
  try:
    mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=True)
  except Exception as e:
    raise ValueError(f"{mat_path}: not a readable MATLAB file: {e}") from e
  if "annotations" not in mat:
    raise ValueError(f"{mat_path}: no `annotations` variable (found {sorted(k for k in mat if not k.startswith('__'))})")
  annotations = np.atleast_1d(mat["annotations"])
  names = annotations.dtype.names or ()
  for field in ("relative_im_path", "class"):
    if field not in names:
      raise ValueError(f"{mat_path}: `annotations` has no field {field!r} (fields: {names})")
  by_split = {"train": [], "test": []}
  for n, entry in enumerate(annotations):
    rel = str(entry["relative_im_path"])
    try:
      class_id = int(entry["class"])
    except (TypeError, ValueError):
      raise ValueError(f"{mat_path}: annotations[{n}].class {entry['class']!r} is not an integer") from None
    if not 1 <= class_id <= 196:
      raise ValueError(f"{mat_path}: annotations[{n}].class = {class_id}, expected 1..196")
    split = "train" if class_id <= 98 else "test"
    by_split[split].append((folder / rel, None, class_id, pathlib.PurePosixPath(rel).stem, None,
                            f"{mat_path.name}:annotations[{n}]"))
  plans = {}
  for split, entries in by_split.items():
    _check_images_exist(entries, f"cars196/{split}")
    plans[split] = _plan(entries, f"cars196/{split} ({mat_path})")
  return plans


# ---------------------------------------------------------------------------------------------
# CUB-200-2011.


def parse_cub200(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`images.txt`: `image_id <NNN>.<Name>/<file>.jpg`; class = NNN; train = 1-100."""
  listing = _require_file(folder / "images.txt", "download CUB_200_2011")
  by_split = {"train": [], "test": []}
  for lineno, line in _read_lines(listing):
    image_id, rel = _fields(listing, lineno, line, 2, "image_id <NNN>.<Class>/<file>.jpg")
    match = re.fullmatch(r"(\d+)\.[^/]+/[^/]+", rel)
    if not match:
      raise ValueError(f"{listing}:{lineno}: path {rel!r} is not `<NNN>.<Class>/<file>`")
    class_id = int(match.group(1))
    if not 1 <= class_id <= 200:
      raise ValueError(f"{listing}:{lineno}: class {class_id}, expected 1..200")
    split = "train" if class_id <= 100 else "test"
    by_split[split].append((folder / "images" / rel, None, class_id, image_id, None,
                            f"{listing.name}:{lineno}"))
  plans = {}
  for split, entries in by_split.items():
    _check_images_exist(entries, f"cub200/{split}")
    plans[split] = _plan(entries, f"cub200/{split} ({listing})")
  return plans


# ---------------------------------------------------------------------------------------------
# Omniglot.

OMNIGLOT_SPLITS = {"train": "images_background", "test": "images_evaluation"}
_OMNIGLOT_MEMBER = re.compile(r"(images_\w+)/([^/]+)/(character\d+)/([^/]+\.png)")


def parse_omniglot(folder: pathlib.Path) -> dict[str, SplitPlan]:
  """`images_{background,evaluation}.zip`; class = `<Alphabet>/character<NN>`, super = alphabet."""
  plans = {}
  for split, stem in OMNIGLOT_SPLITS.items():
    archive = _require_file(folder / f"{stem}.zip", "run with download=True or copy the archive")
    try:
      with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if not m.endswith("/")]
    except zipfile.BadZipFile as e:
      raise ValueError(f"{archive}: not a valid zip archive ({e})") from e
    entries = []
    for member in members:
      if not member.lower().endswith(".png"):
        continue
      match = _OMNIGLOT_MEMBER.fullmatch(member)
      if not match or match.group(1) != stem:
        raise ValueError(f"{archive}: member {member!r} is not `{stem}/<Alphabet>/character<NN>/<file>.png`")
      _, alphabet, character, _ = match.groups()
      entries.append((archive, member, f"{alphabet}/{character}", member, alphabet,
                      f"{archive.name}:{member}"))
    plans[split] = _plan(entries, f"omniglot/{split} ({archive})")
  return plans


# ---------------------------------------------------------------------------------------------
# A user's folder-per-class tree or CSV.


def _parse_tree(tree: pathlib.Path, what: str) -> SplitPlan:
  entries = []
  classes = sorted(p for p in tree.iterdir() if p.is_dir())
  if not classes:
    raise ValueError(f"{what}: {tree} has no class sub-folders")
  for class_dir in classes:
    images = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
      raise ValueError(f"{what}: class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for p in images:
      rel = p.relative_to(tree).as_posix()
      entries.append((p, None, class_dir.name, rel, None, rel))
  return _plan(entries, what)


def _parse_csv(listing: pathlib.Path, what: str) -> SplitPlan:
  entries = []
  with open(listing, encoding="utf-8", newline="") as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      if not row or not "".join(row).strip():
        continue
      if lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
        continue
      if len(row) != 2 or not row[0].strip() or not row[1].strip():
        raise ValueError(f"{listing}:{lineno}: malformed row {row!r}, expected `path,label`")
      rel, label = row[0].strip(), row[1].strip()
      entries.append((listing.parent / rel, None, label, rel, None, f"{listing.name}:{lineno}"))
  _check_images_exist(entries, what)
  return _plan(entries, what)


def parse_folder(folder: pathlib.Path, split: str) -> dict[str, SplitPlan]:
  """A CSV file `path,label`, `<folder>/<split>.csv`, or `<folder>/<split>/<class>/<image>`.

  Args:
    folder: a CSV file (then `split` only names the result) or a folder holding `<split>.csv`
      or `<split>/`.
    split: the split to read.
  """
  what = f"folder/{split}"
  if folder.is_file():
    return {split: _parse_csv(folder, what)}
  if (folder / f"{split}.csv").is_file():
    return {split: _parse_csv(folder / f"{split}.csv", what)}
  if (folder / split).is_dir():
    return {split: _parse_tree(folder / split, what)}
  raise FileNotFoundError(
      f"{what}: neither {folder / (split + '.csv')} nor the folder {folder / split} exists "
      "(give `path=` a CSV `path,label` file or a folder of `<split>/<class>/<image>`)")


Parser = Callable[..., dict[str, SplitPlan]]
PARSERS: dict[str, Parser] = {
    "sop": parse_sop,
    "inat2018": parse_inat2018,
    "vehicleid": parse_vehicleid,
    "cars196": parse_cars196,
    "cub200": parse_cub200,
    "omniglot": parse_omniglot,
}
