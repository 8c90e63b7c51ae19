"""The training program: one loop from a config to checkpoints, metrics, plots and evaluations.

`train_and_evaluate(config, workdir)` runs (and resumes) a training run; `evaluate_checkpoint`
and `embed_split` reuse its pieces for the `eval` and `embed` modes of `recall_jax.main`.

A run is a pure function of the config: batch t is `sampler.batch_indices(t)`, its augmentation
is seeded by (seed, t, position) and its PRNG key is `fold_in(key(seed), t)`. A checkpoint holds
the parameters, the optimizer state and the step, so a resumed run continues with exactly the
batches, keys and updates it would have seen (bit for bit on a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import evaluation
from recall_jax import losses
from recall_jax import models
from recall_jax import simix as simix_lib
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import reporting
from recall_jax.train import sharding
from recall_jax.train import train_step as train_step_lib

_log = logging.getLogger(__name__)


def _say(message: str) -> None:
  """User-facing progress messages (process 0 only), kept clear of the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


# ----------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------


def build_loss_fn(c: ml_collections.ConfigDict) -> tuple[Callable[..., jax.Array], bool]:
  """The configured loss as `loss_fn(embeddings, labels[, rng]) -> scalar` for the train step.

  Batches hold exactly `samples_per_class` images per class, so static sizes are known: each
  query has m - 1 positives, plus m (m - 1) / 2 virtual ones per class with SiMix.

  Returns:
    (loss_fn, uses_rng): uses_rng is True when SiMix draws mixing weights from the step's key.
  """
  loss = losses.get_loss(c.loss.name)
  m = c.samples_per_class
  accepted = inspect.signature(loss).parameters
  kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in c.loss.items() if k != "name" and k in accepted}
  if not c.simix:
    if "max_positives" in accepted:
      kwargs["max_positives"] = max(m - 1, 1)
    return functools.partial(loss, **kwargs), False
  pairs_per_class = m * (m - 1) // 2
  num_pairs = (c.batch_size // m) * pairs_per_class
  kwargs["max_positives"] = m - 1 + pairs_per_class

  def loss_with_simix(embeddings, labels, rng):
    mixed, mixed_labels = simix_lib.simix(embeddings, labels, rng, num_pairs=num_pairs)
    return loss(mixed, mixed_labels, **kwargs)

  return loss_with_simix, True


def build_model(c: ml_collections.ConfigDict):
  """The configured backbone + head (a flax module)."""
  return models.get_model(c.model.name, embedding_dim=c.model.embedding_dim,
                          dtype=jnp.dtype(c.model.dtype), image_size=c.data.image_size)


def init_model_variables(c: ml_collections.ConfigDict, model) -> dict[str, Any]:
  """Fresh variables, with the pretrained checkpoint loaded when the config names one."""
  variables = models.init_variables(model, jax.random.key(c.seed), c.data.image_size,
                                    channels=c.data.channels)
  if c.model.pretrained:
    variables = models.load_pretrained(c.model.name, variables, c.model.pretrained)
  return variables


def center_embedding_head(model, variables: dict[str, Any], images) -> dict[str, Any]:
  """Data-dependent init of the head: centres the input of its projection on a batch.

  A network trained from scratch maps every image close to one common direction (Omniglot with
  the small CNN: cosine similarity 0.96 +- 0.01 between random images). RS@k then ranks every
  positive around B/2, far beyond k, where the sigmoid on `k - rank` is flat: the gradient is
  exactly zero and training never starts. Setting the head LayerNorm's bias to minus the batch
  mean of its output removes the common direction (cosine 0.00 +- 0.16) without making the model
  batch-dependent afterwards.

  Args:
    model: a model with the paper's head (`embedding_head/norm` is its LayerNorm).
    variables: the model's variables; not modified.
    images: (N, H, W, C) a batch of training images.

  Returns:
    New variables with `params/embedding_head/norm/bias` shifted.
  """
  is_head_norm = lambda mdl, _: mdl.name == "norm" and getattr(mdl.parent, "name", None) == \
      "embedding_head"
  _, captured = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                 capture_intermediates=is_head_norm))(
                                                     variables, images)
  (normed,) = captured["intermediates"]["embedding_head"]["norm"]["__call__"]
  head = dict(variables["params"]["embedding_head"])
  head["norm"] = {**head["norm"], "bias": head["norm"]["bias"] - jnp.mean(normed, axis=0)}
  return {**variables, "params": {**variables["params"], "embedding_head": head}}


class _FirstN:
  """The first n records of a source (smoke runs evaluate on a slice of the test split)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(int(n), len(source))
    self.labels = np.asarray(source.labels)[: self._n]

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def load_source(c: ml_collections.ConfigDict, split: str, *, evaluation_split: bool = False):
  source = data.load_split(c.data.name, split, data_root=c.data.root, path=c.data.path,
                           download=c.data.download)
  if evaluation_split and c.data.max_eval_images:
    source = _FirstN(source, c.data.max_eval_images)
  return source


def _eval_batches(c: ml_collections.ConfigDict, source) -> Callable[[], Any]:
  return lambda: data.make_eval_loader(
      source, image_size=c.data.image_size, resize_size=c.data.resize_size,
      batch_size=c.data.eval_batch_size, channels=c.data.channels)


def _checkpoint_managers(workdir: pathlib.Path, c: ml_collections.ConfigDict):
  # Synchronous saves: the train step donates the state's buffers, so a save must have read
  # them before the next step runs.
  options = dict(create=True, enable_async_checkpointing=False)
  workdir = pathlib.Path(workdir).expanduser().absolute()  # Orbax refuses relative paths
  latest = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, **options))
  best = ocp.CheckpointManager(
      workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
  return latest, best


def _save(manager: ocp.CheckpointManager, state, meta: Mapping[str, Any]) -> None:
  step = int(state.step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(dict(meta))), force=True)
  manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, step: int, template):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], str | None]]:
  """Turns SIGTERM (cluster preemption) and a first Ctrl-C into a polite stop request.

  Yields a function returning the signal's name once one arrived. The handlers are restored
  afterwards; a second Ctrl-C interrupts at once.
  """
  received: list[str] = []

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if name == "SIGINT" and received:
      raise KeyboardInterrupt
    received.append(name)
    _say(f"{name} received: saving a checkpoint after this step, then stopping")

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
      pass
  def requested() -> str | None:
    if jax.process_count() > 1:
      # Hosts must agree, or one would save while the others step on: stop if any host was told.
      flags = multihost_utils.process_allgather(np.array(len(received) > 0))
      if np.any(flags) and not received:
        received.append("a stop request on another host")
    return received[0] if received else None

  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


@dataclasses.dataclass
class _Run:
  """Everything built from a config that train/eval/embed share."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  model: Any
  frozen: dict[str, Any]  # non-trainable variable collections (frozen BatchNorm statistics)
  state: train_step_lib.TrainState
  optimizer: Any
  schedule: Any
  steps_per_epoch: int
  mesh: Any

  @functools.cached_property
  def _apply_eval(self):
    return jax.jit(lambda params, images: self.model.apply(
        {"params": params, **self.frozen}, images, train=False))

  def embed_fn_for(self, params) -> Callable[[jax.Array], jax.Array]:
    return functools.partial(self._apply_eval, params)


def _build(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, steps_per_epoch: int,
           center_images=None) -> _Run:
  model = build_model(c)
  variables = init_model_variables(c, model)
  if center_images is not None:
    variables = center_embedding_head(model, variables, center_images)
  params = variables.pop("params")
  optimizer, schedule = optimizer_lib.make_optimizer(c, steps_per_epoch)
  mesh = sharding.data_mesh()
  state = sharding.create_sharded_state(params, optimizer, mesh)
  return _Run(c, pathlib.Path(workdir), model, variables, state, optimizer, schedule,
              steps_per_epoch, mesh)


def _evaluate_and_report(run: _Run, evaluator, test_sources, params, step: int,
                         writer: reporting.MetricWriter) -> dict[str, Any]:
  c = run.config
  results = evaluator(params, step)
  writer.write(step, "eval", results)
  if writer.enabled:
    reporting.plot_curves(reporting.read_metrics(writer.path), run.workdir)
  if c.num_grid_queries and writer.enabled:
    split, source = next(iter(test_sources.items()))
    embeddings, labels = evaluator.last_embeddings[split]
    load = lambda i: data.eval_transform(source[i]["image"], image_size=c.data.image_size,
                                         resize_size=c.data.resize_size, channels=c.data.channels)
    reporting.retrieval_grid(embeddings, labels, load, run.workdir / f"retrieval_{split}.png",
                             num_queries=c.num_grid_queries, seed=c.seed)
  return results


# ----------------------------------------------------------------------------------------------
# Train.
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains with periodic evaluation, resuming from the newest checkpoint in `workdir`.

  Returns:
    The last evaluation's metrics (empty if the run stopped before evaluating).

  Raises:
    ValueError / FileNotFoundError: bad config or missing data/weights, before compiling.
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is left intact.
  """
  # --- Validate and load data --------------------------------------------------------------
  config_lib.validate(c, num_devices=jax.device_count())
  sharding.check_batch_layout(c.batch_size, c.chunk_size, jax.device_count(),
                              jax.process_count(), c.samples_per_class)
  workdir = pathlib.Path(workdir)
  train_source = load_source(c, c.data.train_split)
  if c.data.in_memory:
    train_source = data.InMemorySource(train_source, progress=jax.process_index() == 0)
  if c.data.rotated_classes > 1:
    train_source = data.RotatedClasses(train_source, c.data.rotated_classes)
  test_sources = {s: load_source(c, s, evaluation_split=True) for s in c.data.test_splits}
  sampler = data.MPerClassSampler(train_source.labels, c.batch_size, c.samples_per_class,
                                  seed=c.seed)
  steps_per_epoch = sampler.steps_per_epoch
  total_steps = c.epochs * steps_per_epoch
  if c.max_steps:
    total_steps = min(total_steps, c.max_steps)

  # --- Model, optimizer, train step ----------------------------------------------------------
  latest, best = _checkpoint_managers(workdir, c)
  center_images = None
  if c.model.center_head_init and latest.latest_step() is None:
    with contextlib.closing(data.make_train_loader(
        train_source, sampler, image_size=c.data.image_size, seed=c.seed, num_steps=1,
        channels=c.data.channels, crop_scale=tuple(c.data.crop_scale),
        flip=c.data.flip)) as first:
      center_images = next(first)["image"]
  run = _build(c, workdir, steps_per_epoch, center_images)
  loss_fn, loss_uses_rng = build_loss_fn(c)
  frozen, model = run.frozen, run.model

  def embed_fn(params, images, rng):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params, **frozen}, images, train=True, rngs=rngs)

  # Each device embeds `chunk_size` of its own rows at a time; the loss sees the global batch.
  # On the CPU backend the chunks keep their activations (straight-line code, no second forward):
  # ~20x faster there, at the price of memory growing with the batch (see
  # megabatch_value_and_grad); accelerators keep the memory-flat two-pass loop.
  train_step = sharding.make_sharded_train_step(
      embed_fn, loss_fn, run.optimizer, run.mesh, chunk_size_per_device=c.chunk_size,
      loss_uses_rng=loss_uses_rng, keep_activations=jax.default_backend() == "cpu")
  evaluator = evaluation.Evaluator(run.embed_fn_for, {s: _eval_batches(c, src)
                                                      for s, src in test_sources.items()},
                                   c.data.name, log_fn=_say, progress=jax.process_index() == 0)

  # --- Resume --------------------------------------------------------------------------------
  writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  state, meta = run.state, {}
  if latest.latest_step() is not None:
    state, meta = _restore(latest, latest.latest_step(), run.state)
    _say(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
  best_value = meta.get("best_value", -math.inf)
  start_step = int(state.step)

  # --- Loop ------------------------------------------------------------------------------------
  base_key = jax.random.key(c.seed)
  batches = data.make_train_loader(
      train_source, sampler, image_size=c.data.image_size, start_step=start_step, seed=c.seed,
      worker_count=c.data.worker_count, process_index=jax.process_index(),
      process_count=jax.process_count(), channels=c.data.channels,
      crop_scale=tuple(c.data.crop_scale), flip=c.data.flip,
      num_steps=max(total_steps - start_step, 0))
  results: dict[str, Any] = {}
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  meta_of = lambda: {"best_value": best_value, "best_metric": c.best_metric,
                     "epoch": int(state.step) / steps_per_epoch}
  with _stop_requests() as stop_requested, contextlib.closing(batches):
    for step in range(start_step, total_steps):
      tick = time.perf_counter()
      batch = sharding.global_batch(next(batches), run.mesh)  # this process's slice -> global
      rng = jax.random.fold_in(base_key, step)
      state, metrics = train_step(state, batch["image"], batch["label"], rng)
      loss = float(metrics["loss"])  # waits for the step: also the non-finite check
      if not math.isfinite(loss):
        bar.close()
        raise NonFiniteLossError(
            f"loss is {loss} at step {step + 1}; stopping without saving. The last good checkpoint "
            f"(step {latest.latest_step()}) in {workdir / 'checkpoints'} is intact: lower the "
            "learning rate or check the data, then rerun to resume from it.")
      done = step + 1
      images_per_s = c.batch_size / (time.perf_counter() - tick)
      lr = float(run.schedule(step))
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
      if done % c.log_every_steps == 0 or done == total_steps:
        writer.write(done, "train", {"loss": loss, "learning_rate": lr,
                                     "images_per_s": images_per_s, "epoch": done / steps_per_epoch,
                                     **{k: float(v) for k, v in metrics.items() if k != "loss"}})
      end_of_epoch = done % steps_per_epoch == 0
      if (end_of_epoch and (done // steps_per_epoch) % c.eval_every_epochs == 0) or \
          done == total_steps:
        results = _evaluate_and_report(run, evaluator, test_sources, state.params, done, writer)
        value = results.get(c.best_metric)
        if value is not None and value > best_value:
          best_value = value
          _save(best, state, meta_of())
      if done % c.checkpoint_every_steps == 0 or done == total_steps or stop_requested():
        _save(latest, state, meta_of())
      if stop_requested():
        _say(f"stopped by {stop_requested()} at step {done}; checkpoint saved in "
             f"{workdir / 'checkpoints'}: rerun the same command to resume")
        break
  bar.close()
  writer.close()
  return results


# ----------------------------------------------------------------------------------------------
# Eval and embed.
# ----------------------------------------------------------------------------------------------


def _restored_params(c: ml_collections.ConfigDict, workdir: pathlib.Path, which: str):
  run = _build(c, workdir, steps_per_epoch=1)
  latest, best = _checkpoint_managers(workdir, c)
  manager = best if which == "best" else latest
  if which in ("latest", "best"):
    step = manager.latest_step()
  elif which.isdigit():
    step = int(which)
    if step not in manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {workdir / 'checkpoints'}; "
                       f"available: {sorted(manager.all_steps())}")
  else:
    raise ValueError(f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}")
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir}")
  state, _ = _restore(manager, step, run.state)
  return run, state


def evaluate_checkpoint(c: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                        which: str = "latest") -> dict[str, Any]:
  """Evaluates a checkpoint ('latest', 'best' or a step) on the test splits; prints a table."""
  config_lib.validate(c)
  workdir = pathlib.Path(workdir)
  test_sources = {s: load_source(c, s, evaluation_split=True) for s in c.data.test_splits}
  run, state = _restored_params(c, workdir, which)
  evaluator = evaluation.Evaluator(run.embed_fn_for, {s: _eval_batches(c, src)
                                                      for s, src in test_sources.items()},
                                   c.data.name, log_fn=None)
  results = evaluator(state.params, int(state.step))
  print(f"checkpoint {which} (step {int(state.step)}):\n{reporting.format_table(results)}")
  return results


def embed_split(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = "latest",
                *, split: str | None = None, output: str | None = None) -> pathlib.Path:
  """Writes embeddings, labels and image ids of a split to an .npz (keys embeddings, labels, ids).

  Returns:
    The path written.
  """
  config_lib.validate(c)
  workdir = pathlib.Path(workdir)
  split = split or c.data.test_splits[0]
  source = load_source(c, split)
  run, state = _restored_params(c, workdir, which)
  embeddings, labels, indices = evaluation.extract_embeddings(
      run.embed_fn_for(state.params), _eval_batches(c, source)(), desc=f"embed {split}")
  ids = np.array([str(source[int(i)]["id"]) for i in indices])
  path = pathlib.Path(output) if output else workdir / f"{split}_embeddings.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, embeddings=embeddings, labels=labels, ids=ids)
  print(f"wrote {len(labels)} embeddings of {c.data.name}/{split} to {path}")
  return path
