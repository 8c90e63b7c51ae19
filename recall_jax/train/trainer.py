"""The training program: one loop from a config to checkpoints, metrics, plots and evaluations.

A run is a pure function of the config: batch t is `sampler.batch_indices(t)`, its augmentation
is seeded by (seed, t, position) and its PRNG key is `fold_in(key(seed), t)`. A checkpoint holds
the parameters, the optimizer state and the step, so a resumed run continues with exactly the
batches, keys and updates it would have seen (bit for bit on a CPU).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import time
from typing import Any

import jax
import ml_collections
import tqdm

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import evaluation
from recall_jax.train import checkpointing
from recall_jax.train import cold_start
from recall_jax.train import experiment as experiment_lib
from recall_jax.train import preemption
from recall_jax.train import reporting
from recall_jax.train import sharding
from recall_jax.train import train_step as train_step_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains with periodic evaluation, resuming from the newest checkpoint in `workdir`.

  Returns:
    The last evaluation's metrics (empty if the run stopped before evaluating).

  Raises:
    ConfigError / MissingFileError: bad config or missing data/weights, before compiling.
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is left intact.
  """
  config_lib.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count())
  workdir = pathlib.Path(workdir)
  exp = experiment_lib.make_experiment(c, log_fn=reporting.say, progress=_is_main())
  checkpoints = checkpointing.make_checkpoints(workdir, keep=c.keep_checkpoints)
  resuming = checkpoints.latest.latest_step() is not None
  state = experiment_lib.init_state(exp, center_head=c.model.center_head_init and not resuming)
  meta = {}
  if resuming:
    state, meta = checkpointing.restore(checkpoints.latest, checkpoints.latest.latest_step(), state)
    reporting.say(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
  best_value, start, results = meta.get("best_value", -math.inf), int(state.step), {}
  log = _Log(c, workdir, start, exp.total_steps, exp.steps_per_epoch)
  batches = data.make_train_loader(
      exp.train_source, exp.sampler, image_size=c.data.image_size, start_step=start, seed=c.seed,
      worker_count=c.data.worker_count, process_index=jax.process_index(),
      process_count=jax.process_count(), channels=c.data.channels,
      crop_scale=tuple(c.data.crop_scale), flip=c.data.flip,
      num_steps=max(exp.total_steps - start, 0))
  check_start = _cold_start_monitor(exp)
  with preemption.stop_requests(reporting.say) as poll_stop, contextlib.closing(batches), log:
    for step in range(start, exp.total_steps):
      local_batch = next(batches)
      if check_start and (found := check_start(step, _host_params(state), local_batch["image"],
                                               local_batch["label"])):
        log.writer.write(step, "cold_start", found)
      tick = time.perf_counter()
      loss_name, train_step = exp.train_step_at(step)
      state, metrics = _step(exp, train_step, state, local_batch, step, checkpoints)
      done = step + 1
      images_per_s = c.batch_size / (time.perf_counter() - tick)
      log.step(done, {**metrics, "loss_name": loss_name}, float(exp.schedule(step)), images_per_s)
      if _evaluates_after(c, done, exp):
        results = _evaluate(exp, state.params, done, log.writer, workdir)
        if results.get(c.best_metric, -math.inf) > best_value:
          best_value = results[c.best_metric]
          checkpointing.save(checkpoints.best, state, _meta(c, best_value, state, exp))
      stop = poll_stop()  # once per step: on several hosts a collective
      if done % c.checkpoint_every_steps == 0 or done == exp.total_steps or stop:
        checkpointing.save(checkpoints.latest, state, _meta(c, best_value, state, exp))
      if stop:
        reporting.say(f"stopped by {stop} at step {done}; checkpoint saved in "
                      f"{workdir / 'checkpoints'}: rerun the same command to resume")
        break
  return results


def _is_main() -> bool:
  return jax.process_index() == 0


def _cold_start_monitor(exp: experiment_lib.Experiment) -> cold_start.ColdStartMonitor | None:
  """Process 0's checks of the first RS@k steps (`cold_start_checks`), else None."""
  c = exp.config
  if not (c.cold_start_checks and c.loss.name == "recall_at_k" and _is_main()):
    return None
  first = c.loss.warmup_steps if c.loss.warmup_name else 0
  steps = {s for s in cold_start.DEFAULT_CHECK_STEPS if s >= first} | {first}
  kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in c.loss.recall_at_k.items()}
  return cold_start.ColdStartMonitor(
      experiment_lib.make_embed_fn(exp.model, exp.frozen), chunk_size=c.chunk_size, steps=steps,
      say=reporting.say, max_positives=max(c.samples_per_class - 1, 1), **kwargs)


def _host_params(state: train_step_lib.TrainState):
  # Process 0 alone embeds: on several hosts it needs its own copy of the replicated parameters.
  return state.params if jax.process_count() == 1 else jax.device_get(state.params)


def _step(exp: experiment_lib.Experiment, train_step, state: train_step_lib.TrainState,
          local_batch, step: int, checkpoints: checkpointing.Checkpoints):
  """One update on this process's slice of batch `step`; stops on a non-finite loss."""
  batch = sharding.global_batch(local_batch, exp.mesh)
  state, metrics = train_step(state, batch["image"], batch["label"],
                              jax.random.fold_in(jax.random.key(exp.config.seed), step))
  metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
  if not math.isfinite(metrics["loss"]):
    raise NonFiniteLossError(
        f"loss is {metrics['loss']} at step {step + 1}; stopping without saving. The last good "
        f"checkpoint (step {checkpoints.latest.latest_step()}) in {checkpoints.latest.directory} "
        "is intact: lower the learning rate or check the data, then rerun to resume from it.")
  return state, metrics


def _evaluates_after(c: ml_collections.ConfigDict, done: int,
                     exp: experiment_lib.Experiment) -> bool:
  epoch, end_of_epoch = divmod(done, exp.steps_per_epoch)
  return (end_of_epoch == 0 and epoch % c.eval_every_epochs == 0) or done == exp.total_steps


def _meta(c: ml_collections.ConfigDict, best_value: float, state: train_step_lib.TrainState,
          exp: experiment_lib.Experiment) -> dict[str, Any]:
  return {"best_value": best_value, "best_metric": c.best_metric,
          "epoch": int(state.step) / exp.steps_per_epoch}


def _evaluate(exp: experiment_lib.Experiment, params, step: int, writer: reporting.MetricWriter,
              workdir: pathlib.Path) -> dict[str, Any]:
  """Evaluates, records the metrics and redraws the plots and the first set's retrieval grid."""
  c = exp.config
  result = exp.evaluator(params, step)
  writer.write(step, "eval", result.metrics)
  if not writer.enabled:
    return result.metrics
  reporting.plot_curves(writer.rows, workdir)
  if c.num_grid_queries:
    name, sources = next(iter(exp.eval_sets.items()))
    load = lambda source: lambda i: data.eval_transform(
        source[i]["image"], image_size=c.data.image_size, resize_size=c.data.resize_size,
        channels=c.data.channels)
    evaluation.retrieval_grid(
        result.embeddings[name], load(sources.database), workdir / f"retrieval_{name}.png",
        load_query_image=load(sources.queries) if sources.queries is not None else None,
        num_queries=c.num_grid_queries, seed=c.seed)
  return result.metrics


class _Log:
  """The progress bar and the train rows of metrics.jsonl (process 0 only)."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: pathlib.Path, start: int, total: int,
               steps_per_epoch: int):
    self._c, self._total, self._steps_per_epoch = c, total, steps_per_epoch
    self.writer = reporting.MetricWriter(workdir, enabled=_is_main())
    if _is_main():
      (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    self._bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                          disable=not _is_main(), dynamic_ncols=True)

  def step(self, done: int, metrics: dict[str, float], lr: float, images_per_s: float) -> None:
    self._bar.update(1)
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                          img_s=f"{images_per_s:.0f}")
    if done % self._c.log_every_steps == 0 or done == self._total:
      self.writer.write(done, "train", {
          "loss": metrics["loss"], "learning_rate": lr, "images_per_s": images_per_s,
          "epoch": done / self._steps_per_epoch,
          **{k: v for k, v in metrics.items() if k != "loss"}})

  def __enter__(self) -> _Log:
    return self

  def __exit__(self, *exc_info) -> None:
    self._bar.close()
    self.writer.close()
