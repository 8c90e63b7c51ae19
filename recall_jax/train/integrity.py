"""Trustworthy checkpoints: only finite states are saved, and only intact ones are restored.

Orbax writes a step atomically (a temporary folder renamed when complete) but does not checksum
what it wrote: flipped bytes load silently, and a truncated or deleted file surfaces as a long
TensorStore traceback. So after Orbax finishes step N, `write_manifest` records the SHA-256 and
size of every file under `<checkpoint_dir>/<N>/` in `<N>/checksums.json` (written atomically,
last); `verify_step` checks them before a restore, and `newest_intact_step` picks the step a
run resumes from, with one line for each newer step it had to skip. A step without a manifest
(killed between Orbax's commit and the manifest, or saved by an older version) is not intact;
`newest_usable_step` falls back to such a step, unverified and saying so, only when no step is
intact; `resume_step` also moves the damaged newer steps out of the way.

The manifest is read and written with ordinary file operations, so checkpoints must live on a
local or mounted file system (not a `gs://` path).

`is_finite_tree` guards the other end: a state that diverged in its last update is never saved,
so every checkpoint that verifies is also one that training can resume from.

Serves both tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from recall_jax import errors

MANIFEST_NAME = "checksums.json"
_FORMAT = 1


class CorruptCheckpointError(errors.DataError):
  """A checkpoint's files do not match its checksum manifest (or it has none)."""


class NonFiniteStateError(RuntimeError):
  """The parameters or optimizer state became NaN/inf; the run stopped without saving them."""


def step_path(checkpoint_dir: str | os.PathLike, step: int) -> pathlib.Path:
  """The folder of `step` under an Orbax CheckpointManager directory (default step names)."""
  return pathlib.Path(checkpoint_dir) / str(int(step))


def _digest(path: pathlib.Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  is_manifest = lambda p: p.parent == step_dir and p.name.startswith(
      (MANIFEST_NAME, f".{MANIFEST_NAME}."))
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and not is_manifest(p))


def write_manifest(step_dir: str | os.PathLike) -> pathlib.Path:
  """Records the SHA-256 and size of every file of a saved step in `<step_dir>/checksums.json`.

  Call it once the save is complete (after `CheckpointManager.wait_until_finished()`), on one
  process. The manifest is written to a temporary file, synced and renamed, so a crash leaves
  either no manifest (the step counts as not intact) or a complete one.

  Args:
    step_dir: the step's folder, e.g. `<workdir>/checkpoints/40`.

  Returns:
    The manifest's path.

  Raises:
    FileNotFoundError: `step_dir` does not exist.
  """
  step_dir = pathlib.Path(step_dir)
  if not step_dir.is_dir():
    raise FileNotFoundError(f"no checkpoint folder {step_dir}")
  files = {p.relative_to(step_dir).as_posix(): {"sha256": _digest(p), "size": p.stat().st_size}
           for p in _files(step_dir)}
  text = json.dumps({"format": _FORMAT, "files": files}, indent=1, sort_keys=True)
  fd, tmp = tempfile.mkstemp(dir=step_dir, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST_NAME)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # make the rename durable where the platform allows
    dir_fd = os.open(step_dir, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  return step_dir / MANIFEST_NAME


def verify_step(step_dir: str | os.PathLike) -> str | None:
  """Checks a saved step against its manifest.

  Files present but not in the manifest are ignored (only what was saved is checked).

  Args:
    step_dir: the step's folder, e.g. `<workdir>/checkpoints/40`.

  Returns:
    None when every recorded file is present with its size and SHA-256; otherwise one line
    saying what is wrong with the first bad file, e.g. `state/_METADATA: checksum mismatch`.
  """
  step_dir = pathlib.Path(step_dir)
  if not step_dir.is_dir():
    return "folder missing"
  manifest_path = step_dir / MANIFEST_NAME
  if not manifest_path.is_file():
    return f"no {MANIFEST_NAME} (the save did not complete, or predates checksums)"
  try:
    manifest = json.loads(manifest_path.read_text())
    files: dict[str, Any] = manifest["files"]
    if manifest.get("format") != _FORMAT or not files or not all(
        isinstance(r, dict) and {"sha256", "size"} <= r.keys() for r in files.values()):
      raise ValueError(manifest.get("format"))
  except (OSError, ValueError, KeyError, TypeError):
    return f"{MANIFEST_NAME} is unreadable"
  for name, record in sorted(files.items()):
    path = step_dir / name
    if not path.is_file():
      return f"{name}: missing"
    size = path.stat().st_size
    if size != record["size"]:
      return f"{name}: {size} bytes, {record['size']} when saved"
    if _digest(path) != record["sha256"]:
      return f"{name}: checksum mismatch"
  return None


def has_manifest(step_dir: str | os.PathLike) -> bool:
  """Whether a saved step has a checksum manifest (steps of older versions, or of a run killed
  between Orbax's commit and the manifest, have none)."""
  return (pathlib.Path(step_dir) / MANIFEST_NAME).is_file()


def require_intact(checkpoint_dir: str | os.PathLike, step: int, *,
                   allow_unverified: bool = False) -> str | None:
  """Raises unless `step` verifies (before restoring a step the user named, e.g. in eval mode).

  Args:
    checkpoint_dir: the CheckpointManager directory.
    step: the step to check.
    allow_unverified: accept a complete step that has no manifest (saved before checksums were
      recorded), returning a warning instead of raising.

  Returns:
    None when the step verifies; with `allow_unverified`, a one-line warning for a step
    without manifest.

  Raises:
    CorruptCheckpointError: one line naming the step, the file and the problem.
  """
  folder = step_path(checkpoint_dir, step)
  if allow_unverified and folder.is_dir() and not has_manifest(folder):
    return f"checkpoint {step} in {checkpoint_dir} has no {MANIFEST_NAME}: loading it unverified"
  problem = verify_step(folder)
  if problem is not None:
    raise CorruptCheckpointError(
        f"checkpoint {step} in {checkpoint_dir} is corrupt or incomplete ({problem})")
  return None


def newest_intact_step(checkpoint_dir: str | os.PathLike,
                       steps: Iterable[int]) -> tuple[int | None, list[str]]:
  """The newest step whose files match its manifest, and why each newer step was skipped.

  Args:
    checkpoint_dir: an Orbax CheckpointManager directory, e.g. `<workdir>/checkpoints`.
    steps: the saved steps (`CheckpointManager.all_steps()`).

  Returns:
    (step, skipped): the newest intact step (None if none is), and one line per newer step
    that is not, newest first, e.g.
    `checkpoint 40 is corrupt (checkpoints/40/state/_METADATA: checksum mismatch)`.
  """
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  skipped = []
  for step in sorted({int(s) for s in steps}, reverse=True):
    problem = verify_step(step_path(checkpoint_dir, step))
    if problem is None:
      return step, skipped
    skipped.append(f"checkpoint {step} is corrupt or incomplete "
                   f"({checkpoint_dir.name}/{step}/{problem})")
  return None, skipped


def set_aside(checkpoint_dir: str | os.PathLike, step: int,
              destination: str | os.PathLike) -> pathlib.Path:
  """Moves a step that failed verification out of the manager's folder, keeping it to inspect.

  A resumed run saves the same step numbers again, which Orbax refuses while the bad folder is
  still there. Call `CheckpointManager.reload()` afterwards.

  Args:
    checkpoint_dir: the CheckpointManager directory.
    step: the step to move.
    destination: a folder outside `checkpoint_dir`, e.g. `<workdir>/corrupt_checkpoints`.

  Returns:
    The step's new folder (`<destination>/<step>`, or `<step>-1`, `<step>-2`... if taken).
  """
  destination = pathlib.Path(destination)
  destination.mkdir(parents=True, exist_ok=True)
  target, n = destination / str(step), 0
  while target.exists():
    n += 1
    target = destination / f"{step}-{n}"
  os.replace(step_path(checkpoint_dir, step), target)
  return target


def newest_usable_step(checkpoint_dir: str | os.PathLike,
                       steps: Iterable[int]) -> tuple[int | None, list[str]]:
  """The step to load: the newest intact one, else the newest without manifest; reads only.

  When no step is intact but some have no manifest at all (saved by a version without
  checksums, or the only step of a `keep_checkpoints=1` run killed while its manifest was being
  written), the newest of those is used unverified, saying so: Orbax commits a step atomically,
  so it is complete, merely unchecked.

  Args:
    checkpoint_dir: an Orbax CheckpointManager directory.
    steps: its saved steps (`CheckpointManager.all_steps()`).

  Returns:
    (step, messages): the step (None when nothing was saved) and one line per newer step that
    is damaged, newest first, plus one for a step used unverified.

  Raises:
    CorruptCheckpointError: steps exist but every one is damaged; the message lists each
      step's problem.
  """
  directory = pathlib.Path(checkpoint_dir)
  steps = sorted({int(s) for s in steps}, reverse=True)
  step, messages = newest_intact_step(directory, steps)
  if step is not None or not steps:
    return step, messages
  unverified = [s for s in steps if step_path(directory, s).is_dir() and
                not has_manifest(step_path(directory, s))]
  if not unverified:
    raise CorruptCheckpointError(
        f"no intact checkpoint in {directory}: " + "; ".join(messages) +
        ". Move that folder away to start the run afresh")
  step = unverified[0]
  unverified_line = (f"checkpoint {step} has no {MANIFEST_NAME} and no older checkpoint is "
                     "intact: using it unverified")
  return step, [*messages[:steps.index(step)], unverified_line]


def resume_step(manager: Any, *, set_aside_to: str | os.PathLike) -> tuple[int | None, list[str]]:
  """`newest_usable_step` of a run's manager, with the newer, damaged steps moved out of the way.

  Call it on the coordinating process only, before restoring; other processes call
  `manager.reload()` once it returned (after a barrier or a broadcast of the step).

  Args:
    manager: the run's `orbax.checkpoint.CheckpointManager` (default step names).
    set_aside_to: folder outside the manager's directory that receives damaged steps, e.g.
      `<workdir>/corrupt_checkpoints`.

  Returns:
    (step, messages) as `newest_usable_step` (print the messages: the run says why it goes
    back).

  Raises:
    CorruptCheckpointError: steps exist but every one is damaged; nothing is moved.
  """
  steps = [int(s) for s in manager.all_steps()]
  step, messages = newest_usable_step(manager.directory, steps)
  newer = [s for s in steps if step is not None and s > step]
  for bad in newer:
    set_aside(manager.directory, bad, set_aside_to)
  if newer:
    manager.reload()
  return step, messages


@jax.jit
def _all_finite(tree) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def is_finite_tree(tree) -> bool:
  """Whether every floating-point leaf of `tree` is free of NaN and inf.

  One compiled reduction over all leaves; sharded and replicated arrays are reduced where they
  live and only the final boolean comes to the host. Integer leaves (the step count) and PRNG
  keys are skipped.

  Args:
    tree: a pytree of arrays, e.g. a `TrainState` (parameters and optimizer state).

  Returns:
    True when no floating-point element is NaN or infinite.
  """
  return bool(_all_finite(tree))


def raise_if_not_finite(tree, *, step: int, checkpoint_dir: str | os.PathLike,
                        steps: Iterable[int]) -> None:
  """Stops a run before it saves a diverged state, naming the checkpoint to resume from.

  Call it on the state about to be saved. Every saved step passed this check, so the newest
  intact one is also finite.

  Args:
    tree: the state about to be saved (parameters and optimizer state).
    step: the number of updates the state holds.
    checkpoint_dir: the CheckpointManager directory.
    steps: its saved steps (`CheckpointManager.all_steps()`).

  Raises:
    NonFiniteStateError: some floating-point value is NaN or infinite.
  """
  if is_finite_tree(tree):
    return
  good, _ = newest_intact_step(checkpoint_dir, steps)
  advice = "lower the learning rate (or check the data)"
  where = (f"The newest intact checkpoint, step {good} in {checkpoint_dir}, is finite: {advice}, "
           "then rerun to resume from it." if good is not None else
           f"There is no intact checkpoint in {checkpoint_dir}: {advice} and start again.")
  raise NonFiniteStateError(
      f"the parameters or optimizer state are NaN/inf after step {step} (the update diverged); "
      f"nothing was saved. {where}")
