"""A run's checkpoints: the latest few and the best, written and read with Orbax.

A checkpoint holds the `TrainState` (parameters, optimizer state, step) and a small JSON `meta`
(best value so far, its metric, epoch). `<workdir>/checkpoints` keeps the latest
`keep_checkpoints` for resuming; `<workdir>/best` keeps the one with the best evaluation.
`eval`, `embed` and other read-only uses pick one with `latest`, `best` or a step number and restore
its parameters only.

Every saved step gets a checksum manifest (`integrity.write_manifest`), and every restore checks
it first: a resumed run (`resume_step`) and `latest` go back to the newest intact step, saying
why; a named step or `best` that does not verify is refused.

Training saves asynchronously (`AsyncSaves`): Orbax copies the state to host memory before
`save` returns and writes the files in the background while training goes on; the manifest is
written once Orbax has committed the step, so a step without one never counts as intact.

Serves both tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import shutil
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from recall_jax import errors
from recall_jax import parallel
from recall_jax.models import layer_stack
from recall_jax.train import integrity
from recall_jax.train import train_step as train_step_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Checkpoints:
  """The two checkpoint folders of a run.

  Attributes:
    latest: `<workdir>/checkpoints`, the newest `keep` states (what a resumed run continues).
    best: `<workdir>/best`, the state of the best evaluation so far.
  """

  latest: ocp.CheckpointManager
  best: ocp.CheckpointManager


def make_checkpoints(workdir: str | pathlib.Path, *, keep: int = 2,
                     read_only: bool = False) -> Checkpoints:
  """The checkpoint managers of `workdir`.

  Args:
    workdir: the run folder.
    keep: latest checkpoints kept.
    read_only: for reading only (eval, embed): nothing is created, cleaned or deleted. Otherwise
      the folders are created and the temporary folders of interrupted saves are deleted.
  """
  # Async saves are safe although the train step donates the state's buffers: without a
  # device-to-host byte limit every array is "prioritized", and Orbax's `save` returns only once
  # `replica_slices.transfer_arrays_to_host` has them in host memory (`np.asarray` blocks; see
  # `_serialize_arrays` in orbax/checkpoint/_src/serialization/jax_array_handlers.py). On a CPU
  # that host copy may be a view of the buffer, and a buffer so referenced is not donated.
  # Interrupted saves are removed here, before returning: Orbax would remove them in a background
  # thread that, when the run then stops at once (a refused resume), prints a traceback at exit.
  options = dict(create=not read_only, read_only=read_only, cleanup_tmp_directories=False,
                 enable_async_checkpointing=not read_only)
  if read_only:  # what Orbax would otherwise reset, warning about each
    options.update(save_interval_steps=0)
  workdir = pathlib.Path(workdir).expanduser().absolute()  # Orbax refuses relative paths
  if not read_only and jax.process_index() == 0:
    for folder in ("checkpoints", "best"):
      _remove_unfinished_saves(workdir / folder)
  with _orbax_warnings_hidden(read_only):  # "Given directory is read only": as asked
    latest = _manager(workdir / "checkpoints", ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, **options), read_only)
    best = _manager(workdir / "best", ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else 1, **options), read_only)
  return Checkpoints(latest, best)


def _manager(directory: pathlib.Path, options: ocp.CheckpointManagerOptions,
             read_only: bool) -> ocp.CheckpointManager:
  """Orbax's manager of `directory`; a reader's is made again when a listed step vanishes.

  Orbax reads the folder of every step it lists; a run training in the same workdir deletes its
  older steps meanwhile (it keeps the newest `keep_checkpoints`), which is a race to retry, not
  a missing checkpoint.
  """
  for attempt in range(_READ_ATTEMPTS):
    try:
      return ocp.CheckpointManager(directory, options=options)
    except FileNotFoundError:
      if not read_only or attempt + 1 == _READ_ATTEMPTS:
        raise
  raise AssertionError("unreachable")


def _remove_unfinished_saves(directory: pathlib.Path) -> None:
  """Deletes the temporary folders of saves that never finished (Orbax's step.orbax-...-tmp-N)."""
  if directory.is_dir():
    for unfinished in directory.glob(f"*{_ORBAX_TMP_SUFFIX}*"):
      shutil.rmtree(unfinished, ignore_errors=True)


# Orbax names a step's folder `<step><suffix>-<timestamp>` until the save has finished.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def _orbax_warnings_hidden(hidden: bool):
  previous = absl_logging.get_verbosity()
  if hidden:
    absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def save(manager: ocp.CheckpointManager, state: train_step_lib.TrainState,
         meta: Mapping[str, Any]) -> None:
  """Writes `state` and `meta` as the checkpoint of step `state.step` and waits for it and its
  checksum manifest (`AsyncSaves` for saves that do not wait)."""
  with AsyncSaves() as saves:
    saves.save(manager, state, meta)


class AsyncSaves:
  """Saves that return once the state is in host memory; files and manifests follow in the
  background.

  Each checkpoint manager has at most one save in flight: a new save to it first waits for the
  previous one. Once Orbax has committed a step (renamed its temporary folder), a thread writes
  its checksum manifest on process 0, so a step killed before that has no manifest and is not
  intact. `wait()` (and leaving the context) waits for every save and raises the first error of
  one (e.g. a full disk).
  """

  def __init__(self):
    self._pending: dict[ocp.CheckpointManager, threading.Thread] = {}
    self._errors: list[BaseException] = []

  def save(self, manager: ocp.CheckpointManager, state: train_step_lib.TrainState,
           meta: Mapping[str, Any]) -> None:
    """Starts writing `state` and `meta` as the checkpoint of step `state.step` (replacing one
    there); returns once the state is copied to host memory, so it may be donated after."""
    self.wait(manager)
    step = int(state.step)
    if step in manager.all_steps():  # a resumed run replaying steps saved before (e.g. the best)
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
    thread = threading.Thread(target=self._finish, args=(manager, step), daemon=True,
                              name=f"manifest-{step}")
    self._pending[manager] = thread
    thread.start()

  def _finish(self, manager: ocp.CheckpointManager, step: int) -> None:
    try:
      manager.wait_until_finished()
      if jax.process_index() == 0:
        integrity.write_manifest(integrity.step_path(manager.directory, step))
    except BaseException as e:  # pylint: disable=broad-except  # raised again by `wait`
      self._errors.append(e)

  def wait(self, manager: ocp.CheckpointManager | None = None) -> None:
    """Waits for the save in flight to `manager` (None: to every manager) and its manifest.

    Raises:
      The first error of a save waited for (Orbax's, or the file system's).
    """
    for m in ([manager] if manager is not None else list(self._pending)):
      thread = self._pending.pop(m, None)
      if thread is not None:
        thread.join()
    if self._errors:
      raise self._errors.pop(0)

  def __enter__(self) -> AsyncSaves:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc_type is None:
      self.wait()
      return
    with contextlib.suppress(Exception):  # the error that ended the run is the one to report
      self.wait()


def resume_step(manager: ocp.CheckpointManager, set_aside_to: str | pathlib.Path,
                log_fn: Callable[[str], Any]) -> int | None:
  """The step a training run resumes from: the newest intact one (None: start afresh).

  Process 0 verifies the steps against their manifests (`integrity.resume_step`), moves newer
  damaged steps to `set_aside_to` and says why through `log_fn`; the other processes get its
  answer and reload their view of the folder.

  Raises:
    CorruptCheckpointError: every saved step is damaged (on process 0; the other processes
      raise a DataError pointing at it).
  """
  step, failure = None, None
  if jax.process_index() == 0:
    try:
      step, messages = integrity.resume_step(manager, set_aside_to=set_aside_to)
    except errors.UserInputError as e:
      failure = e
    else:
      for message in messages:
        log_fn(message + (f"; resuming from step {step}" if step is not None else ""))
  if jax.process_count() > 1:
    code = -2 if failure is not None else (-1 if step is None else step)
    code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
    if code == -2 and failure is None:
      raise errors.DataError("the coordinating process found no usable checkpoint (see its "
                             "output)")
    if jax.process_index() != 0:
      manager.reload()
      step = None if code == -1 else code
  if failure is not None:
    raise failure
  return step


def restore(manager: ocp.CheckpointManager, step: int, template: train_step_lib.TrainState
            ) -> tuple[train_step_lib.TrainState, dict[str, Any]]:
  """The state and meta saved at `step`, with the shapes, dtypes and shardings of `template`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError) as e:
    layer_stack.raise_if_unrolled(e, f"{manager.directory} step {step}")
    raise
  return restored["state"], dict(restored["meta"] or {})


def _saved_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The JSON meta saved with `step` (None when it cannot be read: a damaged step)."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except (OSError, ValueError, KeyError):
    return None
  return meta if isinstance(meta, dict) else None


def best_value(manager: ocp.CheckpointManager) -> float:
  """The evaluation value recorded with the newest step of `manager` (-inf: none saved).

  A run saves its latest step before evaluating it, so after a resume the best checkpoint's meta
  may hold a value that the latest checkpoint's meta does not.
  """
  step = manager.latest_step()
  value = None if step is None else (_saved_meta(manager, step) or {}).get("best_value")
  return float(value) if isinstance(value, (int, float)) else -math.inf


def saved_config(manager: ocp.CheckpointManager) -> tuple[dict[str, Any] | None, str]:
  """The run config saved in the meta of the newest step that has one, and where it was read.

  Returns:
    (config, source): the config as JSON-compatible dicts, or None when no step holds one
    (saved by an older version, or every step's meta is damaged); source names the step.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    config = (_saved_meta(manager, step) or {}).get("config")
    if isinstance(config, dict):
      return config, f"checkpoint {step} in {manager.directory}"
  return None, str(manager.directory)


def check_name(which: str) -> None:
  """Raises ConfigError unless `which` is 'latest', 'best' or a step number."""
  if which not in ("latest", "best") and not (which.isascii() and which.isdigit()):
    raise errors.ConfigError(
        f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}")


def resolve(checkpoints: Checkpoints, which: str, log_fn: Callable[[str], Any] | None = None
            ) -> tuple[ocp.CheckpointManager, int]:
  """The manager and verified step that `latest`, `best` or a step number names.

  `latest` is the newest intact step (`integrity.newest_usable_step`); `best` and a step number
  must match their manifest (a step saved without one is accepted with a warning). Reads only.

  Args:
    checkpoints: the run's managers.
    which: 'latest', 'best' or a step number.
    log_fn: receives one line per skipped or unverified step (None: print).

  Raises:
    ConfigError: `which` is none of these.
    MissingFileError: no such checkpoint exists.
    CorruptCheckpointError: the named step (or every step, for `latest`) is damaged.
  """
  log_fn = log_fn or print
  check_name(which)
  if which == "latest":
    manager = checkpoints.latest
    step, messages = integrity.newest_usable_step(manager.directory, manager.all_steps())
    if step is None:
      raise errors.MissingFileError(f"no latest checkpoint in {manager.directory}")
    for message in messages:
      log_fn(message + f"; using step {step}")
    return manager, step
  if which == "best":
    manager = checkpoints.best
    step = manager.latest_step()
    if step is None:
      raise errors.MissingFileError(f"no best checkpoint in {manager.directory}")
  else:
    step, manager = int(which), checkpoints.latest
    if step not in manager.all_steps():
      raise errors.MissingFileError(f"no checkpoint at step {step} in {manager.directory}; "
                                    f"available: {sorted(manager.all_steps())}")
  warning = integrity.require_intact(manager.directory, step, allow_unverified=True)
  if warning:
    log_fn(warning)
  return manager, step


def restore_params(workdir: str | pathlib.Path, which: str, params_template: PyTree,
                   log_fn: Callable[[str], Any] | None = None) -> tuple[PyTree, int]:
  """The parameters of one checkpoint (without its optimizer state), and its step.

  Safe while a run trains in `workdir`: when training deletes the step being read (it keeps
  only the newest `keep_checkpoints`), `latest` and `best` go to the step that is newest now,
  saying so; a step number that disappears is a one-line MissingFileError.

  Args:
    workdir: the run folder.
    which: 'latest', 'best' or a step number (`resolve`).
    params_template: parameters (or `jax.ShapeDtypeStruct`s) with the saved shapes and dtypes.
    log_fn: receives one line per skipped or unverified step (None: print).

  Returns:
    (params, step): params replicated on every device, whatever the topology that saved them.

  Raises:
    ConfigError / MissingFileError / CorruptCheckpointError: as `resolve`.
  """
  check_name(which)
  log_fn = log_fn or print
  everywhere = parallel.replicated(parallel.data_mesh())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                          {"params": params_template})
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  error, failed = None, None
  for _ in range(_READ_ATTEMPTS):
    checkpoints = make_checkpoints(workdir, read_only=True)
    try:
      manager, step = resolve(checkpoints, which, log_fn)
    except integrity.CorruptCheckpointError:
      # Every step listed was gone by the time it was checked: with `keep_checkpoints=1` a run
      # training there deleted it after saving a newer one, which a new listing shows.
      if which not in ("latest", "best") or _listed_steps(checkpoints) == _listed_steps(
          make_checkpoints(workdir, read_only=True)):
        raise
      continue
    if failed is not None:
      if failed == (manager.directory, step):
        raise error  # the same step fails again, still there: not a race, a real problem
      log_fn(f"checkpoint {failed[1]} in {failed[0]} was deleted while it was read (the run "
             f"training there replaced it); reading step {step} instead")
    folder = integrity.step_path(manager.directory, step)
    verified = integrity.has_manifest(folder)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      layer_stack.raise_if_unrolled(e, f"{manager.directory} step {step}")
      # Orbax reports a folder deleted under it as whatever file it missed (TensorStore,
      # FileNotFoundError, KeyError 'meta'). `latest` and `best` resolve again: a step deleted
      # meanwhile gives way to the newest one; the same step again is a real failure.
      if which in ("latest", "best"):
        error, failed = e, (manager.directory, step)
        continue
      listed = make_checkpoints(workdir, read_only=True).latest.all_steps()
      gone = (not folder.is_dir() or step not in listed
              or (verified and integrity.verify_step(folder) is not None))
      if not gone:
        raise
      raise errors.MissingFileError(
          f"checkpoint {step} in {manager.directory} was deleted while it was read (a run "
          "training there keeps only its newest steps): name a newer step, or latest") from None
    return restored["state"]["params"], step
  raise errors.DataError(
      f"the {which} checkpoint in {workdir} was replaced {_READ_ATTEMPTS} times while it was "
      "read; try again, or stop the run training there")


def _listed_steps(checkpoints: Checkpoints) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The steps each folder of `checkpoints` listed when its manager was made."""
  return tuple(checkpoints.latest.all_steps()), tuple(checkpoints.best.all_steps())


# Reads of `latest` or `best` retried while a training run deletes the step being read: each
# retry picks the step that is newest now, so only a run saving faster than one restore can
# exhaust them.
_READ_ATTEMPTS = 5
