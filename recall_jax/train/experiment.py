"""Everything a training run is built from, made from its config: one typed `Experiment`.

Serves both tasks. `make_experiment(config)` picks the task's input layout (`layouts`: square
crops or whole images in aspect buckets) and evaluation protocol (`eval_protocols`: Recall@k or
the revisited benchmarks) once, then prepares the data (sources, sampler), the model and its
frozen variables, the loss, the optimizer and schedule, the mesh, the compiled-on-first-call
train step and the evaluator. It holds no training state: `init_state(experiment)` makes step
0's, a checkpoint gives a resumed run's. The checkpoint programs build only the pieces they need
(`components`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from recall_jax import batch_layout
from recall_jax import data
from recall_jax import evaluation
from recall_jax import losses
from recall_jax import models
from recall_jax import parallel
from recall_jax import simix as simix_lib
from recall_jax.data.source import LabelledSource
from recall_jax.train import components
from recall_jax.train import cross_batch_memory
from recall_jax.train import eval_protocols
from recall_jax.train import layouts
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import sharded_step
from recall_jax.train import train_step as train_step_lib
# Re-exported: programs that build only some of a run's pieces (serve, benchmarks) name them
# here as well as in `components`.
from recall_jax.train.components import make_embed_fn  # noqa: F401
from recall_jax.train.components import make_model  # noqa: F401
from recall_jax.train.components import make_source
from recall_jax.train.components import make_variables  # noqa: F401

PyTree = Any
LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A training run's building blocks (no state: see `init_state`).

  Attributes:
    config: the (validated) config it was built from.
    layout: the input layout (`layouts.SquareCrops` or `layouts.AspectBuckets`).
    protocol: the evaluation protocol (`eval_protocols.RecallProtocol` or `RevisitedProtocol`).
    train_source: the training records (held in memory, turned, as the config asks).
    sampler: the m-per-class batch sampler over `train_source`.
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
    evaluator: `evaluator(params, step)`: the protocol's metrics and embeddings.
    steps_per_epoch: sampler steps per epoch.
    total_steps: steps of the whole run (`epochs`, capped by `max_steps`).
    warmup_train_step: the same with `loss.warmup_name`'s loss (compiled separately), used for
      the first `loss.warmup_steps` steps; None without a warm-up loss.
    initial_loss_params: step 0's parameters of a loss that has some (proxies), on the host;
      None otherwise.
    loss_optimizer: the optax transformation of the loss's parameters; None without.
  """

  config: ml_collections.ConfigDict
  layout: layouts.SquareCrops
  protocol: eval_protocols.RecallProtocol | eval_protocols.RevisitedProtocol
  train_source: LabelledSource
  sampler: data.MPerClassSampler
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
  initial_loss_params: PyTree = None
  loss_optimizer: optax.GradientTransformation | None = None

  @property
  def eval_sets(self) -> dict[str, eval_protocols.EvalSet]:
    """The protocol's evaluated sets from the dataset's splits (empty for the benchmarks)."""
    return self.protocol.eval_sets

  @property
  def bucket_plan(self) -> data.BucketPlan | None:
    """The layout's aspect-bucket plan (None for square crops)."""
    return self.layout.bucket_plan

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
  database_valid)`, whose queries have at most (m - 1) + m ceil(M / B) positives
  (`batch_layout.memory_max_positives`).

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
      kwargs["max_positives"] = batch_layout.memory_max_positives(m, c.batch_size,
                                                                  c.loss.memory_size)
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


def make_experiment(c: ml_collections.ConfigDict, *, log_fn: Callable[[str], Any] | None = print,
                    progress: bool = True) -> Experiment:
  """Builds every part of a training run from a validated config (prepares the data).

  Args:
    c: the config (`config.validate` first: problems are reported before data is prepared).
    log_fn: receives the evaluator's one-line summaries; None: silent.
    progress: show progress bars (reading into memory, embedding).
  """
  train_source = make_train_source(c, progress=progress)
  protocol = eval_protocols.make_protocol(c)
  sampler = data.MPerClassSampler(train_source.labels, c.batch_size, c.samples_per_class,
                                  seed=c.seed)
  layout = layouts.make_layout(c, train_source, sampler)
  total_steps = c.epochs * sampler.steps_per_epoch
  if c.max_steps:
    total_steps = min(total_steps, c.max_steps)
  model = components.make_model(c)
  variables = components.make_variables(c, model)
  params = variables.pop("params")
  optimizer, schedule = optimizer_lib.make_optimizer(c, sampler.steps_per_epoch)
  mesh = parallel.data_mesh()
  loss_fn, loss_uses_rng = make_loss_fn(c)
  embed_fn = layout.train_embed_fn(model, variables)

  # Each device embeds `chunk_size` of its own rows at a time; the loss sees the global batch.
  # The CPU backend runs the chunks as straight-line code keeping their activations (see
  # megabatch_value_and_grad); accelerators keep the memory-flat two-pass loop.
  def make_step(loss_fn, loss_uses_rng, **loss_state):
    return sharded_step.make_sharded_train_step(
        embed_fn, loss_fn, optimizer, mesh, chunk_size_per_device=c.chunk_size,
        loss_uses_rng=loss_uses_rng, keep_activations=jax.default_backend() == "cpu",
        **loss_state)

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
  evaluator = protocol.make_evaluator(model, variables, log_fn=log_fn, progress=progress)
  return Experiment(c, layout, protocol, train_source, sampler, model, variables,
                    jax.device_get(params), loss_fn, loss_uses_rng, optimizer, schedule, mesh,
                    train_step, evaluator, sampler.steps_per_epoch, total_steps,
                    warmup_train_step=warmup_train_step,
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
    variables = models.center_embedding_head(
        experiment.model, variables,
        experiment.layout.first_batch_images(experiment.train_source, experiment.sampler))
    params = variables["params"]
  c = experiment.config
  memory = (cross_batch_memory.init(c.loss.memory_size, c.model.embedding_dim)
            if c.loss.get("memory_size", 0) else None)
  return sharded_step.make_sharded_state(params, experiment.optimizer, experiment.mesh,
                                         loss_params=experiment.initial_loss_params,
                                         loss_optimizer=experiment.loss_optimizer, memory=memory)
