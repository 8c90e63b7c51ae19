"""Programs that use a trained checkpoint: evaluate it, or write a split's embeddings.

Both restore only the parameters of the checkpoint named by `latest`, `best` or a step number
(`checkpointing.restore_params`, which checks the checkpoint against its checksums); nothing of
the training split is read. They only read the workdir: a missing one is reported, not created.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax import evaluation
from recall_jax.train import checkpointing
from recall_jax.train import experiment as experiment_lib
from recall_jax.train import landmarks
from recall_jax.train import reporting
from recall_jax.train import workdir as workdir_lib

PyTree = Any


def restore_variables(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str
                      ) -> tuple[Any, dict[str, PyTree], int]:
  """The model, its variables with a checkpoint's parameters, and the checkpoint's step.

  Args:
    c: the run's config (model and data keys).
    workdir: the run folder.
    which: 'latest', 'best' or a step number.

  Raises:
    ConfigError / MissingFileError: `which` is malformed or names no checkpoint.
  """
  checkpointing.check_name(which)
  model = experiment_lib.make_model(c)
  variables = experiment_lib.make_variables(c, model)
  template = variables.pop("params")
  params, step = checkpointing.restore_params(workdir, which, template, log_fn=reporting.say)
  return model, {"params": params, **variables}, step


def restore_embed_fn(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str):
  """The inference `embed_fn(images) -> embeddings` of a checkpoint, and its step (as
  `restore_variables`)."""
  model, variables, step = restore_variables(c, workdir, which)
  params = variables.pop("params")
  return experiment_lib.make_embed_fn(model, variables)(params), step


def evaluate_checkpoint(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                        which: str = "latest") -> dict[str, Any]:
  """Evaluates a checkpoint ('latest', 'best' or a step) on the evaluated sets; prints a table.

  Returns:
    The metrics, {'<set>/<metric>': value}.
  """
  if c.eval.get("datasets"):  # The revisited benchmarks: their own table, and metrics.jsonl.
    return landmarks.evaluate_checkpoint(c, workdir, which)
  config_lib.validate(c)
  checkpointing.check_name(which)
  workdir_lib.require_existing_run(workdir)
  eval_sets = experiment_lib.make_eval_sets(c)
  embed_fn, step = restore_embed_fn(c, workdir, which)
  evaluator = experiment_lib.make_evaluator(c, None, eval_sets, log_fn=None)
  metrics = evaluator(embed_fn, step).metrics
  print(f"checkpoint {which} (step {step}):\n{reporting.format_table(metrics)}")
  return metrics


def embed_split(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = "latest",
                *, split: str | None = None, output: str | None = None) -> pathlib.Path:
  """Writes embeddings, labels and image ids of a whole split to an .npz.

  With aspect buckets (landmark configs) these are the descriptors the revisited evaluation
  scores (`landmarks.describe_split`: whole images, `eval.scales`, `eval.whitening`); otherwise
  the model's output on the evaluation transform.

  Args:
    c: the run's config.
    workdir: the run folder.
    which: 'latest', 'best' or a step number.
    split: the split (default: the first evaluated set's database split).
    output: the .npz to write (default `<workdir>/<split>_embeddings.npz`).

  Returns:
    The path written; its keys: embeddings (N, D) float32, labels (N,), ids (N,) str.
  """
  config_lib.validate(c)
  checkpointing.check_name(which)
  workdir = workdir_lib.require_existing_run(workdir)
  split = split or c.data.gallery_split or next(iter(c.data.test_splits), None)
  if split is None:
    raise errors.ConfigError(f"{c.data.name} has no test split to embed by default: name one "
                             "with --split")
  source = experiment_lib.make_source(c, split)
  if c.data.aspect_buckets:  # landmark configs: whole images, the evaluation's descriptors
    model, variables, _ = restore_variables(c, workdir, which)
    params = variables.pop("params")
    embeddings, labels, indices = landmarks.describe_split(
        c, model, variables, params, source, desc=f"embed {split}")
  else:
    embed_fn, _ = restore_embed_fn(c, workdir, which)
    embeddings, labels, indices = evaluation.extract_embeddings(
        embed_fn, experiment_lib.make_eval_batches(c, source)(), desc=f"embed {split}")
  ids = np.array([str(source[int(i)]["id"]) for i in indices])
  path = pathlib.Path(output) if output else workdir / f"{split}_embeddings.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, embeddings=embeddings, labels=labels, ids=ids)
  print(f"wrote {len(labels)} embeddings of {c.data.name}/{split} to {path}")
  return path
