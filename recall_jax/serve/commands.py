"""The `search` and `export` programs of `recall_jax.main`: a trained checkpoint put to use.

Both restore only the parameters of the checkpoint named by `latest`, `best` or a step number
(`checkpointing.restore_params`); nothing of the training data is read.
"""

from __future__ import annotations

import pathlib
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


def search_folder(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = "latest",
                  *, gallery_dir: str | None, query: str | None, top_k: int = 10,
                  output: str | None = None) -> search_lib.Results:
  """Searches every image under `gallery_dir` for the query image(s); prints and writes results.

  The gallery's embeddings are cached in `<workdir>/search_cache`, keyed by the files and the
  parameters, and reused while neither changes. Writes the results as JSON (default
  `<workdir>/search_results.json`) and a PNG grid beside it (same name, `.png`).

  Args:
    c: the run's config.
    workdir: the run folder.
    which: 'latest', 'best' or a step number.
    gallery_dir: the folder searched (any layout and depth; undecodable files are skipped).
    query: one image or a folder of images.
    top_k: neighbours per query.
    output: the JSON file to write.

  Returns:
    `{query path: [{"path": ..., "score": ...}, ...]}`.

  Raises:
    ConfigError: a missing `gallery_dir` / `query` argument, `top_k` < 1, a bad checkpoint name.
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
  model, variables, step = modes.restore_variables(c, workdir, which)
  embed_fn = experiment_lib.make_embed_fn(model, {k: v for k, v in variables.items()
                                                  if k != "params"})(variables["params"])
  transform = gallery_lib.ImageTransform(c.data.image_size, c.data.resize_size, c.data.channels)
  gallery = gallery_lib.embed_gallery(
      embed_fn, gallery_dir, model_id=gallery_lib.params_fingerprint(variables),
      transform=transform, cache_dir=workdir / "search_cache", batch_size=c.data.eval_batch_size)
  results = search_lib.search_gallery(embed_fn, gallery, query, transform=transform, top_k=top_k,
                                      batch_size=c.data.eval_batch_size)
  print(search_lib.format_results(results))
  source = "read from the cache" if gallery.from_cache else "embedded"
  print(f"gallery {gallery_dir}: {len(gallery.relative_paths)} images {source} (checkpoint "
        f"{which}, step {step}); skipped {len(gallery.skipped)} files that are not images"
        + (f" ({', '.join(gallery.skipped[:5])}{', ...' if len(gallery.skipped) > 5 else ''})"
           if gallery.skipped else ""))
  json_path = pathlib.Path(output) if output else workdir / "search_results.json"
  search_lib.write_json(results, json_path)
  grid_path = search_lib.results_grid(results, json_path.with_suffix(".png"), transform=transform)
  print(f"wrote {json_path} and {grid_path}")
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
    ConfigError / MissingFileError: a bad checkpoint name or no such checkpoint.
  """
  config_lib.validate(c)
  model, variables, step = modes.restore_variables(c, workdir, which)
  path = pathlib.Path(output) if output else pathlib.Path(workdir) / "embedder.bin"
  size = c.data.image_size
  exported = export_lib.export_embedder(lambda v, x: model.apply(v, x, train=False), variables,
                                        image_shape=(size, size, c.data.channels), path=path)
  batch = ("any batch size" if export_lib.has_symbolic_batch(exported)
           else f"batches of {exported.in_avals[0].shape[0]}")
  print(f"wrote the embedder of checkpoint {which} (step {step}) to {path}: uint8 images "
        f"({size}, {size}, {c.data.channels}), {batch}, for {', '.join(exported.platforms)}")
  return path
