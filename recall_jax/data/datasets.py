"""Prepared dataset splits: a tensorflow-datasets builder writing ArrayRecord files of encoded
images.

Serves both tasks. `load_split(name, split)` parses the official files with the dataset's parser
(its spec in `registry.py`; the splits are what the parser returns), checks every image once,
writes all splits of the dataset as ArrayRecord files of the *encoded* image bytes (no
re-encoding, so no TensorFlow is needed) and reads them back as a tfds data source. The labels
of a split are stored in the prepared folder's `metadata.json`, so `source.labels` never touches
an image. Preparation happens once per dataset folder: the prepared copy lives in
`<data root>/prepared/<name>-<fingerprint>/` (or the user cache when the data root is
read-only), where the fingerprint covers the sizes and modification times of the annotation files
the spec names (for a user's `folder` data: every image of the split, whether listed by a tree or
a CSV).

Preparation is atomic: the copy is built in a hidden `.<name>-<fingerprint>.partial-...` folder
beside its final place and renamed into it when complete, so a run killed while preparing leaves
nothing the next run trips over (it removes such leftovers of dead processes on this host). It
shows one progress bar per split and none of tensorflow-datasets' own output.

Corrupt images: an image PIL cannot open and decode (JPEGs at 1/8 scale, to keep this cheap) is
skipped; the skipped images of a split are kept in the metadata (`source.skipped`) and reported in
one warning at every load, not only the first; a class left without any readable image is an
error, so labels stay correct.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import socket
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
import tqdm

from recall_jax.data import parsing
from recall_jax.data import paths
from recall_jax.data import registry
from recall_jax.lazy import load_function
from recall_jax.errors import ConfigError, DataError, MissingFileError

# Bump when the prepared layout or the parsing rules change, so stale copies are not reused.
# 2: no super-class labels; CSV labels normalised; shared query/gallery labels; atomic folders.
_PREP_FORMAT = 2
# Leftover partial folders of another host (or of unknown owner) older than this are removed.
_STALE_PARTIAL_S = 24 * 3600



def _spec(name: str) -> registry.DatasetSpec:
  """The registered dataset `name`; ConfigError naming the registered ones otherwise."""
  spec = registry.dataset_spec(name)
  if spec is None:
    raise ConfigError(f"Unknown dataset {name!r}; expected one of {sorted(registry.DATASETS)}")
  return spec


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
  # The registered datasets; one registered later (a test's, say) gets a config of its own.
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in registry.DATASETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the benchmark's official files by hand and place them in the manual folder "
      "(`<data root>/<dataset folder>`, see recall_jax.data.registry.DATASETS).")

  # tfds locates a checksums file next to the builder's code through `importlib_resources`, which
  # is not installed with it; a manual-download builder has no checksums, so it has no code path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, name: str, plans: dict[str, parsing.SplitPlan] | None = None,
               progress: bool = True, **kwargs):
    # `plans`: the parsed splits to prepare (None when only reading a prepared copy).
    self._plans, self._progress = plans, progress
    config = self.get_builder_config(name) or tfds.core.BuilderConfig(name=name,
                                                                      version=self.VERSION)
    super().__init__(config=config, **kwargs)

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent calls
  # will reuse this data." to stdout; nothing is downloaded here, and our own bar says enough.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    channels = _spec(self.builder_config.name).channels
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.builder_config.name}: encoded images with contiguous class labels.",
        features=tfds.features.FeaturesDict({
            # Encoded bytes are stored as given (JPEG or PNG); decoding happens in the pipeline.
            "image": tfds.features.Image(shape=(None, None, channels)),
            "label": tfds.features.Scalar(np.int64),
            "id": tfds.features.Text(),
        }),
        # Records keep generation order, which is what the labels in the metadata index.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The splits were parsed before preparing (`load_split`).
    return {split: self._generate_examples(split, plan) for split, plan in self._plans.items()}

  def _generate_examples(self, split: str,
                         plan: parsing.SplitPlan) -> Iterator[tuple[int, dict[str, Any]]]:
    archives: dict[pathlib.Path, zipfile.ZipFile] = {}
    labels, skipped = [], []
    what = f"{self.builder_config.name}/{split}"
    bar = tqdm.tqdm(plan.records, desc=f"preparing {what}: {len(plan.records):,} images",
                    unit="img", disable=not self._progress, dynamic_ncols=True)
    try:
      for record in bar:
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
        yield key, {"image": data, "label": record.label, "id": record.image_id}
    finally:
      bar.close()
      for archive in archives.values():
        archive.close()
    lost = sorted({r.label for r in plan.records} - set(labels))
    if lost:
      raise DataError(f"{what}: every image of class(es) {[plan.class_names[c] for c in lost[:5]]} "
                      f"is unreadable ({len(skipped)} skipped, first: {skipped[:3]})")
    self.info.metadata[split] = {
        "labels": labels,
        "class_names": plan.class_names,
        "skipped": skipped,
        "listed": len(plan.records),
    }


class RetrievalSource:
  """A prepared split: random access to `{'image': bytes, 'label': int, 'id': str}` records.

  Attributes:
    name, split: the dataset and split.
    labels: int64 (N,) class labels, read from the metadata (no image access): 0..C-1, where
      a query or gallery split's C counts the classes of both.
    class_names: the dataset's class names in label order.
    num_classes: C.
    channels: the dataset's `channels` (what the images decode to by default).
    skipped: origins (with the reason) of the images skipped as unreadable at preparation.
    listed: images the split lists, `len(source) + len(skipped)`.
  """

  def __init__(self, name: str, split: str, prepared_dir: pathlib.Path):
    self.name, self.split, self.prepared_dir = name, split, prepared_dir
    builder = RecallJaxRetrieval(name=name, data_dir=os.fspath(prepared_dir),
                                 file_format="array_record")
    if split not in builder.info.metadata:
      raise ConfigError(f"Unknown split {split!r} of {name}; expected one of "
                        f"{tuple(builder.info.metadata)}")
    meta = builder.info.metadata[split]
    self.labels = np.asarray(meta["labels"], dtype=np.int64)
    self.class_names: list[str] = meta["class_names"]
    self.skipped: list[str] = meta["skipped"]
    self.listed = int(meta["listed"])
    self.num_classes = len(self.class_names)
    self.channels = _spec(name).channels
    self._source = None

  def _tfds_source(self):
    # Opened lazily so that the object pickles cheaply into grain worker processes.
    if self._source is None:
      builder = RecallJaxRetrieval(name=self.name, data_dir=os.fspath(self.prepared_dir),
                                   file_format="array_record")
      self._source = builder.as_data_source(split=self.split,
                                            decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return len(self.labels)

  def _convert(self, raw: dict[str, Any]) -> dict[str, Any]:
    return {"image": raw["image"], "label": int(raw["label"]), "id": raw["id"].decode("utf-8")}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self.name}/{self.split}: index {index} out of range for {len(self)} "
                       "records")
    return self._convert(self._tfds_source()[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._convert(r) for r in self._tfds_source().__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return (f"RetrievalSource({self.name}/{self.split}: {len(self)} images, "
            f"{self.num_classes} classes, "
            f"at {self.prepared_dir})")


def _fingerprint(spec: registry.DatasetSpec, folder: pathlib.Path,
                 splits: Sequence[str]) -> str:
  """Hashes what defines a prepared copy: the dataset, its folder and the files it is made of."""
  files = spec.fingerprint_files(folder, splits)
  stats = [(os.fspath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
  blob = json.dumps([_PREP_FORMAT, spec.name, os.fspath(folder.resolve()), list(splits), stats])
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _is_prepared(target: pathlib.Path, name: str) -> bool:
  """Whether `target` holds a complete prepared copy (written only by the final rename)."""
  version = str(RecallJaxRetrieval.VERSION)
  return (target / "recall_jax_retrieval" / name / version / "dataset_info.json").is_file()


def _owner_alive(partial: pathlib.Path) -> bool:
  """Whether the process that named `partial` (`...partial-<host>-<pid>-<random>`) may still run."""
  try:
    host, pid = partial.name.rsplit(".partial-", 1)[1].rsplit("-", 2)[:2]
    age = time.time() - partial.stat().st_mtime
  except (IndexError, ValueError, OSError):
    return False
  if host != socket.gethostname():
    return age < _STALE_PARTIAL_S  # Cannot tell across hosts; assume a day is long enough.
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError):
    return True
  return True


def _remove_leftovers(target: pathlib.Path, name: str) -> None:
  """Removes partial copies of `target` whose builder died, and an incomplete `target`."""
  for partial in target.parent.glob(f".{target.name}.partial-*"):
    if not _owner_alive(partial):
      shutil.rmtree(partial, ignore_errors=True)
  if target.exists() and not _is_prepared(target, name):
    # Not written by a completed preparation (a copy from an interrupted older layout, or
    # tampered with): move it out of the way first, so the removal itself is atomic.
    doomed = target.parent / f".{target.name}.partial-removed-0-{uuid.uuid4().hex[:8]}"
    os.replace(target, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Silences tensorflow-datasets' progress bars and logging, restoring both afterwards."""
  # tfds has no public getter for its progress-bar switch; default to "on" if it moves.
  bars_were_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  loggers = [logging.getLogger(n) for n in ("absl", "tensorflow_datasets")]
  levels = [logger.level for logger in loggers]
  tfds.display_progress_bar(False)
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(bars_were_on)
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _prepare(target: pathlib.Path, name: str, folder: pathlib.Path,
             plans: dict[str, parsing.SplitPlan], progress: bool) -> None:
  """Builds the prepared copy in a partial folder beside `target` and renames it into place."""
  target.parent.mkdir(parents=True, exist_ok=True)
  _remove_leftovers(target, name)
  partial = target.parent / (f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}-"
                             f"{uuid.uuid4().hex[:8]}")
  try:
    builder = RecallJaxRetrieval(name=name, plans=plans, data_dir=os.fspath(partial),
                                 file_format="array_record", progress=progress)
    manual_dir = folder.parent if folder.is_file() else folder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    shutil.rmtree(partial / "downloads", ignore_errors=True)  # Empty: nothing is downloaded.
    try:
      os.rename(partial, target)
    except OSError:
      if not _is_prepared(target, name):  # Not another process finishing first: a real failure.
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def _warn_skipped(source: RetrievalSource) -> None:
  if source.skipped:
    warnings.warn(f"{source.name}/{source.split}: skipped {len(source.skipped)} unreadable "
                  f"image(s) of {source.listed}; first: {source.skipped[:5]}", stacklevel=3)


def load_split(name: str, split: str, *, data_root: str | os.PathLike[str] | None = None,
               path: str | os.PathLike[str] | None = None,
               prepared_dir: str | os.PathLike[str] | None = None,
               download: bool = True, url_base: str | None = None,
               label_splits: Sequence[str] | None = None, progress: bool = True) -> RetrievalSource:
  """Prepares (once) and opens one split of a dataset.

  Args:
    name: a registered dataset (`registry.DATASETS`): `sop`, `inat2018`, `vehicleid`,
      `cars196`, `cub200`, `omniglot`, `folder`, or a landmark training set: `gldv2_clean`,
      `gldv1`, `sfm120k` (`val` too).
    split: one the dataset's parser returns: `train` / `test`; VehicleID has `train`,
      `test_800`, `test_1600`, `test_2400`; a `folder` dataset accepts any name
      (`<path>/<split>.csv` or `<path>/<split>/`).
    data_root: the data root (see `paths.data_root`).
    path: the dataset folder (or, for `folder`, a CSV file); default
      `<data root>/<the spec's folder>`.
    prepared_dir: where prepared copies go; default `<data root>/prepared` or the user cache.
    download: Omniglot only: fetch missing archives from `url_base` (default: the official
      repository).
    url_base: Omniglot only: the URL folder holding `images_background.zip` /
      `images_evaluation.zip`.
    label_splits: `folder` only: the splits sharing one label space with `split` (e.g. a query and
      a gallery split), so a class name has the same label in each; they are prepared together.
      Default: `("query", "gallery")` for either of those when both exist, else `split` alone.
    progress: show a progress bar while preparing.

  Returns:
    The split as a `RetrievalSource`. When images were skipped as unreadable, one UserWarning
    says how many, at every load.

  Raises:
    ConfigError: unknown dataset or split; `label_splits` for a dataset other than `folder`.
    DataError: malformed annotation files, empty or unreadable classes.
    MissingFileError: missing annotation files or images.
  """
  spec = _spec(name)
  if label_splits and not spec.user_splits:
    raise ConfigError(f"label_splits applies to `folder` data only, not {name}")
  root = paths.data_root(data_root)
  folder = pathlib.Path(path).expanduser() if path else root / spec.folder
  if spec.fetch is not None:
    load_function(spec.fetch)(folder, url_base=url_base, download=download)
  elif not folder.exists():
    raise MissingFileError(
        f"{name}: dataset folder {folder} does not exist; download the official files by hand"
        + (f" ({spec.official_page})" if spec.official_page else "") + " and pass "
        f"--config.data.path=FOLDER or set {paths.DATA_ENV_VAR} to the folder above it (see "
        "docs/data.md)")
  shared = parsing.label_splits(folder, split, label_splits) if spec.user_splits else ()
  target = paths.prepared_root(root, prepared_dir) / f"{name}-{_fingerprint(spec, folder, shared)}"
  with _quiet_tfds():
    if not _is_prepared(target, name):
      # The splits are what the parser returns: an unknown one is refused before any image is
      # checked or written.
      plans = spec.parse(folder, split, shared)
      if split not in plans:
        raise ConfigError(f"Unknown split {split!r} of {name}; expected one of {tuple(plans)}")
      _prepare(target, name, folder, plans, progress)
    source = RetrievalSource(name, split, target)
  _warn_skipped(source)
  return source
