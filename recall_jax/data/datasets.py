"""Prepared dataset splits: a tensorflow-datasets builder writing ArrayRecord files of encoded images.

`load_split(name, split)` parses the official files (see `parsing.py`), checks every image once,
writes all splits of the dataset as ArrayRecord files of the *encoded* image bytes (no
re-encoding, so no TensorFlow is needed) and reads them back with `tfds.data_source`. The labels
of a split are stored in the prepared folder's `metadata.json`, so `source.labels` never touches
an image. Preparation happens once per dataset folder: the prepared copy lives in
`<data root>/prepared/<name>-<fingerprint>/` (or the user cache when the data root is
read-only), where the fingerprint covers the annotation files' sizes and modification times.

Corrupt images: an image PIL cannot open and decode (JPEGs at 1/8 scale, to keep this cheap) is
skipped, and all skipped images of a split are reported in one warning at the end of the
preparation (and kept in the metadata as `skipped`); a class left without any readable image is
an error, so labels stay contiguous and correct.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from recall_jax.data import download as download_lib
from recall_jax.data import parsing
from recall_jax.data import paths

# Bump when the prepared layout or the parsing rules change, so stale copies are not reused.
_PREP_FORMAT = 1

# Folder under the data root holding each dataset by default.
DEFAULT_FOLDERS = {
    "sop": "Stanford_Online_Products",
    "inat2018": "inaturalist2018",
    "vehicleid": "VehicleID_V1.0",
    "cars196": "cars196",
    "cub200": "CUB_200_2011",
    "omniglot": "omniglot",
    "folder": "folder",
}
SPLITS = {
    "sop": ("train", "test"),
    "inat2018": ("train", "test"),
    "vehicleid": tuple(parsing.VEHICLEID_LISTS),
    "cars196": ("train", "test"),
    "cub200": ("train", "test"),
    "omniglot": ("train", "test"),
}
# Omniglot characters are 1-bit strokes: store and decode them as single-channel images.
CHANNELS = {"omniglot": 1}


def check_image(data: bytes) -> str | None:
  """Returns None when PIL can decode `data`, else the reason it cannot.

  JPEGs are decoded at reduced scale (`draft`), which still reads every entropy-coded segment,
  so truncated files are caught at a fraction of the full decode cost.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (64, 64))
      image.load()
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
    return f"{type(e).__name__}: {e}"
  return None


class RecallJaxRetrieval(tfds.core.GeneratorBasedBuilder):
  """Class-disjoint retrieval splits of a benchmark, read from its manually downloaded files."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in DEFAULT_FOLDERS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the benchmark's official files by hand and place them in the manual folder "
      "(`<data root>/<dataset folder>`, see recall_jax.data.DEFAULT_FOLDERS).")

  # tfds locates a checksums file next to the builder's code through `importlib_resources`, which
  # is not installed with it; a manual-download builder has no checksums, so it has no code path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, folder_split: str | None = None, folder_path: str | None = None, **kwargs):
    # A user's `folder` dataset prepares one split, `folder_split`, from `folder_path` (a folder
    # or a CSV file; tfds's manual dir must be a folder).
    self._folder_split, self._folder_path = folder_split, folder_path
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    channels = CHANNELS.get(self.builder_config.name, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.builder_config.name}: encoded images with contiguous class labels.",
        features=tfds.features.FeaturesDict({
            # Encoded bytes are stored as given (JPEG or PNG); decoding happens in the pipeline.
            "image": tfds.features.Image(shape=(None, None, channels)),
            "label": tfds.features.Scalar(np.int64),
            "super_label": tfds.features.Scalar(np.int64),
            "id": tfds.features.Text(),
        }),
        # Records keep generation order, which is what the labels in the metadata index.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name = self.builder_config.name
    folder = pathlib.Path(dl_manager.manual_dir)
    if name == "folder":
      plans = parsing.parse_folder(pathlib.Path(self._folder_path or folder), self._folder_split or "train")
    else:
      plans = parsing.PARSERS[name](folder)
    return {split: self._generate_examples(split, plan) for split, plan in plans.items()}

  def _generate_examples(self, split: str, plan: parsing.SplitPlan) -> Iterator[tuple[int, dict[str, Any]]]:
    archives: dict[pathlib.Path, zipfile.ZipFile] = {}
    labels, supers, skipped = [], [], []
    try:
      for record in plan.records:
        if record.member is None:
          data = record.file.read_bytes()
        else:
          if record.file not in archives:
            archives[record.file] = zipfile.ZipFile(record.file)
          data = archives[record.file].read(record.member)
        problem = check_image(data)
        if problem is not None:
          skipped.append(f"{record.origin} ({problem})")
          continue
        key = len(labels)
        labels.append(record.label)
        supers.append(record.super_label)
        yield key, {"image": data, "label": record.label, "super_label": record.super_label,
                    "id": record.image_id}
    finally:
      for archive in archives.values():
        archive.close()
    present = set(labels)
    lost = [plan.class_names[c] for c in range(len(plan.class_names)) if c not in present]
    if lost:
      raise ValueError(f"{self.builder_config.name}/{split}: every image of class(es) {lost[:5]} "
                       f"is unreadable ({len(skipped)} skipped, first: {skipped[:3]})")
    if skipped:
      warnings.warn(f"{self.builder_config.name}/{split}: skipped {len(skipped)} unreadable "
                    f"image(s) of {len(plan.records)}; first: {skipped[:5]}", stacklevel=2)
    self.info.metadata[split] = {
        "labels": labels,
        "super_labels": supers if plan.super_class_names else None,
        "class_names": plan.class_names,
        "super_class_names": plan.super_class_names,
        "skipped": skipped,
    }


class RetrievalSource:
  """A prepared split: random access to `{'image': bytes, 'label', 'id', 'super_label'}` records.

  Attributes:
    name, split: the dataset and split.
    labels: int64 (N,) contiguous class labels 0..C-1, read from the metadata (no image access).
    super_labels: int64 (N,) super-class labels, or None.
    class_names: the dataset's class names in label order.
    num_classes: C.
    channels: 1 for Omniglot, else 3 (what the images decode to by default).
    skipped: origins of the images skipped as unreadable at preparation.
  """

  def __init__(self, name: str, split: str, prepared_dir: pathlib.Path):
    self.name, self.split, self.prepared_dir = name, split, prepared_dir
    builder = RecallJaxRetrieval(config=name, data_dir=os.fspath(prepared_dir), file_format="array_record")
    meta = builder.info.metadata[split]
    self.labels = np.asarray(meta["labels"], dtype=np.int64)
    self.super_labels = None if meta["super_labels"] is None else np.asarray(meta["super_labels"], np.int64)
    self.class_names: list[str] = meta["class_names"]
    self.super_class_names: list[str] = meta["super_class_names"]
    self.skipped: list[str] = meta["skipped"]
    self.num_classes = len(self.class_names)
    self.channels = CHANNELS.get(name, 3)
    self._source = None

  def _tfds_source(self):
    # Opened lazily so that the object pickles cheaply into grain worker processes.
    if self._source is None:
      self._source = tfds.data_source(
          f"recall_jax_retrieval/{self.name}", split=self.split, data_dir=os.fspath(self.prepared_dir),
          download=False, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return len(self.labels)

  def _convert(self, raw: dict[str, Any]) -> dict[str, Any]:
    out = {"image": raw["image"], "label": int(raw["label"]), "id": raw["id"].decode("utf-8")}
    if self.super_labels is not None:
      out["super_label"] = int(raw["super_label"])
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self.name}/{self.split}: index {index} out of range for {len(self)} records")
    return self._convert(self._tfds_source()[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._convert(r) for r in self._tfds_source().__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return (f"RetrievalSource({self.name}/{self.split}: {len(self)} images, {self.num_classes} classes, "
            f"at {self.prepared_dir})")


def _fingerprint(name: str, folder: pathlib.Path, split: str | None) -> str:
  """Hashes what defines a prepared copy: the dataset, its folder and its annotation files."""
  if name == "folder":
    if folder.is_file():
      files = [folder]
    elif (folder / f"{split}.csv").is_file():
      files = [folder / f"{split}.csv"]
    else:
      files = sorted(p for p in (folder / str(split)).rglob("*") if p.is_file())
  elif name == "omniglot":
    files = [folder / f"{stem}.zip" for stem in parsing.OMNIGLOT_SPLITS.values()]
  else:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".mat")
                   and p.parent in (folder, folder / "train_test_split"))
  stats = [(os.fspath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
  blob = json.dumps([_PREP_FORMAT, name, os.fspath(folder.resolve()), split, stats])
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_split(name: str, split: str, *, data_root: str | os.PathLike[str] | None = None,
               path: str | os.PathLike[str] | None = None, prepared_dir: str | os.PathLike[str] | None = None,
               download: bool = True, url_base: str | None = None) -> RetrievalSource:
  """Prepares (once) and opens one split of a dataset.

  Args:
    name: `sop`, `inat2018`, `vehicleid`, `cars196`, `cub200`, `omniglot` or `folder`.
    split: `train` / `test`; VehicleID has `train`, `test_800`, `test_1600`, `test_2400`; a
      `folder` dataset accepts any name (`<path>/<split>.csv` or `<path>/<split>/`).
    data_root: the data root (see `paths.data_root`).
    path: the dataset folder (or, for `folder`, a CSV file); default `<data root>/<DEFAULT_FOLDERS[name]>`.
    prepared_dir: where prepared copies go; default `<data root>/prepared` or the user cache.
    download: Omniglot only: fetch missing archives from `url_base` (default: the official repository).
    url_base: Omniglot only: the URL folder holding `images_background.zip` / `images_evaluation.zip`.

  Returns:
    The split as a `RetrievalSource`.

  Raises:
    ValueError: unknown dataset or split, malformed annotation files, empty or unreadable classes.
    FileNotFoundError: missing annotation files or images.
  """
  if name not in DEFAULT_FOLDERS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DEFAULT_FOLDERS)}")
  if name in SPLITS and split not in SPLITS[name]:
    raise ValueError(f"Unknown split {split!r} of {name}; expected one of {SPLITS[name]}")
  root = paths.data_root(data_root)
  folder = pathlib.Path(path).expanduser() if path else root / DEFAULT_FOLDERS[name]
  if name == "omniglot":
    download_lib.ensure_omniglot(folder, url_base=url_base, download=download)
  elif not folder.exists():
    raise FileNotFoundError(f"{name}: dataset folder {folder} does not exist (download the official "
                            f"files by hand, or pass path= / set {paths.DATA_ENV_VAR})")
  split_key = split if name == "folder" else None
  target = paths.prepared_root(root, prepared_dir) / f"{name}-{_fingerprint(name, folder, split_key)}"
  builder = RecallJaxRetrieval(config=name, data_dir=os.fspath(target), file_format="array_record",
                               folder_split=split_key, folder_path=os.fspath(folder) if split_key else None)
  manual_dir = folder.parent if folder.is_file() else folder
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return RetrievalSource(name, split, target)
