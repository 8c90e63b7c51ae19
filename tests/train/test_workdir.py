"""Tests for the workdir lock and the run-folder checks (real second processes, real files)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from recall_jax import errors
from recall_jax.train import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Takes the lock in a separate process, says so, then either waits for stdin to close (a live
# owner) or kills itself with SIGKILL while holding it (a crashed owner).
_HOLDER = """
import os, signal, sys
from recall_jax.train import workdir
lock = workdir.acquire_workdir_lock(sys.argv[1])
print(os.getpid(), flush=True)
if sys.argv[2] == "crash":
  os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
lock.release()
"""


def _start_holder(path: pathlib.Path, how: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  return subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), how], cwd=REPO_ROOT,
                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def live_owner(tmp_path):
  """A second process holding the lock on tmp_path/run; yields (workdir, its pid)."""
  run = tmp_path / "run"
  holder = _start_holder(run, "hold")
  pid = int(holder.stdout.readline())
  try:
    yield run, pid
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)


def test_second_run_is_refused_naming_the_owner(live_owner):
  run, pid = live_owner
  with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {pid} on host") as info:
    workdir_lib.acquire_workdir_lock(run)
  assert isinstance(info.value, errors.UserInputError)
  assert str(run) in str(info.value)


def test_lock_is_free_after_the_owner_releases(tmp_path):
  run = tmp_path / "run"
  holder = _start_holder(run, "hold")
  holder.stdout.readline()
  holder.stdin.close()
  assert holder.wait(timeout=60) == 0
  with workdir_lib.lock_workdir(run) as lock:
    assert lock.held
    assert lock.previous_owner is None  # released cleanly: nothing stale
    owner = json.loads((run / workdir_lib.LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
  assert not lock.held


def test_lock_of_a_killed_owner_is_taken_over(tmp_path):
  run = tmp_path / "run"
  holder = _start_holder(run, "crash")
  dead_pid = int(holder.stdout.readline())
  assert holder.wait(timeout=60) == -signal.SIGKILL
  lock = workdir_lib.acquire_workdir_lock(run)
  try:
    assert lock.held
    assert lock.previous_owner["pid"] == dead_pid
  finally:
    lock.release()


def test_only_the_coordinating_process_locks(live_owner):
  run, _ = live_owner
  lock = workdir_lib.acquire_workdir_lock(run, process_index=1)  # would fail on process 0
  assert not lock.held
  lock.release()


def test_same_process_cannot_lock_twice(tmp_path):
  with workdir_lib.lock_workdir(tmp_path / "run"), pytest.raises(workdir_lib.WorkdirInUseError):
    workdir_lib.acquire_workdir_lock(tmp_path / "run")


@pytest.fixture
def no_flock(monkeypatch):
  """A file system without flock (as some parallel file systems are)."""
  def unsupported(fd, operation):
    del fd, operation
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(fcntl, "flock", unsupported)


def _write_owner(run: pathlib.Path, pid: int, host: str) -> None:
  run.mkdir(parents=True, exist_ok=True)
  (run / workdir_lib.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host,
                                                       "started": "earlier"}))


def test_without_flock_a_live_pid_on_this_host_holds_the_lock(tmp_path, no_flock):
  del no_flock
  with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                        stdin=subprocess.PIPE) as other:
    _write_owner(tmp_path, other.pid, socket.gethostname())
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {other.pid}"):
      workdir_lib.acquire_workdir_lock(tmp_path)
    other.stdin.close()


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path, no_flock):
  del no_flock
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
  dead_pid = int(finished.stdout)
  _write_owner(tmp_path, dead_pid, socket.gethostname())
  with workdir_lib.lock_workdir(tmp_path) as lock:
    assert lock.previous_owner["pid"] == dead_pid
  # Released: the next run takes it without a stale owner.
  with workdir_lib.lock_workdir(tmp_path) as lock:
    assert lock.previous_owner is None


def test_without_flock_another_host_is_trusted_and_named(tmp_path, no_flock):
  del no_flock
  _write_owner(tmp_path, 12345, "node-that-is-not-us")
  with pytest.raises(workdir_lib.WorkdirInUseError,
                     match=r"node-that-is-not-us.*if that run has ended, delete .*\.lock"):
    workdir_lib.acquire_workdir_lock(tmp_path)


def test_unwritable_workdir_is_one_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(workdir_lib.WorkdirNotWritableError, match=f"workdir {blocker / 'run'}"):
    workdir_lib.ensure_writable(blocker / "run")
  with pytest.raises(workdir_lib.WorkdirNotWritableError):
    workdir_lib.acquire_workdir_lock(blocker / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_is_one_clear_error(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  run.chmod(0o500)
  try:
    with pytest.raises(workdir_lib.WorkdirNotWritableError, match="not writable"):
      workdir_lib.ensure_writable(run)
  finally:
    run.chmod(0o700)


def test_ensure_writable_creates_the_folder(tmp_path):
  assert workdir_lib.ensure_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
  assert (tmp_path / "a" / "b").is_dir()
  assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe leaves nothing behind


def test_eval_on_a_missing_workdir_creates_nothing(tmp_path):
  with pytest.raises(errors.MissingFileError, match="does not exist"):
    workdir_lib.require_existing_run(tmp_path / "missing")
  assert not (tmp_path / "missing").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.MissingFileError, match="has no checkpoints"):
    workdir_lib.require_existing_run(tmp_path / "empty")
  assert list((tmp_path / "empty").iterdir()) == []
  (tmp_path / "empty" / "best").mkdir()
  assert workdir_lib.require_existing_run(tmp_path / "empty") == tmp_path / "empty"


def _rows(steps):
  return [{"step": s, "kind": "train", "loss": 1.0 / s} for s in steps]


def test_truncate_metrics_drops_rows_beyond_the_restored_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = _rows([1, 2, 3, 4]) + [{"step": 4, "kind": "eval", "test/recall@1": 0.5}] + _rows([5])
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert workdir_lib.truncate_metrics(path, 3) == 3
  kept = [json.loads(line) for line in path.read_text().splitlines()]
  assert kept == rows[:3]
  assert workdir_lib.truncate_metrics(path, 3) == 0  # idempotent
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_truncate_metrics_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _rows([1, 2])) + '{"step": 3, "ki')
  assert workdir_lib.truncate_metrics(path, 10) == 1
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_truncate_metrics_without_a_file_does_nothing(tmp_path):
  assert workdir_lib.truncate_metrics(tmp_path / "metrics.jsonl", 5) == 0
  assert not (tmp_path / "metrics.jsonl").exists()


def test_atomic_write_text_replaces_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("old")
  workdir_lib.atomic_write_text(path, "new")
  assert path.read_text() == "new"
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
  # Readable like any file the program writes (mkstemp alone would leave it 0600).
  umask = os.umask(0o022)
  try:
    workdir_lib.atomic_write_text(path, "newer")
  finally:
    os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o644


def test_truncate_metrics_skips_damaged_lines_with_one_warning(tmp_path):
  path = tmp_path / "metrics.jsonl"
  good = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) for s in (1, 2, 3)]
  damaged = [b"\xff\xfe not utf-8", b'{"step": null, "kind": "train"}', b"[1, 2]", b'"text"',
             b'{"kind": "eval"}', b'{"step": true}']
  path.write_bytes(b"\n".join([good[0].encode(), *damaged, good[1].encode(), good[2].encode()])
                   + b"\n")
  said = []
  assert workdir_lib.truncate_metrics(path, 2, log_fn=said.append) == len(damaged) + 1
  assert path.read_text().splitlines() == good[:2]
  assert len(said) == 1 and f"skipped {len(damaged)} damaged line(s)" in said[0]
