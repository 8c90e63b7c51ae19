"""The `search` and `export` programs of `recall_jax.main`: a trained checkpoint put to use.

Serves both tasks. Both restore only the parameters of the checkpoint named by `latest`, `best` or
a step number (`checkpointing.restore_params`); nothing of the training data is read. Where they
will write (the output file's folder, the gallery cache) is checked before anything is restored or
embedded, so a read-only workdir costs one line, not the embedding of a gallery.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from typing import Any

import ml_collections

from recall_jax import config as config_lib
from recall_jax.errors import ConfigError
from recall_jax.serve import export as export_lib
from recall_jax.serve import gallery as gallery_lib
from recall_jax.serve import search as search_lib
from recall_jax.train import modes
from recall_jax.train import experiment as experiment_lib

PyTree = Any

_log = logging.getLogger(__name__)


def _writable(folder: pathlib.Path) -> bool:
  """Whether files can be created in `folder` (created if missing), by trying."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError:
    return False
  return True


def output_file(output: str | None, default: pathlib.Path) -> pathlib.Path:
  """The file `--output` names (else `default`), checked writable before any work.

  Raises:
    ConfigError: `--output` names a folder, or the file's folder cannot be written.
  """
  path = pathlib.Path(output) if output else default
  if path.is_dir():
    raise ConfigError(f"--output {path} is a folder; name the file to write, e.g. "
                      f"--output={path / default.name}")
  if not _writable(path.parent):
    raise ConfigError(f"cannot write {path}: its folder is not writable; pass --output=FILE in "
                      "a folder you can write")
  return path


def user_cache_dir() -> pathlib.Path:
  """This program's folder in the user's cache folder (`$XDG_CACHE_HOME`, else ~/.cache)."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "recall_jax"


def gallery_cache_dir(cache_dir: str | None, workdir: pathlib.Path) -> pathlib.Path:
  """Where gallery embeddings are cached: `cache_dir` if given, else `<workdir>/search_cache`,
  else (workdir not writable) `search_cache` in the user's cache folder.

  Raises:
    ConfigError: if the chosen folder cannot be written.
  """
  if cache_dir:
    folder = pathlib.Path(cache_dir)
    if not _writable(folder):
      raise ConfigError(f"--cache_dir {folder} is not a folder you can write")
    return folder
  folder = workdir / "search_cache"
  if _writable(folder):
    return folder
  fallback = user_cache_dir() / "search_cache"
  if not _writable(fallback):
    raise ConfigError(f"cannot write the gallery cache to {folder} nor {fallback}; pass "
                      "--cache_dir=DIR")
  _log.warning("workdir %s is not writable: caching gallery embeddings in %s", workdir, fallback)
  return fallback


def search_folder(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = "latest",
                  *, gallery_dir: str | None, query: str | None, top_k: int = 10,
                  output: str | None = None,
                  cache_dir: str | None = None) -> search_lib.Results:
  """Searches every image under `gallery_dir` for the query image(s); prints and writes results.

  The gallery's embeddings are cached (`gallery_cache_dir`: default `<workdir>/search_cache`),
  keyed by the files and the parameters, and reused while neither changes. Writes the results as
  JSON (default `<workdir>/search_results.json`) and a PNG grid beside it (same name, `.png`).
  File names that are not valid UTF-8 are printed with their odd bytes as `\\xNN` escapes and kept
  in the JSON as Python's surrogate escapes (`os.fsencode` gives back the bytes).

  Args:
    c: the run's config.
    workdir: the run folder.
    which: 'latest', 'best' or a step number.
    gallery_dir: the folder searched (any layout and depth; undecodable files are skipped).
    query: one image or a folder of images.
    top_k: neighbours per query.
    output: the JSON file to write.
    cache_dir: where the gallery's embeddings are cached (default: see `gallery_cache_dir`).

  Returns:
    `{query path: [{"path": ..., "score": ...}, ...]}`.

  Raises:
    ConfigError: a missing `gallery_dir` / `query` argument, `top_k` < 1, a bad checkpoint name,
      an output or cache folder that cannot be written.
    MissingFileError: the gallery, a query or the checkpoint does not exist.
    DataError: the gallery or the queries hold no decodable image.
  """
  if not gallery_dir or not query:
    raise ConfigError("--mode search needs --gallery DIR (the images searched) and --query PATH "
                      "(an image or a folder of images)")
  if top_k < 1:
    raise ConfigError(f"--top_k must be >= 1, got {top_k}")
  config_lib.validate(c)
  workdir = pathlib.Path(workdir)
  # Missing inputs are reported before the checkpoint is restored or anything compiles.
  search_lib.query_files(query)
  if not pathlib.Path(gallery_dir).is_dir():
    gallery_lib.scan_files(gallery_dir)  # raises MissingFileError naming the folder
  json_path = output_file(output, workdir / "search_results.json")
  cache_folder = gallery_cache_dir(cache_dir, workdir)
  model, variables, step = modes.restore_variables(c, workdir, which)
  embed_fn = experiment_lib.make_embed_fn(model, {k: v for k, v in variables.items()
                                                  if k != "params"})(variables["params"])
  transform = gallery_lib.ImageTransform(c.data.image_size, c.data.resize_size, c.data.channels,
                                         max_pixels=c.data.max_image_pixels)
  gallery = gallery_lib.embed_gallery(
      embed_fn, gallery_dir, model_id=gallery_lib.params_fingerprint(variables),
      transform=transform, cache_dir=cache_folder, batch_size=c.data.eval_batch_size)
  results = search_lib.search_gallery(embed_fn, gallery, query, transform=transform, top_k=top_k,
                                      batch_size=c.data.eval_batch_size)
  # Written before anything is printed: a console that cannot show a name loses no results.
  search_lib.write_json(results, json_path)
  grid_path = search_lib.results_grid(results, json_path.with_suffix(".png"), transform=transform)
  show = search_lib.printable
  print(show(search_lib.format_results(results)))
  source = "read from the cache" if gallery.from_cache else "embedded"
  skipped = ", ".join(show(s) for s in gallery.skipped[:5])
  print(f"gallery {show(str(gallery_dir))}: {len(gallery.relative_paths)} images {source} "
        f"(checkpoint {which}, step {step}); skipped {len(gallery.skipped)} files that are not "
        "images" + (f" ({skipped}{', ...' if len(gallery.skipped) > 5 else ''})"
                    if gallery.skipped else ""))
  print(f"wrote {show(str(json_path))} and {show(str(grid_path))}")
  return results


def export_checkpoint(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                      which: str = "latest", *, output: str | None = None) -> pathlib.Path:
  """Writes a checkpoint's embedder as a portable `jax.export` file (see `serve.export`).

  Args:
    c: the run's config.
    workdir: the run folder.
    which: 'latest', 'best' or a step number.
    output: the file to write (default `<workdir>/embedder.bin`).

  Returns:
    The path written. It takes uint8 (batch, S, S, C) images after the evaluation transform
    (S = `data.image_size`, C = `data.channels`) and returns L2-normalised embeddings.

  Raises:
    ConfigError / MissingFileError: a bad checkpoint name or no such checkpoint; `output` names a
      folder or a file in a folder that cannot be written (checked before anything is restored).
  """
  config_lib.validate(c)
  path = output_file(output, pathlib.Path(workdir) / "embedder.bin")
  model, variables, step = modes.restore_variables(c, workdir, which)
  size = c.data.image_size
  exported = export_lib.export_embedder(lambda v, x: model.apply(v, x, train=False), variables,
                                        image_shape=(size, size, c.data.channels), path=path)
  batch = ("any batch size" if export_lib.has_symbolic_batch(exported)
           else f"batches of {exported.in_avals[0].shape[0]}")
  print(f"wrote the embedder of checkpoint {which} (step {step}) to {path}: uint8 images "
        f"({size}, {size}, {c.data.channels}), {batch}, for {', '.join(exported.platforms)}")
  return path
