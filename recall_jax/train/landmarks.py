"""Landmark retrieval from a config: descriptors, the revisited evaluator and learned whitening.

Serves the instance-level task (`eval_protocols.RevisitedProtocol` calls it).

- `make_describe_fn(c, model, frozen)`: params -> `describe(images)`, the test descriptor of
  bucketed images (pixel mask in the last channel): the model at each of `eval.scales`,
  combined by `multiscale_descriptors`.
- `describe_split(c, model, frozen, params, source)`: those descriptors of every image of a
  split, whitened by `eval.whitening` as the evaluation does (`--mode embed`).
- `make_revisited_evaluator(c, model, frozen)`: the evaluator of `eval.datasets` (queries cropped
  to their boxes, whole database images, `data.distractors` cached), used by the training loop
  and `--mode eval`.
- `learn_whitening_file(c, workdir, which, output)`: `--mode whiten`, a learned whitening
  from positive pairs of the training split's GeM descriptors, written as `.npz` for
  `model.whitening_init` or `eval.whitening`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import errors
from recall_jax import evaluation
from recall_jax.data import landmarks as landmark_data
from recall_jax.evaluation import landmark_evaluator
from recall_jax.evaluation import multiscale
from recall_jax.evaluation import whitening as whitening_lib
from recall_jax.train import checkpointing
from recall_jax.train import components
from recall_jax.train import reporting

PyTree = Any


def make_describe_fn(c: ml_collections.ConfigDict, model, frozen: dict[str, PyTree]
                     ) -> Callable[[PyTree], Callable[[jax.Array], jax.Array]]:
  """params -> jitted `describe(images)` of bucketed images at the configured scales.

  The scales are combined with GeM's learned p for a landmark head without whitening, else
  with a plain mean (`multiscale_power`); a single scale 1 is the model's output itself.
  """
  scales = tuple(float(s) for s in c.eval.scales)

  @jax.jit
  def describe(params, images, power):
    pixels, extra = components.model_inputs(images, masked=True)
    variables = {"params": params, **frozen}
    apply = lambda x, m: model.apply(variables, x, mask=m, train=False)
    if scales == (1.0,):
      return apply(pixels, extra["mask"])
    return multiscale.multiscale_descriptors(apply, pixels, extra["mask"], scales=scales,
                                             power=power)

  def for_params(params):
    power = multiscale.multiscale_power(model, {"params": params, **frozen})
    return lambda images: describe(params, images, jax.numpy.float32(power))

  return for_params


def _eval_batches(c: ml_collections.ConfigDict, source) -> Callable[[], Any]:
  return lambda: data.make_bucketed_eval_loader(
      source, image_size=c.data.image_size, batch_size=c.data.eval_batch_size,
      num_buckets=max(int(c.data.aspect_buckets), 1), channels=c.data.channels)


def describe_split(c: ml_collections.ConfigDict, model, frozen: dict[str, PyTree], params: PyTree,
                   source, *, desc: str = "describe") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The test descriptors of every image of `source`, as the revisited evaluation computes them.

  Whole images (longer side `data.image_size`) in aspect buckets, `make_describe_fn` at
  `eval.scales`, then the test-time whitening `eval.whitening` when the config names one
  (`landmark_evaluator.whitened_embed_fn`).

  Args:
    c: the config (data, eval and model keys).
    model: the configured model (`components.make_model`).
    frozen: its variables other than `params` (BatchNorm statistics).
    params: the parameters to describe with.
    source: records with 'image' (encoded bytes) and 'label'.
    desc: the progress bar's label.

  Returns:
    float32 (N, D) descriptors, (N,) labels and (N,) source indices, in source order.

  Raises:
    MissingFileError / DataError: an unreadable `eval.whitening` file.
  """
  embed_fn = make_describe_fn(c, model, frozen)(params)
  if c.eval.whitening:
    embed_fn = landmark_evaluator.whitened_embed_fn(
        embed_fn, whitening_lib.load_whitening(c.eval.whitening))
  return evaluation.extract_embeddings(embed_fn, _eval_batches(c, source)(), desc=desc)


def _file_stamp(path: str | None) -> str:
  if not path:
    return "none"
  stat = os.stat(os.path.expanduser(path))
  return f"{os.path.abspath(os.path.expanduser(path))}:{stat.st_size}:{stat.st_mtime_ns}"


def _distractors(c: ml_collections.ConfigDict) -> landmark_evaluator.DistractorSet | None:
  if not c.data.distractors:
    return None
  files = landmark_data.read_distractors(
      data_root=c.data.root,
      expected_size=landmark_data.REVISITOP1M_SIZE if c.data.check_sizes else None)
  root = data.data_root(c.data.root)
  cache_dir = (pathlib.Path(c.eval.cache_dir).expanduser() if c.eval.cache_dir
               else data.prepared_root(root) / "embeddings")
  listing = root / landmark_data.LANDMARK_FOLDERS["revisitop1m"] / "revisitop1m.txt"
  fingerprint = json.dumps({
      "model": c.model.name, "head": c.model.head, "whiten": c.model.whiten,
      "embedding_dim": c.model.embedding_dim, "dtype": c.model.dtype,
      "image_size": c.data.image_size, "aspect_buckets": c.data.aspect_buckets,
      "channels": c.data.channels, "scales": list(c.eval.scales),
      "whitening": _file_stamp(c.eval.whitening), "list": _file_stamp(os.fspath(listing))})
  return landmark_evaluator.DistractorSet(
      c.data.distractors, _eval_batches(c, landmark_data.DistractorSource(files)), len(files),
      cache_dir / f"{c.data.distractors}-{c.model.name}-{c.data.image_size}px.npy", fingerprint)


def make_revisited_evaluator(c: ml_collections.ConfigDict, model, frozen: dict[str, PyTree], *,
                             log_fn: Callable[[str], Any] | None = print,
                             progress: bool = True) -> landmark_evaluator.RevisitedEvaluator:
  """The evaluator of `eval.datasets` for a config (reads the ground truth and lists the images).

  Raises:
    MissingFileError / DataError: missing or malformed benchmark files; other than the official
      sizes unless `data.check_sizes` is False.
  """
  sets = {}
  for name in c.eval.datasets:
    dataset = landmark_data.load_revisited(name, data_root=c.data.root,
                                           expected_sizes=bool(c.data.check_sizes))
    sets[name] = landmark_evaluator.RevisitedSet(
        queries=_eval_batches(c, landmark_data.RevisitedSource(dataset, "queries")),
        database=_eval_batches(c, landmark_data.RevisitedSource(dataset, "database")),
        gnd=dataset.gnd)
  whitening = whitening_lib.load_whitening(c.eval.whitening) if c.eval.whitening else None
  return landmark_evaluator.RevisitedEvaluator(
      make_describe_fn(c, model, frozen), sets, distractors=_distractors(c), whitening=whitening,
      protocols=tuple(c.eval.protocols), qe_k=c.eval.qe_k, qe_alpha=c.eval.qe_alpha,
      dba_k=c.eval.dba_k, dba_alpha=c.eval.dba_alpha, log_fn=log_fn, progress=progress)


def _params(workdir: str | pathlib.Path, which: str,
            initial: PyTree) -> tuple[PyTree, int | None]:
  """The checkpoint's parameters, or `initial` (the config's) when `which` is 'initial'."""
  if which == "initial":
    return initial, None
  return checkpointing.restore_params(workdir, which, initial)


WHITENING_KINDS = ("learned", "pca")


def learn_whitening_file(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                         which: str = "latest", output: str | None = None, *,
                         kind: str = "learned", dim: int | None = None, power: float = 0.5,
                         pairs_per_class: int = 10) -> pathlib.Path:
  """`--mode whiten`: learns a whitening from the training split's GeM descriptors.

  The descriptors are the model's GeM -> L2 output without the whitening FC (single scale), of
  the first `data.max_eval_images` training images (all when None). `kind='learned'`: pairs of
  images of the same class (`pairs_from_labels` with the config's `seed`) give `learn_whitening`
  (Radenovic et al.; it needs at least D independent pairs); `kind='pca'`: `pca_whitening` with
  eigenvalue `power`. `dim` keeps the leading directions (e.g. the FC's output size). With no
  checkpoint in `workdir` (or `which='initial'`), the config's initial (pretrained) weights are
  used: the whitening that `model.whitening_init` expects before training.

  Returns:
    The `.npz` written (`output`, default `<workdir>/whitening.npz`).

  Raises:
    ConfigError: an unknown kind.
    DataError: no class with two images, too few pairs for the descriptor dimension, or
      descriptors spanning fewer than `dim` dimensions (PCA).
  """
  if kind not in WHITENING_KINDS:
    raise errors.ConfigError(f"whitening kind must be one of {WHITENING_KINDS}, got {kind!r}")
  config_lib.validate(c)
  model = components.make_model(c)
  variables = components.make_variables(c, model)
  if which == "latest" and (not pathlib.Path(workdir).is_dir() or checkpointing.make_checkpoints(
      workdir, read_only=True).latest.latest_step() is None):
    reporting.say(f"no checkpoint in {workdir}: whitening the initial weights' descriptors")
    which = "initial"
  params, _ = _params(workdir, which, variables.pop("params"))
  gem_only = model.clone(whiten=False) if getattr(model, "head", None) == "landmark" else model
  single = c.copy_and_resolve_references()
  single.eval.scales = (1.0,)
  source = components.make_source(c, c.data.train_split, max_images=c.data.max_eval_images)
  describe = make_describe_fn(single, gem_only, variables)(params)
  descriptors, labels, _ = evaluation.extract_embeddings(
      describe, _eval_batches(c, source)(), desc="describe training images")
  descriptors = np.asarray(descriptors, np.float64)
  if kind == "pca":
    whitening = whitening_lib.pca_whitening(descriptors, power=power, dim=dim)
    what = f"a PCA whitening (power {power})"
  else:
    queries, positives = whitening_lib.pairs_from_labels(
        labels, pairs_per_class=pairs_per_class, seed=c.seed)
    whitening = whitening_lib.learn_whitening(descriptors, queries, positives, dim=dim)
    what = f"a whitening learned from {len(queries)} pairs"
  path = pathlib.Path(output) if output else pathlib.Path(workdir) / "whitening.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  whitening_lib.save_whitening(path, whitening)
  print(f"wrote {what} of {len(descriptors)} {descriptors.shape[1]}-d descriptors of "
        f"{c.data.name}/{c.data.train_split} to {path}")
  return path
