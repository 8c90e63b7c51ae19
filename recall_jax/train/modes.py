"""Programs that use a trained checkpoint: evaluate it, or write a split's embeddings.

Serves both tasks through the config's evaluation protocol (`eval_protocols.make_protocol`):
Recall@k on the evaluated sets, or the revisited benchmarks. Both programs restore only the
parameters of the checkpoint named by `latest`, `best` or a step number
(`checkpointing.restore_params`, which checks the checkpoint against its checksums); nothing of
the training split is read. They only read the workdir (evaluation appends its rows to
metrics.jsonl): a missing one is reported, not created.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax.train import checkpointing
from recall_jax.train import components
from recall_jax.train import eval_protocols
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
  model = components.make_model(c)
  variables = components.make_variables(c, model)
  template = variables.pop("params")
  params, step = checkpointing.restore_params(workdir, which, template, log_fn=reporting.say)
  return model, {"params": params, **variables}, step


def evaluate_checkpoint(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                        which: str = "latest") -> dict[str, Any]:
  """`--mode eval`: scores a checkpoint ('latest', 'best' or a step) with the config's protocol.

  Prints the metrics table and appends them as a `"kind": "eval"` row at the checkpoint's step
  to `<workdir>/metrics.jsonl` (process 0). The evaluated data (and the benchmarks' files) are
  checked before the checkpoint is read.

  Returns:
    The metrics, {'<set>/<metric>': value}.

  Raises:
    ConfigError / MissingFileError / DataError: a bad config or `which`, missing data, a
      missing workdir or checkpoint.
  """
  config_lib.validate(c)
  checkpointing.check_name(which)
  protocol = eval_protocols.make_protocol(c)
  model = components.make_model(c)
  frozen = components.make_variables(c, model)
  template = frozen.pop("params")
  evaluator = protocol.make_evaluator(model, frozen, log_fn=print)
  workdir = workdir_lib.require_existing_run(workdir)
  params, step = checkpointing.restore_params(workdir, which, template, log_fn=reporting.say)
  metrics = evaluator(params, step).metrics
  if jax.process_index() == 0:
    writer = reporting.MetricWriter(workdir)
    writer.write(step, "eval", metrics)
    writer.close()
  print(f"checkpoint {which} (step {step}):\n{reporting.format_table(metrics)}")
  return metrics


def embed_split(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = "latest",
                *, split: str | None = None, output: str | None = None) -> pathlib.Path:
  """Writes the descriptors the config's protocol scores, of a whole split, to an .npz.

  Recall@k configs: the model's output on the evaluation transform; revisited configs: whole
  images at `eval.scales`, whitened by `eval.whitening` (`landmarks.describe_split`).

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
  source = components.make_source(c, split)
  model, variables, _ = restore_variables(c, workdir, which)
  params = variables.pop("params")
  protocol = eval_protocols.make_protocol(c)
  embeddings, labels, indices = protocol.describe_split(model, variables, params, source,
                                                        desc=f"embed {split}")
  ids = np.array([str(source[int(i)]["id"]) for i in indices])
  path = pathlib.Path(output) if output else workdir / f"{split}_embeddings.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, embeddings=embeddings, labels=labels, ids=ids)
  print(f"wrote {len(labels)} embeddings of {c.data.name}/{split} to {path}")
  return path
