"""Everything a training run is built from, made from its config: one typed `Experiment`.

`make_experiment(config)` prepares the data (sources, sampler), the model and its frozen
variables, the loss, the optimizer and schedule, the mesh, the compiled-on-first-call train step
and the evaluator. It holds no training state: `init_state(experiment)` makes step 0's, a
checkpoint gives a resumed run's. The smaller `make_*` pieces serve programs that need only some
of it (evaluating or embedding with a checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import evaluation
from recall_jax import losses
from recall_jax import models
from recall_jax import simix as simix_lib
from recall_jax.data.source import LabelledSource
from recall_jax.train import cross_batch_memory
from recall_jax.train import landmarks
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import sharding
from recall_jax.train import train_step as train_step_lib

PyTree = Any
LossFn = Callable[..., jax.Array]


class EvalSet(NamedTuple):
  """The sources of one evaluated set.

  Attributes:
    database: the split searched (leave-one-out: also the queries; otherwise the gallery).
    queries: the query split, or None for leave-one-out.
  """

  database: LabelledSource
  queries: LabelledSource | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A training run's building blocks (no state: see `init_state`).

  Attributes:
    config: the (validated) config it was built from.
    train_source: the training records (held in memory, turned, as the config asks).
    sampler: the m-per-class batch sampler over `train_source`.
    eval_sets: evaluated set name -> its sources (`EvalSet`).
    model: the backbone + head.
    frozen: the model's non-trainable variable collections (frozen BatchNorm statistics).
    initial_params: step 0's parameters (fresh or pretrained, before head centring), held on the
      host so that no device keeps a copy while training.
    loss_fn: `loss_fn(embeddings, labels[, rng]) -> scalar` on a global batch.
    loss_uses_rng: whether `loss_fn` takes the step's key (SiMix).
    optimizer: the optax transformation.
    schedule: step -> learning rate.
    mesh: the data mesh over every device.
    train_step: `train_step(state, images, labels, rng) -> (state, metrics)`, data parallel.
    warmup_train_step: the same with `loss.warmup_name`'s loss (compiled separately), used for
      the first `loss.warmup_steps` steps; None without a warm-up loss.
    evaluator: embeds and scores `eval_sets` for given parameters.
    steps_per_epoch: sampler steps per epoch.
    total_steps: steps of the whole run (`epochs`, capped by `max_steps`).
    bucket_plan: with `data.aspect_buckets`, each aspect bucket's training slots per process and
      step (`data.BucketPlan`); None otherwise.
    initial_loss_params: step 0's parameters of a loss that has some (proxies), on the host;
      None otherwise.
    loss_optimizer: the optax transformation of the loss's parameters; None without.
  """

  config: ml_collections.ConfigDict
  train_source: LabelledSource
  sampler: data.MPerClassSampler
  eval_sets: dict[str, EvalSet]
  model: nn.Module
  frozen: dict[str, PyTree]
  initial_params: PyTree
  loss_fn: LossFn
  loss_uses_rng: bool
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: Mesh
  train_step: Callable[..., tuple[train_step_lib.TrainState, dict[str, jax.Array]]]
  evaluator: evaluation.Evaluator | evaluation.RevisitedEvaluator
  steps_per_epoch: int
  total_steps: int
  warmup_train_step: Callable[..., Any] | None = None
  bucket_plan: data.BucketPlan | None = None
  initial_loss_params: PyTree = None
  loss_optimizer: optax.GradientTransformation | None = None

  def train_step_at(self, step: int) -> tuple[str, Callable[..., Any]]:
    """The loss name and train step used for update `step` (0-based): the warm-up loss's for
    the first `loss.warmup_steps`, then the main one's (by step number, so a resumed run
    continues exactly)."""
    if self.warmup_train_step is not None and step < self.config.loss.warmup_steps:
      return self.config.loss.warmup_name, self.warmup_train_step
    return self.config.loss.name, self.train_step


def make_loss_fn(c: ml_collections.ConfigDict, name: str | None = None) -> tuple[LossFn, bool]:
  """A loss as `loss_fn(embeddings, labels[, rng]) -> scalar` for the train step.

  The loss gets the keywords of its own config section (`loss.<name>`). Batches hold exactly
  `samples_per_class` images per class, so static sizes are known: each query has m - 1
  positives, plus m (m - 1) / 2 virtual ones per class with SiMix (the main loss only).
  A loss with learned parameters takes them third (`loss_fn(embeddings, labels, params)`).
  With a cross-batch memory (`loss.memory_size` M > 0, the main loss only) it is the loss's
  query/database form, `loss_fn(embeddings, labels, database, database_labels, *,
  database_valid)`, whose queries have at most m + M - 1 positives.

  Args:
    c: the config.
    name: the loss (`loss.warmup_name`, say); default `loss.name`.

  Returns:
    (loss_fn, uses_rng): uses_rng is True when SiMix draws mixing weights from the step's key.
  """
  name = name or c.loss.name
  spec = losses.loss_spec(name)
  loss = spec.load()
  kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in c.loss[name].items()}
  m = c.samples_per_class
  if name == c.loss.name and c.loss.get("memory_size", 0):
    loss = spec.load_database_form()
    if spec.takes_layout:
      kwargs["max_positives"] = m + c.loss.memory_size - 1
    return functools.partial(loss, **kwargs), False
  # The batch layout fixes the losses' static sizes (positive slots, SiMix pairs); SiMix goes
  # with the main loss only.
  if not c.simix or name != c.loss.name:
    if spec.takes_layout:
      kwargs["samples_per_class"] = m
    return functools.partial(loss, **kwargs), False
  kwargs["samples_per_class"] = simix_lib.samples_per_class_after_simix(m)

  def loss_with_simix(embeddings, labels, rng):
    mixed, mixed_labels = simix_lib.simix(embeddings, labels, rng, samples_per_class=m)
    return loss(mixed, mixed_labels, **kwargs)

  return loss_with_simix, True


def make_model(c: ml_collections.ConfigDict) -> nn.Module:
  """The configured backbone + head (`model.head` / `model.whiten` where set, for ResNets)."""
  heads = {"head": c.model.head} if c.model.get("head") else {}
  model = models.get_model(c.model.name, embedding_dim=c.model.embedding_dim,
                           dtype=jnp.dtype(c.model.dtype), image_size=c.data.image_size, **heads)
  if getattr(model, "head", None) == "landmark" and not c.model.get("whiten", True):
    model = model.clone(whiten=False)
  return model


def make_variables(c: ml_collections.ConfigDict, model: nn.Module) -> dict[str, PyTree]:
  """Fresh variables, with the pretrained weights loaded when the config names them."""
  variables = models.init_variables(model, jax.random.key(c.seed), c.data.image_size,
                                    channels=c.data.channels)
  if c.model.pretrained:
    variables = models.load_pretrained(c.model.name, variables, c.model.pretrained)
  if c.model.get("whitening_init"):
    variables = models.load_whitening(variables, c.model.whitening_init)
  return variables


def make_source(c: ml_collections.ConfigDict, split: str, *,
                max_images: int | None = None) -> LabelledSource:
  """One split of the configured dataset (its first `max_images` records when given)."""
  source = data.load_split(c.data.name, split, data_root=c.data.root, path=c.data.path,
                           download=c.data.download)
  return data.FirstN(source, max_images) if max_images else source


def make_train_source(c: ml_collections.ConfigDict, *, progress: bool = True) -> LabelledSource:
  """The training split, held in memory and turned as the config asks."""
  source = make_source(c, c.data.train_split)
  if c.data.in_memory:
    source = data.InMemorySource(
        source, decode_channels=c.data.channels if c.data.decode_once else None,
        progress=progress)
  if c.data.rotated_classes > 1:
    source = data.RotatedClasses(source, c.data.rotated_classes)
  return source


def make_eval_sets(c: ml_collections.ConfigDict) -> dict[str, EvalSet]:
  """The evaluated sets (`config.evaluated_sets`), each cut to `data.max_eval_images`."""
  load = functools.partial(make_source, c, max_images=c.data.max_eval_images)
  if c.data.query_split and c.data.gallery_split:
    return {c.data.query_split: EvalSet(load(c.data.gallery_split), load(c.data.query_split))}
  return {split: EvalSet(load(split)) for split in c.data.test_splits}


def make_eval_batches(c: ml_collections.ConfigDict, source: LabelledSource) -> Callable[[], Any]:
  """A zero-argument callable returning a fresh evaluation loader over `source`."""
  return lambda: data.make_eval_loader(
      source, image_size=c.data.image_size, resize_size=c.data.resize_size,
      batch_size=c.data.eval_batch_size, channels=c.data.channels)


def make_embed_fn(model: nn.Module, frozen: dict[str, PyTree], *, bucketed: bool = False
                  ) -> Callable[[PyTree], Callable[[jax.Array], jax.Array]]:
  """params -> `embed_fn(images) -> embeddings` in inference mode (one jitted function).

  With `bucketed`, the images' last channel is the pixels' validity mask (`data.aspect_buckets`).
  """
  def apply(params, images):
    images, mask = landmarks.model_inputs(images, bucketed=bucketed)
    return model.apply({"params": params, **frozen}, images, train=False, **mask)

  apply = jax.jit(apply)
  return lambda params: functools.partial(apply, params)


def make_evaluator(c: ml_collections.ConfigDict, embed_fn_for: Callable[[PyTree], Any],
                   eval_sets: dict[str, EvalSet], *, log_fn: Callable[[str], Any] | None,
                   progress: bool = True) -> evaluation.Evaluator:
  """The evaluator of `eval_sets` with the configured cut-offs and protocols."""
  splits = {name: (make_eval_batches(c, s.database) if s.queries is None else
                   evaluation.QueryGallery(queries=make_eval_batches(c, s.queries),
                                           gallery=make_eval_batches(c, s.database)))
            for name, s in eval_sets.items()}
  return evaluation.Evaluator(embed_fn_for, splits, c.data.name,
                              k_values=config_lib.eval_k_values(c), reid_protocol=c.eval.reid,
                              log_fn=log_fn, progress=progress)


def make_experiment(c: ml_collections.ConfigDict, *, log_fn: Callable[[str], Any] | None = print,
                    progress: bool = True) -> Experiment:
  """Builds every part of a training run from a validated config (prepares the data).

  Args:
    c: the config (`config.validate` first: problems are reported before data is prepared).
    log_fn: receives the evaluator's one-line summaries; None: silent.
    progress: show progress bars (reading into memory, embedding).
  """
  train_source = make_train_source(c, progress=progress)
  eval_sets = make_eval_sets(c)
  sampler = data.MPerClassSampler(train_source.labels, c.batch_size, c.samples_per_class,
                                  seed=c.seed)
  total_steps = c.epochs * sampler.steps_per_epoch
  if c.max_steps:
    total_steps = min(total_steps, c.max_steps)
  model = make_model(c)
  variables = make_variables(c, model)
  params = variables.pop("params")
  optimizer, schedule = optimizer_lib.make_optimizer(c, sampler.steps_per_epoch)
  mesh = sharding.data_mesh()
  loss_fn, loss_uses_rng = make_loss_fn(c)

  def embed_fn(params, images, rng):
    rngs = {} if rng is None else {"dropout": rng}
    # Whole-image batches carry the pixels' validity mask as their last channel.
    images, mask = landmarks.model_inputs(images, bucketed=bool(c.data.get("aspect_buckets")))
    return model.apply({"params": params, **variables}, images, train=True, rngs=rngs, **mask)

  # Each device embeds `chunk_size` of its own rows at a time; the loss sees the global batch.
  # The CPU backend runs the chunks as straight-line code keeping their activations (see
  # megabatch_value_and_grad); accelerators keep the memory-flat two-pass loop.
  # Whole images come in aspect buckets whose chunks the step cuts within each bucket.
  bucketed = bool(c.data.get("aspect_buckets"))

  def make_step(loss_fn, loss_uses_rng, **loss_state):
    return sharding.make_sharded_train_step(
        embed_fn, loss_fn, optimizer, mesh, chunk_size_per_device=c.chunk_size,
        loss_uses_rng=loss_uses_rng, keep_activations=jax.default_backend() == "cpu",
        bucketed=bucketed, **loss_state)

  # The main loss's own parameters (their own optimizer) and its cross-batch memory; the
  # warm-up loss has neither and leaves them as they are.
  spec = losses.loss_spec(c.loss.name)
  loss_optimizer = (optimizer_lib.loss_param_optimizer(c, sampler.steps_per_epoch)
                    if spec.parameters else None)
  train_step = make_step(loss_fn, loss_uses_rng, loss_has_params=spec.parameters is not None,
                         loss_optimizer=loss_optimizer,
                         with_memory=bool(c.loss.get("memory_size", 0)),
                         memory_start_step=c.loss.get("memory_start_step", 0))
  # One compiled step per loss: the switch after the warm-up is a different function, not a
  # traced branch (which would run both losses' code at every step).
  warmup_train_step = (make_step(*make_loss_fn(c, c.loss.warmup_name))
                       if c.loss.warmup_name and c.loss.warmup_steps > 0 else None)
  if c.eval.get("datasets"):
    evaluator = landmarks.make_revisited_evaluator(c, model, variables, log_fn=log_fn,
                                                   progress=progress)
  else:
    evaluator = make_evaluator(c, make_embed_fn(model, variables), eval_sets, log_fn=log_fn,
                               progress=progress)
  return Experiment(c, train_source, sampler, eval_sets, model, variables,
                    jax.device_get(params), loss_fn, loss_uses_rng, optimizer, schedule, mesh,
                    train_step, evaluator, sampler.steps_per_epoch, total_steps,
                    warmup_train_step=warmup_train_step,
                    bucket_plan=make_bucket_plan(c, train_source, sampler) if bucketed else None,
                    initial_loss_params=make_loss_params(c, train_source),
                    loss_optimizer=loss_optimizer)


def make_loss_params(c: ml_collections.ConfigDict, train_source: LabelledSource) -> PyTree:
  """Step 0's parameters of the main loss, one row per training class (C = largest label + 1),
  initialised as its spec says (the seed's own stream); None for a loss without."""
  spec = losses.loss_spec(c.loss.name)
  if spec.parameters is None:
    return None
  num_classes = int(np.max(np.asarray(train_source.labels))) + 1
  key = jax.random.fold_in(jax.random.key(c.seed), _LOSS_PARAMS_STREAM)
  return jax.device_get(spec.load_parameters_init()(key, num_classes, c.model.embedding_dim))


# Folded into the seed's key for the loss's parameters, apart from the model's initialisation.
_LOSS_PARAMS_STREAM = 0x10557


def make_bucket_plan(c: ml_collections.ConfigDict, train_source: LabelledSource,
                     sampler: data.MPerClassSampler) -> data.BucketPlan:
  """Each aspect bucket's training slots per process and step, from the first batches' images.

  Every process reads the same (global) batches, so all compute the same plan.
  """
  return data.estimate_bucket_plan(
      train_source, sampler, image_size=c.data.image_size, num_buckets=c.data.aspect_buckets,
      chunk_rows=c.chunk_size * jax.local_device_count(), process_count=jax.process_count(),
      margin=c.data.bucket_margin)


def first_batch_images(experiment: Experiment) -> jax.Array:
  """The images of training batch 0 (as the training loop will see them)."""
  c = experiment.config
  with contextlib.closing(data.make_train_loader(
      experiment.train_source, experiment.sampler, image_size=c.data.image_size, seed=c.seed,
      num_steps=1, channels=c.data.channels, crop_scale=tuple(c.data.crop_scale),
      flip=c.data.flip)) as first:
    return next(first)["image"]


def init_state(experiment: Experiment, *, center_head: bool = False) -> train_step_lib.TrainState:
  """Step 0's state, replicated over the mesh.

  Args:
    experiment: the run's building blocks.
    center_head: centre the embedding head on the first training batch
      (`models.center_embedding_head`); only meaningful for a run that starts at step 0.
  """
  params = experiment.initial_params
  if center_head:
    variables = {"params": params, **experiment.frozen}
    variables = models.center_embedding_head(experiment.model, variables,
                                             first_batch_images(experiment))
    params = variables["params"]
  c = experiment.config
  memory = (cross_batch_memory.init(c.loss.memory_size, c.model.embedding_dim)
            if c.loss.get("memory_size", 0) else None)
  return sharding.make_sharded_state(params, experiment.optimizer, experiment.mesh,
                                     loss_params=experiment.initial_loss_params,
                                     loss_optimizer=experiment.loss_optimizer, memory=memory)
