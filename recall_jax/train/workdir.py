"""The run folder: one owner at a time, writable before work starts, read-only for evaluation.

A training run owns its workdir for its whole lifetime (`lock_workdir`), so a resubmitted job
cannot interleave its metrics and checkpoints with a run that is still going. The lock is an
`fcntl.flock` on `<workdir>/.lock`: the kernel drops it when the owner dies, even by kill -9, so
a crashed run never leaves a stale lock behind. On file systems without `flock` (some parallel
file systems) the lock file's pid and host decide instead.

The other helpers keep a resumed run's records consistent with its restored state
(`truncate_metrics`) and turn an unwritable or missing workdir into one clear line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from recall_jax import errors

LOCK_NAME = ".lock"


class WorkdirInUseError(errors.UserInputError):
  """Another live run holds the workdir."""


class WorkdirNotWritableError(errors.UserInputError):
  """The workdir cannot be created or written (permissions, read-only mount, a file in the way)."""


def _owner_text(owner: dict[str, Any] | None) -> str:
  if not owner:
    return "owner unknown"
  return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
          f"{owner.get('started', '?')}")


def _read_owner(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class WorkdirLock:
  """An exclusive hold on a workdir; release it with `release()` (or use `lock_workdir`).

  Attributes:
    path: the lock file, `<workdir>/.lock` (None when this process does not lock).
    previous_owner: the owner recorded by a run that ended without releasing the lock (a crash,
      kill -9), or None. Its lock was stale and has been taken over.
  """

  def __init__(self, path: pathlib.Path | None, fd: int | None,
               previous_owner: dict[str, Any] | None):
    self.path, self._fd, self.previous_owner = path, fd, previous_owner

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Drops the lock; the file stays (a later run overwrites it). Idempotent."""
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)  # an empty lock file: nobody owns the workdir
    os.close(self._fd)  # closing the descriptor releases the flock
    self._fd = None


def acquire_workdir_lock(workdir: str | os.PathLike, *, process_index: int = 0) -> WorkdirLock:
  """Takes the exclusive lock on `workdir`, creating the folder if needed.

  Only the coordinating process (`process_index == 0`) of a multi-host run locks; the others get
  a lock object that holds nothing. The caller must make every process stop when process 0
  fails here (e.g. by broadcasting the outcome), or the others wait for it at their first
  collective.

  Args:
    workdir: the run folder.
    process_index: `jax.process_index()` of the calling process.

  Returns:
    A held `WorkdirLock` (process 0) or an empty one (other processes).

  Raises:
    WorkdirInUseError: another live run holds the lock; the message names its pid, host and
      start time.
    WorkdirNotWritableError: the folder or its lock file cannot be created.
  """
  if process_index != 0:
    return WorkdirLock(None, None, None)
  workdir = ensure_writable(workdir)
  path = workdir / LOCK_NAME
  try:
    # Not inherited by spawned processes (grain's workers), so the lock dies with this process.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirNotWritableError(f"cannot create the lock file {path}: {e.strerror}") from None
  host = socket.gethostname()
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      flock_works = True
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirInUseError(
            f"workdir {workdir} is in use by another run ({_owner_text(_read_owner(path))}); "
            "wait for it to finish, stop it, or choose another --workdir") from None
      flock_works = False  # e.g. ENOLCK / EOPNOTSUPP: no flock on this file system
    previous = _read_owner(path)
    if not flock_works and previous and previous.get("pid") is not None:
      same_host = previous.get("host") == host
      if not same_host or _pid_alive(int(previous["pid"])):
        hint = ("" if same_host else f"; if that run has ended, delete {path}")
        raise WorkdirInUseError(
            f"workdir {workdir} is in use by another run ({_owner_text(previous)}){hint}")
    owner = {"pid": os.getpid(), "host": host,
             "started": datetime.datetime.now(datetime.UTC).isoformat(
                 timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  # A non-empty record left by a run that is gone: it ended without releasing (crash, kill -9).
  stale = previous if previous and previous.get("pid") is not None else None
  return WorkdirLock(path, fd, stale)


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike, *, process_index: int = 0) -> Iterator[WorkdirLock]:
  """`acquire_workdir_lock` as a context manager: the lock is released on exit.

  Example:
    with lock_workdir(workdir, process_index=jax.process_index()):
      ...  # train
  """
  lock = acquire_workdir_lock(workdir, process_index=process_index)
  try:
    yield lock
  finally:
    lock.release()


def ensure_writable(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` if needed and checks that a file can be written in it.

  Returns:
    The workdir as a path.

  Raises:
    WorkdirNotWritableError: one line naming the path and the reason (permission denied,
      read-only file system, a file where a folder should be, disk full).
  """
  workdir = pathlib.Path(workdir).expanduser()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir) as probe:
      probe.write(b"probe")
      probe.flush()
  except OSError as e:
    raise WorkdirNotWritableError(
        f"workdir {workdir} is not writable: {e.strerror or e}") from None
  return workdir


def require_existing_run(workdir: str | os.PathLike,
                         checkpoint_folders: tuple[str, ...] = ("checkpoints", "best")
                         ) -> pathlib.Path:
  """Checks, without creating anything, that `workdir` holds a run to read (eval/embed modes).

  Args:
    workdir: the run folder.
    checkpoint_folders: folders of which at least one must exist.

  Returns:
    The workdir as a path.

  Raises:
    MissingFileError: the workdir or all of its checkpoint folders are absent.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise errors.MissingFileError(f"workdir {workdir} does not exist: nothing to evaluate")
  if not any((workdir / name).is_dir() for name in checkpoint_folders):
    raise errors.MissingFileError(
        f"workdir {workdir} has no checkpoints ({' or '.join(checkpoint_folders)} folder): "
        "train first, or point --workdir at a finished run")
  return workdir


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Replaces `path` with `text` so that a reader (or a crash) sees the old or the new file."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def truncate_metrics(path: str | os.PathLike, step: int,
                     log_fn: Callable[[str], Any] | None = None) -> int:
  """Drops the rows of a metrics.jsonl beyond `step`, so a resumed run does not log steps twice.

  A run killed after logging step 45 but resumed from the checkpoint of step 40 replays steps
  41-45; their first rows are removed here. A torn last line (killed mid-write) is dropped too,
  and so is any damaged line (not UTF-8, not JSON, not an object with an integer "step"), with
  one warning through `log_fn` saying how many: a damaged log never blocks a resume. The file is
  rewritten atomically; nothing is written when no row goes.

  Args:
    path: the metrics.jsonl file (absent: nothing to do).
    step: the restored step; rows with `"step" > step` go.
    log_fn: receives the warning about damaged lines (None: no warning).

  Returns:
    The number of rows (or torn or damaged lines) dropped.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  kept, dropped, damaged = [], 0, 0
  for raw in path.read_bytes().splitlines():
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8")
      row = json.loads(line)
      row_step = row["step"]
      if isinstance(row_step, bool) or not isinstance(row_step, int):
        raise TypeError(row_step)
    except (ValueError, TypeError, KeyError, IndexError):
      damaged += 1
      continue
    if row_step > step:
      dropped += 1
    else:
      kept.append(line)
  if damaged and log_fn is not None:
    log_fn(f"{path}: skipped {damaged} damaged line(s) (not a JSON object with an integer "
           "\"step\"); the other rows are kept")
  if dropped or damaged:
    atomic_write_text(path, "".join(line + "\n" for line in kept))
  return dropped + damaged
