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
- `learn_whitening_file(c, workdir, which, output)`: `--mode whiten`, a whitening (learned from
  positive pairs, or PCA) of the training split's descriptors in the space it will be applied
  to (`eval.whitening_target`): the evaluation's descriptors for `eval.whitening`, or the
  single-scale GeM before the FC for `model.whitening_init`; the `.npz` records that space.
"""

from __future__ import annotations

import dataclasses
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
from recall_jax import config_checks
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
      num_buckets=max(int(c.data.aspect_buckets), 1), channels=c.data.channels,
      upscale=bool(c.eval.get("upscale", False)), max_pixels=c.data.max_image_pixels)


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
    MissingFileError / DataError: an unreadable or non-finite `eval.whitening` file.
    ConfigError: an `eval.whitening` of another width than the descriptors.
  """
  embed_fn = make_describe_fn(c, model, frozen)(params)
  if c.eval.whitening:
    whitening = whitening_lib.load_whitening(c.eval.whitening)
    _check_whitening_width(c, model, whitening)
    embed_fn = landmark_evaluator.whitened_embed_fn(embed_fn, whitening)
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


def _check_whitening_width(c: ml_collections.ConfigDict, model,
                           whitening: whitening_lib.Whitening) -> None:
  """Refuses, before any work, an `eval.whitening` whose input width is not the model's output."""
  side = 64
  x = jax.numpy.zeros((1, side, side, c.data.channels), jax.numpy.float32)
  mask = jax.numpy.ones((1, side, side), bool)
  width = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), x, mask=mask, train=False)[0]).shape[-1]
  if whitening.projection.shape[1] != width:
    raise errors.ConfigError(f"eval.whitening {c.eval.whitening} whitens "
                             f"{whitening.projection.shape[1]}-d descriptors, the model describes "
                             f"with {width}")


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
  whitening = None
  if c.eval.whitening:
    whitening = whitening_lib.load_whitening(c.eval.whitening)
    _check_whitening_width(c, model, whitening)
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


WHITENING_KINDS = config_checks.WHITENING_KINDS


def learn_whitening_file(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                         which: str = "latest", output: str | None = None, *,
                         kind: str | None = None, dim: int | None = None,
                         power: float | None = None, pairs_per_class: int = 10) -> pathlib.Path:
  """`--mode whiten`: learns a whitening from the training split's descriptors.

  The descriptors are those the whitening will be applied to (`eval.whitening_target`):
  'eval' (default): the evaluation's own descriptors, `describe_split` without `eval.whitening`
  (the model's output at `eval.scales`), for `eval.whitening`; 'fc_init': the single-scale
  GeM -> L2 output without the whitening FC, for `model.whitening_init`. They are taken of the
  first `data.max_eval_images` training images (all when None). `kind='learned'`: pairs of
  images of the same class (`pairs_from_labels` with the config's `seed`) give `learn_whitening`
  (Radenovic et al.; it needs at least D independent pairs unless `eval.whitening_ridge` > 0);
  `kind='pca'`: `pca_whitening` with eigenvalue `power`. `dim` keeps the leading directions. With
  no checkpoint in `workdir` (or `which='initial'`), the config's initial (pretrained) weights
  are used: what `model.whitening_init` expects before training. The file records its space
  (`config_checks.whitening_space` and the input width `dim_in`), checked where it is used.

  Args:
    kind, dim, power: override `eval.whitening_kind`, `eval.whitening_dim`,
      `eval.whitening_power` (None: the config's).

  Returns:
    The `.npz` written (`output`, default `<workdir>/whitening.npz`).

  Raises:
    ConfigError: an unknown kind or target.
    DataError: no class with two images, too few pairs for the descriptor dimension, or
      descriptors spanning fewer than `dim` dimensions (PCA).
  """
  kind = c.eval.get("whitening_kind", "learned") if kind is None else kind
  dim = c.eval.get("whitening_dim") if dim is None else dim
  power = c.eval.get("whitening_power", 0.5) if power is None else power
  target = c.eval.get("whitening_target", "eval")
  if kind not in WHITENING_KINDS:
    raise errors.ConfigError(f"whitening kind must be one of {WHITENING_KINDS}, got {kind!r}")
  # The file is learned for the config's target, so a file named there is not applied here.
  c = c.copy_and_resolve_references()
  c.eval.whitening = None
  if target == "fc_init":
    c.model.whitening_init = None
  config_lib.validate(c)
  model = components.make_model(c)
  variables = components.make_variables(c, model)
  if which == "latest" and (not pathlib.Path(workdir).is_dir() or checkpointing.make_checkpoints(
      workdir, read_only=True).latest.latest_step() is None):
    reporting.say(f"no checkpoint in {workdir}: whitening the initial weights' descriptors")
    which = "initial"
  params, _ = _params(workdir, which, variables.pop("params"))
  source = components.make_source(c, c.data.train_split, max_images=c.data.max_eval_images)
  described = c
  if target == "fc_init":
    model = model.clone(whiten=False) if getattr(model, "head", None) == "landmark" else model
    described = c.copy_and_resolve_references()
    described.eval.scales = (1.0,)
  descriptors, labels, _ = describe_split(described, model, variables, params, source,
                                          desc="describe training images")
  descriptors = np.asarray(descriptors, np.float64)
  if kind == "pca":
    whitening = whitening_lib.pca_whitening(descriptors, power=power, dim=dim)
    what = f"a PCA whitening (power {power})"
  else:
    queries, positives = whitening_lib.pairs_from_labels(
        labels, pairs_per_class=pairs_per_class, seed=c.seed)
    whitening = whitening_lib.learn_whitening(descriptors, queries, positives, dim=dim,
                                              ridge=c.eval.get("whitening_ridge", 0.0))
    what = f"a whitening learned from {len(queries)} pairs"
  space = {**config_checks.whitening_space(c, target), "target": target,
           "dim_in": int(descriptors.shape[1])}
  whitening = dataclasses.replace(whitening, space=space)
  path = pathlib.Path(output) if output else pathlib.Path(workdir) / "whitening.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  whitening_lib.save_whitening(path, whitening)
  use = "model.whitening_init" if target == "fc_init" else "eval.whitening"
  print(f"wrote {what} of {len(descriptors)} {descriptors.shape[1]}-d descriptors of "
        f"{c.data.name}/{c.data.train_split} for {use} to {path}")
  return path
