"""The training program: one loop from a config to checkpoints, metrics, plots and evaluations.

A run is a pure function of the config: batch t is `sampler.batch_indices(t)`, its augmentation
is seeded by (seed, t, position) and its PRNG key is `fold_in(key(seed), t)`. A checkpoint holds
the parameters, the optimizer state and the step, so a resumed run continues with exactly the
batches, keys and updates it would have seen (bit for bit on a CPU).

A run holds an exclusive lock on its workdir, refuses to resume with a config its checkpoints do
not fit, resumes from the newest checkpoint that matches its checksums, and never saves a state
that is not finite (docs/reliability.md).

Serves both tasks: the experiment's input layout loads and assembles the batches, its
evaluation protocol scores the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from recall_jax import config as config_lib
from recall_jax import config_checks
from recall_jax import errors
from recall_jax import data
from recall_jax import evaluation
from recall_jax import losses
from recall_jax.train import checkpointing
from recall_jax.train import cold_start
from recall_jax.train import experiment as experiment_lib
from recall_jax.train import integrity
from recall_jax.train import preemption
from recall_jax.train import progress
from recall_jax.train import reporting
from recall_jax.train import train_step as train_step_lib
from recall_jax.train import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains with periodic evaluation, resuming from the newest checkpoint in `workdir`.

  Returns:
    The last evaluation's metrics (empty if the run stopped before evaluating).

  Raises:
    ConfigError / MissingFileError: bad config or missing data/weights, before compiling; a
      config its checkpoints do not fit.
    WorkdirInUseError / WorkdirNotWritableError: another run holds `workdir`, or it cannot be
      written.
    CorruptCheckpointError: every saved checkpoint is damaged.
    NonFiniteLossError / NonFiniteStateError: the loss or the updated state became NaN/inf;
      nothing non-finite was saved and the newest intact checkpoint is left as it was.
  """
  config_lib.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count())
  workdir = pathlib.Path(workdir).expanduser()
  with _locked(workdir):
    return _train(c, workdir)


@contextlib.contextmanager
def _locked(workdir: pathlib.Path):
  """Holds the workdir lock (process 0) for the whole run; every process stops if it fails."""
  failure, lock = None, None
  try:
    lock = workdir_lib.acquire_workdir_lock(workdir, process_index=jax.process_index())
  except errors.UserInputError as e:
    failure = e
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.bool_(failure is None)))
    if not ok and failure is None:
      failure = errors.ConfigError(f"the coordinating process could not lock {workdir} (see its "
                                   "output)")
  if failure is not None:
    raise failure
  try:
    if lock.previous_owner:
      reporting.say(f"previous run (pid {lock.previous_owner.get('pid')} on host "
                    f"{lock.previous_owner.get('host')}) ended without releasing the lock; "
                    "taking over")
    yield lock
  finally:
    lock.release()


def _check_resumable(c: ml_collections.ConfigDict, workdir: pathlib.Path,
                     checkpoints: checkpointing.Checkpoints) -> None:
  """Refuses a config the run's checkpoints do not fit, before config.json is overwritten.

  Compares with the config saved in the newest checkpoint's meta, so a torn or deleted
  config.json does not skip the check; config.json only for checkpoints saved without one.
  """
  if checkpoints.latest.latest_step() is None:
    return
  stored, source = checkpointing.saved_config(checkpoints.latest)
  stored_path = workdir / "config.json"
  if stored is None and stored_path.is_file():
    try:
      stored, source = json.loads(stored_path.read_text()), str(stored_path)
    except ValueError:
      stored = None  # torn by a crash: nothing to compare with; it is rewritten below
  config_checks.check_resume_compatible(stored, c, source=source)


def _train(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  checkpoints = checkpointing.make_checkpoints(workdir, keep=c.keep_checkpoints)
  _check_resumable(c, workdir, checkpoints)
  exp = experiment_lib.make_experiment(c, log_fn=reporting.say, progress=_is_main())
  resume_from = checkpointing.resume_step(checkpoints.latest, workdir / "corrupt_checkpoints",
                                          reporting.say)
  resuming = resume_from is not None
  state = experiment_lib.init_state(exp, center_head=c.model.center_head_init and not resuming)
  meta = {}
  if resuming:
    state, meta = checkpointing.restore(checkpoints.latest, resume_from, state)
    if not integrity.is_finite_tree(state):  # only a step saved without a manifest can be
      raise integrity.NonFiniteStateError(
          f"checkpoint {resume_from} in {checkpoints.latest.directory} holds NaN/inf values; "
          "move it away to resume from an older one")
    reporting.say(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}")
  # The latest step was saved before its own evaluation: the best step's meta is newer.
  best_value = max(meta.get("best_value", -math.inf), checkpointing.best_value(checkpoints.best))
  start, results = int(state.step), {}
  log = _Log(c, workdir, start, exp.total_steps, exp.steps_per_epoch)
  _record_skipped_images(exp, log.writer, start)
  batches = exp.layout.train_batches(exp.train_source, exp.sampler, start_step=start,
                                     num_steps=max(exp.total_steps - start, 0))
  check_start = _cold_start_monitor(exp)
  first_bad, unchecked = _no_bad_loss(), None
  with (checkpointing.AsyncSaves() as saves, preemption.stop_requests(reporting.say) as poll_stop,
        contextlib.closing(batches), log):
    if resuming and _evaluation_missing(c, exp, log.writer, start):  # saved, then stopped
      results, best_value = _evaluate_and_keep_best(exp, state, log.writer, workdir, checkpoints,
                                                    saves, best_value)
    for step in range(start, exp.total_steps):
      local_batch = next(batches)
      if check_start and (found := check_start(step, _host_params(state), local_batch["image"],
                                               local_batch["label"])):
        log.writer.write(step, "cold_start", found)
      loss_name, train_step = exp.train_step_at(step)
      state, metrics = _step(exp, train_step, state, local_batch, step)
      # The loop reads the device only at boundaries, so the next batch is assembled and sent
      # while the step runs. A log step's reads (its loss check and row) are done one step late,
      # once the next step is queued, so the device never waits for the host there; saves and
      # evaluations read at once (never save a non-finite state).
      if unchecked is not None:
        _require_finite_loss(unchecked, checkpoints, saves)
        unchecked = None
      first_bad = _first_bad_loss(first_bad, metrics["loss"], state.step)
      done = step + 1
      evaluates, logs = _evaluates_after(c, done, exp), log.due(done)
      stop = poll_stop(collective=logs or evaluates or done % c.checkpoint_every_steps == 0)
      saves_now = (evaluates or done % c.checkpoint_every_steps == 0 or done == exp.total_steps
                   or bool(stop))
      if saves_now:
        _require_finite_loss(first_bad, checkpoints, saves)
      elif logs:
        unchecked = first_bad
      log.step(done, metrics, loss_name, exp.schedule, write=logs or bool(stop),
               at_once=saves_now)
      # Saved before evaluating, so a failing evaluation loses no training (and a diverged
      # update is reported, not evaluated).
      if saves_now:
        _save(checkpoints, saves, checkpoints.latest, state, _meta(c, best_value, state, exp))
      if evaluates:
        results, best_value = _evaluate_and_keep_best(exp, state, log.writer, workdir,
                                                      checkpoints, saves, best_value)
      if stop:
        saves.wait()
        reporting.say(f"stopped by {stop} at step {done}; checkpoint saved in "
                      f"{workdir / 'checkpoints'}: rerun the same command to resume")
        break
  return results


def _is_main() -> bool:
  return jax.process_index() == 0


def _save(checkpoints: checkpointing.Checkpoints, saves: checkpointing.AsyncSaves, manager,
          state: train_step_lib.TrainState, meta: dict[str, Any]) -> None:
  """Starts saving `state` to `manager` unless the update made it NaN/inf (then names a good
  step)."""
  _require_finite(checkpoints, saves, state)
  saves.save(manager, state, meta)


def _require_finite(checkpoints: checkpointing.Checkpoints, saves: checkpointing.AsyncSaves,
                    state: train_step_lib.TrainState) -> None:
  """Raises NonFiniteStateError, naming the newest intact checkpoint, if `state` is NaN/inf."""
  if not integrity.is_finite_tree(state):
    saves.wait()  # the checkpoint being written is the newest intact one once it is complete
    integrity.raise_if_not_finite(state, step=int(state.step),
                                  checkpoint_dir=checkpoints.latest.directory,
                                  steps=checkpoints.latest.all_steps())


@jax.jit
def _first_bad_loss(first_bad: tuple[jax.Array, jax.Array], loss: jax.Array, done: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """(step, loss) of the first non-finite loss: `first_bad` (int32 step 0 while all were
  finite, float32 loss), updated on the device with update `done`'s float32 `loss`."""
  new = (first_bad[0] == 0) & ~jnp.isfinite(loss)
  return jnp.where(new, done, first_bad[0]), jnp.where(new, loss, first_bad[1])


def _no_bad_loss() -> tuple[jax.Array, jax.Array]:
  return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)


def _require_finite_loss(first_bad: tuple[jax.Array, jax.Array],
                         checkpoints: checkpointing.Checkpoints,
                         saves: checkpointing.AsyncSaves) -> None:
  """Raises NonFiniteLossError naming the first bad step and the newest intact checkpoint."""
  step, loss = (x.item() for x in jax.device_get(first_bad))
  if not step:
    return
  saves.wait()
  good, _ = integrity.newest_intact_step(checkpoints.latest.directory,
                                         checkpoints.latest.all_steps())
  where = (f"The last good checkpoint (step {good}) in {checkpoints.latest.directory} is "
           "intact: lower the learning rate or check the data, then rerun to resume from it."
           if good is not None else f"There is no intact checkpoint in "
           f"{checkpoints.latest.directory}: lower the learning rate or check the data and "
           "start again.")
  raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping without saving. {where}")


def _cold_start_monitor(exp: experiment_lib.Experiment) -> cold_start.ColdStartMonitor | None:
  """Process 0's checks of the first RS@k steps (`cold_start_checks`), else None."""
  c = exp.config
  if not (c.cold_start_checks and losses.loss_spec(c.loss.name).cold_start_check and _is_main()):
    return None
  first = c.loss.warmup_steps if c.loss.warmup_name else 0
  steps = {s for s in cold_start.DEFAULT_CHECK_STEPS if s >= first} | {first}
  kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in c.loss.recall_at_k.items()}
  return cold_start.ColdStartMonitor(
      exp.layout.batch_embedder(exp.model, exp.frozen, c.chunk_size), steps=steps,
      say=reporting.say, max_positives=max(c.samples_per_class - 1, 1), **kwargs)


def _host_params(state: train_step_lib.TrainState):
  # Process 0 alone embeds: on several hosts it needs its own copy of the replicated parameters.
  return state.params if jax.process_count() == 1 else jax.device_get(state.params)


def _step(exp: experiment_lib.Experiment, train_step, state: train_step_lib.TrainState,
          local_batch, step: int):
  """One update on this process's slice of batch `step` (dispatched: nothing waits for it)."""
  batch = exp.layout.global_batch(local_batch, exp.mesh)
  return train_step(state, batch["image"], batch["label"],
                    jax.random.fold_in(jax.random.key(exp.config.seed), step))


def _skipped_and_listed(source) -> tuple[str, int, int] | None:
  """(split, images skipped as unreadable, images listed) of a prepared split under wrappers."""
  while not hasattr(source, "skipped") and hasattr(source, "source"):
    source = source.source  # FirstN, RotatedClasses
  if not hasattr(source, "skipped"):
    return None  # not a prepared split: nothing was skipped
  skipped = len(source.skipped)
  return (getattr(source, "split", "?"), skipped,
          getattr(source, "listed", len(source) + skipped))


def _record_skipped_images(exp: experiment_lib.Experiment, writer: reporting.MetricWriter,
                           step: int) -> None:
  """Says how many images of each split were unreadable, and writes it as a `data` row."""
  sources = [exp.train_source] + [s for e in exp.eval_sets.values() for s in e if s is not None]
  row = {}
  for found in filter(None, map(_skipped_and_listed, sources)):
    split, skipped, listed = found
    row[f"{split}/skipped_images"], row[f"{split}/listed_images"] = skipped, listed
    if skipped:
      reporting.say(f"{exp.config.data.name}/{split}: {skipped} of {listed} listed images are "
                    "unreadable and were skipped")
  writer.write(step, "data", row)


def _evaluates_after(c: ml_collections.ConfigDict, done: int,
                     exp: experiment_lib.Experiment) -> bool:
  epoch, end_of_epoch = divmod(done, exp.steps_per_epoch)
  return (end_of_epoch == 0 and epoch % c.eval_every_epochs == 0) or done == exp.total_steps


def _evaluation_missing(c: ml_collections.ConfigDict, exp: experiment_lib.Experiment,
                        writer: reporting.MetricWriter, step: int) -> bool:
  """Whether `step`, resumed from, is one to evaluate that has no evaluation row (process 0's
  answer on every process: evaluating is collective)."""
  missing = (step > 0 and _evaluates_after(c, step, exp) and writer.enabled and
             not any(r.get("kind") == "eval" and r.get("step") == step for r in writer.rows))
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.bool_(missing)))
  return missing


def _evaluate_and_keep_best(exp: experiment_lib.Experiment, state: train_step_lib.TrainState,
                            writer: reporting.MetricWriter, workdir: pathlib.Path,
                            checkpoints: checkpointing.Checkpoints, saves: checkpointing.AsyncSaves,
                            best_value: float) -> tuple[dict[str, Any], float]:
  """Evaluates `state` (already saved) and saves it as the best if it is; (metrics, best)."""
  c = exp.config
  results = _evaluate(exp, state.params, int(state.step), writer, workdir)
  if results.get(c.best_metric, -math.inf) > best_value:
    best_value = results[c.best_metric]
    _save(checkpoints, saves, checkpoints.best, state, _meta(c, best_value, state, exp))
  return results, best_value


def _meta(c: ml_collections.ConfigDict, best_value: float, state: train_step_lib.TrainState,
          exp: experiment_lib.Experiment) -> dict[str, Any]:
  return {"best_value": best_value, "best_metric": c.best_metric,
          "epoch": int(state.step) / exp.steps_per_epoch,
          "config": json.loads(c.to_json_best_effort())}  # what a resume is compared with


def _evaluate(exp: experiment_lib.Experiment, params, step: int, writer: reporting.MetricWriter,
              workdir: pathlib.Path) -> dict[str, Any]:
  """Evaluates, records the metrics and redraws the plots and the first set's retrieval grid."""
  c = exp.config
  result = exp.evaluator(params, step)
  writer.write(step, "eval", result.metrics)
  if not writer.enabled:
    return result.metrics
  reporting.plot_curves(writer.rows, workdir)
  if c.num_grid_queries and exp.eval_sets:
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
    if _is_main():
      # A resumed run replays the steps after its checkpoint: their earlier rows go.
      workdir_lib.truncate_metrics(workdir / "metrics.jsonl", start, log_fn=reporting.say)
      workdir_lib.atomic_write_text(workdir / "config.json", c.to_json_best_effort(indent=2))
    self.writer = reporting.MetricWriter(workdir, enabled=_is_main())
    self._bar = progress.progress_bar(total=total, initial=start, enabled=_is_main())
    self._done, self._time = start, time.perf_counter()
    self._pending: tuple[int, dict[str, jax.Array], str, Callable[[int], Any]] | None = None

  def due(self, done: int) -> bool:
    """Whether step `done` writes a train row (every `log_every_steps` and the last)."""
    return done % self._c.log_every_steps == 0 or done == self._total

  def step(self, done: int, metrics: dict[str, jax.Array], loss_name: str,
           schedule: Callable[[int], Any], *, write: bool, at_once: bool = False) -> None:
    """Advances the bar; with `write`, the train row of step `done` (learning rate: `schedule`
    of its update; images/s: the mean since the previous row) is due.

    The row's `metrics` stay on the device until the next call (the loop makes it once the
    next step is queued, as big_vision reads its metrics one step late) or `write_pending`, or
    are written now with `at_once` (a boundary that waits for the step anyway).
    """
    self._bar.update(1)
    self.write_pending()
    if write:
      self._pending = (done, metrics, loss_name, schedule)
      if at_once:
        self.write_pending()

  def write_pending(self) -> None:
    """Fetches the due row's metrics from the device (waiting for its step) and writes it."""
    if self._pending is None:
      return
    done, metrics, loss_name, schedule = self._pending
    self._pending = None
    metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}  # waits for the step
    now, lr = time.perf_counter(), float(schedule(done - 1))
    images_per_s = self._c.batch_size * (done - self._done) / (now - self._time)
    self._done, self._time = done, now
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                          img_s=f"{images_per_s:.0f}")
    self.writer.write(done, "train", {
        "loss": metrics["loss"], "learning_rate": lr, "images_per_s": images_per_s,
        "epoch": done / self._steps_per_epoch, "loss_name": loss_name,
        **{k: v for k, v in metrics.items() if k != "loss"}})

  def __enter__(self) -> _Log:
    return self

  def __exit__(self, exc_type, *_) -> None:
    try:
      self.write_pending()
    except Exception:  # pylint: disable=broad-except
      if exc_type is None:
        raise
      # The run already failed: its own error is the one to report, not a failed read after it.
    finally:
      self._bar.close()
      self.writer.close()
