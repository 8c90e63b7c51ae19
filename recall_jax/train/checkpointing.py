"""A run's checkpoints: the latest few and the best, written and read with Orbax.

A checkpoint holds the `TrainState` (parameters, optimizer state, step) and a small JSON `meta`
(best value so far, its metric, epoch). `<workdir>/checkpoints` keeps the latest
`keep_checkpoints` for resuming; `<workdir>/best` keeps the one with the best evaluation.
`eval`, `embed` and other read-only uses pick one with `latest`, `best` or a step number and restore
its parameters only.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from recall_jax import errors
from recall_jax import parallel
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
                     create: bool = True) -> Checkpoints:
  """The checkpoint managers of `workdir`.

  Args:
    workdir: the run folder.
    keep: latest checkpoints kept.
    create: create the folders now (for writing); False for read-only use.
  """
  # Synchronous saves: the train step donates the state's buffers, so a save must have read
  # them before the next step runs.
  options = dict(create=create, enable_async_checkpointing=False)
  workdir = pathlib.Path(workdir).expanduser().absolute()  # Orbax refuses relative paths
  latest = ocp.CheckpointManager(
      workdir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
  best = ocp.CheckpointManager(
      workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
  return Checkpoints(latest, best)


def save(manager: ocp.CheckpointManager, state: train_step_lib.TrainState,
         meta: Mapping[str, Any]) -> None:
  """Writes `state` and `meta` as the checkpoint of step `state.step` (replacing one there)."""
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, template: train_step_lib.TrainState
            ) -> tuple[train_step_lib.TrainState, dict[str, Any]]:
  """The state and meta saved at `step`, with the shapes, dtypes and shardings of `template`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


def check_name(which: str) -> None:
  """Raises ConfigError unless `which` is 'latest', 'best' or a step number."""
  if which not in ("latest", "best") and not which.isdigit():
    raise errors.ConfigError(
        f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}")


def resolve(checkpoints: Checkpoints, which: str) -> tuple[ocp.CheckpointManager, int]:
  """The manager and step that `latest`, `best` or a step number names.

  Raises:
    ConfigError: `which` is none of these.
    MissingFileError: no such checkpoint exists.
  """
  check_name(which)
  if which in ("latest", "best"):
    manager = checkpoints.best if which == "best" else checkpoints.latest
    step = manager.latest_step()
    if step is None:
      raise errors.MissingFileError(f"no {which} checkpoint in {manager.directory}")
    return manager, step
  step, manager = int(which), checkpoints.latest
  if step not in manager.all_steps():
    raise errors.MissingFileError(f"no checkpoint at step {step} in {manager.directory}; "
                                  f"available: {sorted(manager.all_steps())}")
  return manager, step


def restore_params(workdir: str | pathlib.Path, which: str,
                   params_template: PyTree) -> tuple[PyTree, int]:
  """The parameters of one checkpoint (without its optimizer state), and its step.

  Args:
    workdir: the run folder.
    which: 'latest', 'best' or a step number (`resolve`).
    params_template: parameters (or `jax.ShapeDtypeStruct`s) with the saved shapes and dtypes.

  Returns:
    (params, step): params replicated on every device, whatever the topology that saved them.

  Raises:
    ConfigError / MissingFileError: as `resolve`.
  """
  check_name(which)
  manager, step = resolve(make_checkpoints(workdir, create=False), which)
  everywhere = parallel.replicated(parallel.data_mesh())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                          {"params": params_template})
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True),
      meta=ocp.args.JsonRestore()))
  return restored["state"]["params"], step
