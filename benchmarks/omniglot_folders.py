"""Omniglot folders the benchmarks train on: a validation split and a class subset.

Both are built from the official archives without any trainer option: each writes a folder with
an `images_background.zip` (the training split) and an `images_evaluation.zip` (the evaluation
split, members under `images_evaluation/`) and is used as `config.data.path` for the `omniglot`
dataset. Folders are written once (archives renamed into place when complete) and reused.
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np


def _character(info: zipfile.ZipInfo) -> str:
  # images_background/<Alphabet>/character<NN>/<file>.png -> <Alphabet>/character<NN>
  return "/".join(info.filename.split("/")[1:3])


def _pngs(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
  return [i for i in archive.infolist() if i.filename.lower().endswith(".png")]


def validation_folder(background_zip: pathlib.Path, every: int, cache: pathlib.Path
                      ) -> tuple[pathlib.Path, list[str]]:
  """A folder whose two archives split the background alphabets in training/validation.

  Args:
    background_zip: the official `images_background.zip`.
    every: hold out every `every`-th alphabet (sorted by name, starting with the third): 6 holds
      out 5 of the 30 alphabets (158 characters, 3,160 images).
    cache: parent of the folder.

  Returns:
    (folder usable as `config.data.path`, names of the validation alphabets).
  """
  with zipfile.ZipFile(background_zip) as z:
    infos = _pngs(z)
    alphabets = sorted({i.filename.split("/")[1] for i in infos})
    held_out = alphabets[2::every]
    folder = cache / f"omniglot_val_every{every}"
    if (folder / "images_evaluation.zip").is_file():
      return folder, held_out
    folder.mkdir(parents=True, exist_ok=True)
    partials = {name: folder / f"{name}.zip.partial"
                for name in ("images_background", "images_evaluation")}
    with zipfile.ZipFile(partials["images_background"], "w") as train, \
        zipfile.ZipFile(partials["images_evaluation"], "w") as val:
      for info in infos:
        if info.filename.split("/")[1] in held_out:
          val.writestr("images_evaluation/" + info.filename.split("/", 1)[1], z.read(info))
        else:
          train.writestr(info, z.read(info))
  for name, partial in partials.items():
    partial.rename(folder / f"{name}.zip")  # the evaluation archive last: it marks completion
  return folder, held_out


def class_subset_folder(data_folder: pathlib.Path, fraction: float, seed: int,
                        cache: pathlib.Path) -> pathlib.Path:
  """A folder with Omniglot's archives where the background one keeps `fraction` of the characters.

  Args:
    data_folder: the folder holding the official `images_background.zip` / `images_evaluation.zip`.
    fraction: share of the 964 background characters kept (rounded to a whole number, >= 1).
    seed: which characters (numpy `default_rng(seed)` permutation of the sorted character names).
    cache: parent folder of the subset folders.

  Returns:
    The subset folder; its evaluation archive is a link to the official one.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  folder = cache / f"omniglot_classes{fraction:g}_seed{seed}"
  background = folder / "images_background.zip"
  if background.is_file():
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  source = data_folder / "images_background.zip"
  if not source.is_file():
    raise FileNotFoundError(f"{source} not found: run the demo once (it downloads the archives) or "
                            "set RECALL_JAX_DATA to the folder holding omniglot/")
  with zipfile.ZipFile(source) as z:
    infos = _pngs(z)
    characters = sorted({_character(i) for i in infos})
    keep_count = max(1, round(fraction * len(characters)))
    order = np.random.default_rng(seed).permutation(len(characters))
    keep = {characters[i] for i in order[:keep_count]}
    partial = background.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w") as out:
      for info in infos:
        if _character(info) in keep:
          out.writestr(info, z.read(info))
  partial.rename(background)  # only complete archives are ever reused
  link = folder / "images_evaluation.zip"
  if not link.exists():
    link.symlink_to((data_folder / "images_evaluation.zip").resolve())
  return folder
