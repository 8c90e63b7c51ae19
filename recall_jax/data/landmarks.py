"""Landmark retrieval data in the official layouts: the revisited benchmarks and distractors.

Evaluation (`load_revisited`, `RevisitedSource`, `read_distractors`):
  <root>/roxford5k/gnd_roxford5k.pkl (or .mat) + jpg/<name>.jpg     4,993 images, 70 queries
  <root>/rparis6k/gnd_rparis6k.pkl (or .mat)   + jpg/<name>.jpg     6,322 images, 70 queries
  <root>/revisitop1m/revisitop1m.txt           + jpg/<listed path>  1,001,001 distractors
The ground truth holds `imlist` (database names), `qimlist` (query names) and `gnd`, one entry per
query with 0-based database indices `easy`, `hard`, `junk` and the query's box `bbx` = (x1, y1,
x2, y2) in pixels. Queries are not part of the database, and a query image is cropped to its box at
full resolution before any resizing (the protocol's rule); database images are used whole. A box
reaching past its image is cropped as the reference code crops (PIL `crop`: the outside is black)
and counted in a warning; a box with no pixel in its image, or under `MIN_BOX_SIDE` pixels on a
side, is refused when the benchmark is opened, before any work. Pickles
are read with `safe_pickle` (no code can run); the `.mat` files with scipy (1-based indices there).

The landmark training sets (Google Landmarks v1 / v2-clean, SfM-120k) are datasets like the
others: their parsers are in `parsing.py`, their specs in `registry.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

from recall_jax.data import paths
from recall_jax.data import safe_pickle
from recall_jax.data import source as source_lib
from recall_jax.errors import ConfigError, DataError, MissingFileError

# Folder under the data root holding each dataset.
LANDMARK_FOLDERS = {
    "roxford5k": "roxford5k",
    "rparis6k": "rparis6k",
    "revisitop1m": "revisitop1m",
}
# (database images, queries) of the official revisited benchmarks.
REVISITED_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
REVISITOP1M_SIZE = 1_001_001
# SHA-256 of the official annotation files, by file name. A file listed here is checked at load
# and a mismatch warned about; a file not listed is not checked. Values go here only once they are
# taken from the official files themselves (see docs/landmarks.md).
KNOWN_SHA256: dict[str, str] = {}

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Query boxes narrower or lower than this (in pixels) are refused: nothing to describe.
MIN_BOX_SIDE = 8


@dataclasses.dataclass(frozen=True)
class RevisitedDataset:
  """A revisited benchmark: database images, cropped queries and the ground truth.

  Attributes:
    name: `roxford5k` or `rparis6k`.
    database_files: (N,) image paths in ground-truth order (database index i is file i).
    query_files: (Q,) image paths of the queries (whole images; crop with `bbx`).
    query_boxes: (Q, 4) float64 boxes (x1, y1, x2, y2) in pixels.
    gnd: Q dicts with int64 arrays 'easy', 'hard', 'junk' (0-based database indices) and the
      float64 (4,) 'bbx': what `revisited_metrics` takes.
  """
  name: str
  database_files: list[pathlib.Path]
  query_files: list[pathlib.Path]
  query_boxes: np.ndarray
  gnd: list[dict[str, np.ndarray]]


def sha256_of(path: str | os.PathLike[str]) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256(path: str | os.PathLike[str],
                 known: Mapping[str, str] | None = None) -> bool | None:
  """Compares a file's SHA-256 with the recorded value for its name; warns on a mismatch.

  Args:
    path: the file.
    known: file name -> expected hex digest (default `KNOWN_SHA256`).

  Returns:
    True (matches), False (mismatch, warned) or None (no value recorded for this name).
  """
  known = KNOWN_SHA256 if known is None else known
  path = pathlib.Path(path)
  expected = known.get(path.name)
  if expected is None:
    return None
  actual = sha256_of(path)
  if actual != expected.lower():
    warnings.warn(f"{path}: SHA-256 {actual} differs from the official file's {expected}; "
                  "results may not be comparable with published ones", stacklevel=2)
    return False
  return True


# ---------------------------------------------------------------------------------------------
# Revisited Oxford and Paris.


def _index_array(value: Any, what: str, offset: int) -> np.ndarray:
  array = np.asarray([] if value is None else value).ravel()
  if array.size == 0:
    return np.zeros(0, np.int64)
  # MATLAB stores indices as doubles.
  integral = array.dtype.kind in "iu" or (array.dtype.kind == "f"
                                           and bool(np.all(array == np.round(array))))
  if not integral:
    raise DataError(f"{what} must hold integer indices, got {array.dtype}")
  return array.astype(np.int64) - offset


def _names(value: Any, what: str) -> list[str]:
  if isinstance(value, np.ndarray):
    value = value.ravel().tolist()
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(v, str) or (isinstance(v, np.ndarray) and v.dtype.kind == "U") for v in value):
    raise DataError(f"{what} must be a list of image names")
  return [str(v if isinstance(v, str) else "".join(v.ravel().tolist())) for v in value]


def _from_mat(path: pathlib.Path) -> dict[str, Any]:
  """The `.mat` ground truth as the pickle holds it (1-based indices made 0-based)."""
  import scipy.io  # Only the .mat variant needs scipy.

  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
  except Exception as e:
    raise DataError(f"{path}: not a readable MATLAB file: {e}") from e
  missing = [k for k in ("imlist", "qimlist", "gnd") if k not in mat]
  if missing:
    raise DataError(f"{path}: no variable(s) {missing}")
  gnd = []
  for entry in np.atleast_1d(mat["gnd"]):
    fields = entry.dtype.names or ()
    gnd.append({key: (entry[key] if key in fields else None)
                for key in ("easy", "hard", "junk", "bbx")})
  return {"imlist": mat["imlist"], "qimlist": mat["qimlist"], "gnd": gnd}


def read_ground_truth(path: str | os.PathLike[str]) -> tuple[list[str], list[str], list[dict]]:
  """Reads `gnd_<name>.pkl` (plain-data unpickler) or `gnd_<name>.mat` (scipy).

  Args:
    path: the ground-truth file.

  Returns:
    (imlist, qimlist, gnd): database names, query names, and per query a dict of int64 0-based
    'easy', 'hard', 'junk' arrays and the float64 (4,) 'bbx'.

  Raises:
    MissingFileError: no such file.
    UnsafePickleError: the pickle imports anything.
    DataError: missing keys, malformed lists, indices outside the database.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"{path} not found")
  check_sha256(path)
  offset = 1 if path.suffix == ".mat" else 0
  if path.suffix == ".mat":
    raw = _from_mat(path)
  else:
    raw = safe_pickle.load(path)
    if not isinstance(raw, dict):
      raise DataError(f"{path}: expected a dict with 'imlist', 'qimlist', 'gnd', got "
                      f"{type(raw).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
      raise DataError(f"{path}: no key(s) {missing} (keys: {sorted(map(str, raw))})")
  imlist = _names(raw["imlist"], f"{path}: imlist")
  qimlist = _names(raw["qimlist"], f"{path}: qimlist")
  entries = list(raw["gnd"]) if not isinstance(raw["gnd"], dict) else None
  if entries is None or len(entries) != len(qimlist):
    raise DataError(f"{path}: gnd must be a list with one entry per query ({len(qimlist)})")
  gnd = []
  for q, entry in enumerate(entries):
    what = f"{path}: gnd[{q}]"
    if not isinstance(entry, dict):
      raise DataError(f"{what} must be a dict, got {type(entry).__name__}")
    missing = [k for k in ("easy", "hard", "junk", "bbx") if k not in entry]
    if missing:
      raise DataError(f"{what} has no {missing}")
    lists = {k: _index_array(entry[k], f"{what}['{k}']", offset) for k in ("easy", "hard", "junk")}
    for key, values in lists.items():
      if values.size and (values.min() < 0 or values.max() >= len(imlist)):
        raise DataError(f"{what}['{key}'] holds an index outside the {len(imlist)} database images")
    gnd.append({**lists, "bbx": _box(entry["bbx"], f"{what}['bbx']")})
  return imlist, qimlist, gnd


def _box(value: Any, what: str) -> np.ndarray:
  """A float64 (4,) box (x1, y1, x2, y2) of numbers, at least `MIN_BOX_SIDE` on each side."""
  raw = np.asarray(value)
  if raw.dtype.kind not in "iuf" or raw.size != 4:
    raise DataError(f"{what} must be 4 numbers (x1, y1, x2, y2), got {value!r}")
  box = raw.astype(np.float64).ravel()
  if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
    raise DataError(f"{what} must be (x1, y1, x2, y2) with x1 < x2, y1 < y2, got {value!r}")
  width, height = (int(round(box[2])) - int(round(box[0])), int(round(box[3])) - int(round(box[1])))
  if min(width, height) < MIN_BOX_SIDE:
    raise DataError(f"{what} {tuple(box.tolist())} is too small: {width} x {height} pixels, "
                    f"under {MIN_BOX_SIDE} on a side")
  return box


def _image_file(folder: pathlib.Path, name: str) -> pathlib.Path:
  """`<folder>/<name>`, with `.jpg` added to a name without an image suffix."""
  return folder / (name if name.lower().endswith(_IMAGE_SUFFIXES) else name + ".jpg")


def _require_images(files: Sequence[pathlib.Path], what: str) -> None:
  missing = [f for f in files if not f.is_file()]
  if missing:
    raise MissingFileError(f"{what}: {len(missing)} of {len(files)} images are missing, first "
                           f"{missing[0]}")


def _check_size(what: str, actual: tuple[int, ...], expected: tuple[int, ...] | None,
                names: str) -> None:
  if expected is not None and tuple(actual) != tuple(expected):
    raise DataError(f"{what}: found {names} {actual}, the official files have {tuple(expected)} "
                    "(incomplete or different files; pass expected_sizes to override)")


def load_revisited(name: str, *, data_root: str | os.PathLike[str] | None = None,
                   path: str | os.PathLike[str] | None = None,
                   expected_sizes: tuple[int, int] | None | bool = True) -> RevisitedDataset:
  """Opens R-Oxford or R-Paris: the ground truth, and the paths of every image (all must exist).

  Args:
    name: `roxford5k` or `rparis6k`.
    data_root: the data root (see `paths.data_root`).
    path: the dataset folder; default `<data root>/<name>`.
    expected_sizes: (database images, queries) to check; True (default) checks the official sizes
      (4,993 / 6,322 images and 70 queries), None or False checks nothing.

  Returns:
    The `RevisitedDataset`.

  Raises:
    ConfigError: unknown name.
    MissingFileError: no ground-truth file (`gnd_<name>.pkl` or `.mat`) or missing images.
    DataError: malformed ground truth, or sizes other than expected.
  """
  if name not in REVISITED_SIZES:
    raise ConfigError(f"unknown revisited dataset {name!r}; expected one of "
                      f"{sorted(REVISITED_SIZES)}")
  folder = (pathlib.Path(path).expanduser() if path
            else paths.data_root(data_root) / LANDMARK_FOLDERS[name])
  candidates = [folder / f"gnd_{name}.pkl", folder / f"gnd_{name}.mat"]
  gnd_file = next((c for c in candidates if c.is_file()), None)
  if gnd_file is None:
    raise MissingFileError(f"{name}: neither {candidates[0]} nor {candidates[1]} exists (download "
                           "the revisited annotation and the images into that folder)")
  imlist, qimlist, gnd = read_ground_truth(gnd_file)
  if expected_sizes is True:
    expected_sizes = REVISITED_SIZES[name]
  _check_size(f"{name} ({gnd_file})", (len(imlist), len(qimlist)), expected_sizes or None,
              "(database images, queries) =")
  images = folder / "jpg"
  database_files = [_image_file(images, n) for n in imlist]
  query_files = [_image_file(images, n) for n in qimlist]
  _require_images(database_files + query_files, f"{name} ({images})")
  boxes = np.stack([g["bbx"] for g in gnd]) if gnd else np.zeros((0, 4))
  _check_query_boxes(name, query_files, boxes)
  return RevisitedDataset(name, database_files, query_files, boxes, gnd)


def _box_overlap(box: Sequence[float], width: int, height: int) -> str:
  """'inside', 'partly' (reaches past the image) or 'outside' (no pixel of the image)."""
  x1, y1, x2, y2 = (int(round(float(v))) for v in box)
  if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
    return "outside"
  return "inside" if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height else "partly"


def _check_query_boxes(name: str, files: Sequence[pathlib.Path], boxes: np.ndarray) -> None:
  """Refuses a box with no pixel in its image; warns with the count of boxes reaching past it.

  Reads only the images' headers, so that a bad box stops the run before any work.
  """
  partly = 0
  for file, box in zip(files, boxes):
    try:
      with PIL.Image.open(file) as image:
        width, height = image.size
    except Exception as e:  # PIL raises many types for broken files.
      raise DataError(f"{file}: unreadable image ({type(e).__name__}: {e})") from e
    overlap = _box_overlap(box, width, height)
    if overlap == "outside":
      raise DataError(f"{name}: the query box {tuple(box.tolist())} of {file.name} lies outside "
                      f"its {width}x{height} image")
    partly += overlap == "partly"
  if partly:
    warnings.warn(f"{name}: {partly} of {len(files)} query boxes reach past their image; they are "
                  "cropped as the reference code crops (PIL: the outside is black)", stacklevel=3)


def crop_box(image: PIL.Image.Image, box: Sequence[float]) -> PIL.Image.Image:
  """`PIL.Image.crop` to (x1, y1, x2, y2), as the reference code crops: the box is rounded to
  whole pixels and what lies outside the image is black.

  Raises:
    DataError: the box holds no pixel of the image.
  """
  if _box_overlap(box, image.width, image.height) == "outside":
    raise DataError(f"box {tuple(box)} lies outside the {image.width}x{image.height} image")
  return image.crop(tuple(float(v) for v in box))


class RevisitedSource:
  """The queries or the database of a revisited benchmark as a loader `Source`.

  Records are `{'image': encoded bytes, 'label': index, 'id': image name}`. Database records are
  the files' bytes; a query record is its image cropped to the box at full resolution, encoded as
  PNG (lossless), so the loader's resizing only ever sees the crop.
  """

  def __init__(self, dataset: RevisitedDataset, part: str):
    if part not in ("queries", "database"):
      raise ValueError(f"part must be 'queries' or 'database', got {part!r}")
    self.name, self.split = dataset.name, part
    self._files = dataset.query_files if part == "queries" else dataset.database_files
    self._boxes = dataset.query_boxes if part == "queries" else None
    self.labels = np.arange(len(self._files), dtype=np.int64)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = source_lib.check_index(index, len(self))
    file = self._files[index]
    data = file.read_bytes()
    if self._boxes is not None:
      try:
        with PIL.Image.open(io.BytesIO(data)) as image:
          crop = crop_box(image.convert("RGB"), self._boxes[index])
      except DataError as e:
        raise DataError(f"{file}: {e}") from None
      except Exception as e:  # PIL raises many types for broken files.
        raise DataError(f"{file}: unreadable image ({type(e).__name__}: {e})") from e
      out = io.BytesIO()
      crop.save(out, format="PNG")
      data = out.getvalue()
    return {"image": data, "label": index, "id": file.stem}


def read_distractors(*, data_root: str | os.PathLike[str] | None = None,
                     path: str | os.PathLike[str] | None = None,
                     expected_size: int | None = REVISITOP1M_SIZE,
                     check_images: bool = True) -> list[pathlib.Path]:
  """The R1M distractor images listed in `revisitop1m.txt`, in list order.

  Args:
    data_root: the data root.
    path: the folder holding `revisitop1m.txt` and `jpg/`; default `<data root>/revisitop1m`.
    expected_size: the number of listed images to check (None: no check).
    check_images: check that every listed image exists (a million file lookups).

  Returns:
    The image paths: `jpg/<line>`, `.jpg` added to a line without an image suffix.

  Raises:
    MissingFileError: no list, or listed images missing.
    DataError: a count other than expected.
  """
  folder = (pathlib.Path(path).expanduser() if path
            else paths.data_root(data_root) / LANDMARK_FOLDERS["revisitop1m"])
  listing = folder / "revisitop1m.txt"
  if not listing.is_file():
    raise MissingFileError(f"{listing} not found (download the revisitop1m image list and images)")
  with open(listing, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  _check_size(str(listing), (len(names),), None if expected_size is None else (expected_size,),
              "images")
  files = [_image_file(folder / "jpg", n) for n in names]
  if check_images:
    _require_images(files, f"revisitop1m ({folder / 'jpg'})")
  return files


class DistractorSource:
  """R1M distractors as a loader `Source`: `{'image': file bytes, 'label': index, 'id': name}`."""

  def __init__(self, files: Sequence[pathlib.Path]):
    self.name, self.split = "revisitop1m", "database"
    self._files = list(files)
    self.labels = np.arange(len(self._files), dtype=np.int64)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = source_lib.check_index(index, len(self))
    return {"image": self._files[index].read_bytes(), "label": index,
            "id": self._files[index].stem}
