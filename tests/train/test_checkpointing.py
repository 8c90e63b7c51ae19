"""Checkpoints of a run: latest/best managers, `latest|best|N`, full and params-only restores."""

import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recall_jax import errors
from recall_jax.train import checkpointing
from recall_jax.train import integrity
from recall_jax.train import train_step


def state_at(step):
  params = {"w": jnp.full((2, 3), float(step)), "b": jnp.arange(3.0) + step}
  state = train_step.init_train_state(params, optax.adam(1e-3))
  return state.replace(step=jnp.asarray(step, jnp.int32))


def test_save_resolve_and_restore(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    checkpointing.save(checkpoints.latest, state_at(step), {"best_value": 0.1 * step})
  checkpointing.save(checkpoints.best, state_at(2), {"best_value": 0.2})

  assert checkpointing.resolve(checkpoints, "latest") == (checkpoints.latest, 3)
  assert checkpointing.resolve(checkpoints, "best") == (checkpoints.best, 2)
  assert checkpointing.resolve(checkpoints, "2") == (checkpoints.latest, 2)
  with pytest.raises(errors.MissingFileError, match=r"no checkpoint at step 1 .*: \[2, 3\]"):
    checkpointing.resolve(checkpoints, "1")  # only the latest 2 are kept

  state, meta = checkpointing.restore(checkpoints.latest, 3, state_at(0))
  assert meta == {"best_value": pytest.approx(0.3)}
  jax.tree.map(np.testing.assert_array_equal, state, state_at(3))

  params, step = checkpointing.restore_params(tmp_path, "best", state_at(0).params)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, params, state_at(2).params)


def test_missing_and_malformed_checkpoints(tmp_path):
  with pytest.raises(errors.MissingFileError, match="no latest checkpoint"):
    checkpointing.restore_params(tmp_path / "run", "latest", state_at(0).params)
  assert not (tmp_path / "run").exists()  # read-only use creates nothing
  with pytest.raises(errors.ConfigError, match="'latest', 'best' or a step number, got 'newest'"):
    checkpointing.restore_params(tmp_path / "run", "newest", state_at(0).params)
  with pytest.raises(errors.ConfigError, match="a step number, got '\u00b2'"):
    checkpointing.restore_params(tmp_path / "run", "\u00b2", state_at(0).params)


def test_saves_are_checksummed_and_damaged_steps_are_not_restored(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=3)
  for step in (1, 2):
    checkpointing.save(checkpoints.latest, state_at(step), {})
  checkpointing.save(checkpoints.best, state_at(2), {})
  saved = [tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "2", tmp_path / "best" / "2"]
  for folder in saved:
    assert (folder / integrity.MANIFEST_NAME).is_file()
    assert integrity.verify_step(folder) is None

  # Truncate a file of the newest latest step and of the best step.
  for folder in (tmp_path / "checkpoints" / "2", tmp_path / "best" / "2"):
    damaged = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[:-1])
  said = []
  params, step = checkpointing.restore_params(tmp_path, "latest", state_at(0).params, said.append)
  assert step == 1 and len(said) == 1 and said[0].startswith("checkpoint 2 is corrupt")
  jax.tree.map(np.testing.assert_array_equal, params, state_at(1).params)
  for which in ("best", "2"):
    with pytest.raises(integrity.CorruptCheckpointError, match="checkpoint 2 in .* is corrupt"):
      checkpointing.restore_params(tmp_path, which, state_at(0).params)
  assert (tmp_path / "checkpoints" / "2").is_dir()  # reading moves nothing

  # Resuming sets the damaged step aside and goes back to step 1.
  step = checkpointing.resume_step(checkpoints.latest, tmp_path / "corrupt", said.append)
  assert step == 1 and said[-1].endswith("resuming from step 1")
  assert checkpoints.latest.all_steps() == [1]
  assert (tmp_path / "corrupt" / "2").is_dir()
  # A replayed step is saved again, replacing nothing but the missing folder.
  checkpointing.save(checkpoints.latest, state_at(2), {})
  assert integrity.verify_step(tmp_path / "checkpoints" / "2") is None


def test_async_save_survives_donation_and_writes_the_manifest_once_committed(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=2)
  state = state_at(1)
  expected = jax.tree.map(np.array, state)  # host copies, taken before anything is donated
  donate = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7, s), donate_argnums=0)
  with checkpointing.AsyncSaves() as saves:
    saves.save(checkpoints.latest, state, {"best_value": 0.5})
    overwritten = donate(state)  # as the next train step does, while the files are written
    saves.save(checkpoints.best, overwritten, {})  # another manager: written concurrently
    saves.wait(checkpoints.latest)
    assert integrity.verify_step(tmp_path / "checkpoints" / "1") is None
  assert integrity.verify_step(tmp_path / "best" / "7") is None  # waited for on leaving
  restored, meta = checkpointing.restore(checkpoints.latest, 1, state_at(0))
  assert meta == {"best_value": 0.5}
  jax.tree.map(np.testing.assert_array_equal, restored, expected)
  restored, _ = checkpointing.restore(checkpoints.best, 7, state_at(0))
  jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(lambda x: x * 0 + 7, expected))


def test_a_failed_async_save_is_raised_by_wait(tmp_path, monkeypatch):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=2)

  def disk_full(step_dir):
    raise OSError(28, "No space left on device", str(step_dir))

  monkeypatch.setattr(integrity, "write_manifest", disk_full)
  saves = checkpointing.AsyncSaves()
  saves.save(checkpoints.latest, state_at(1), {})
  with pytest.raises(OSError, match="No space left on device"):
    saves.wait()
  saves.wait()  # reported once


def _deleting_after_resolve(monkeypatch, steps_to_delete):
  """Makes the step that `resolve` picks vanish before Orbax reads it, as a training run's
  `keep_checkpoints` clean-up does, once for each of `steps_to_delete` (in order)."""
  real = checkpointing.resolve
  pending = list(steps_to_delete)

  def resolve_then_delete(checkpoints, which, log_fn=None):
    manager, step = real(checkpoints, which, log_fn)
    if pending and pending[0] == step:
      pending.pop(0)
      shutil.rmtree(integrity.step_path(manager.directory, step))
    return manager, step

  monkeypatch.setattr(checkpointing, "resolve", resolve_then_delete)
  return pending


def test_a_step_deleted_while_read_falls_back_to_the_newest_one(tmp_path, monkeypatch):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=3)
  for step in (1, 2, 3):
    checkpointing.save(checkpoints.latest, state_at(step), {})
  said = []
  pending = _deleting_after_resolve(monkeypatch, [3, 2])
  params, step = checkpointing.restore_params(tmp_path, "latest", state_at(0).params,
                                              log_fn=said.append)
  assert step == 1 and not pending
  jax.tree.map(np.testing.assert_array_equal, params, state_at(1).params)
  assert len(said) == 2 and "checkpoint 3 in" in said[0] and "deleted while it was read" in said[0]


def test_the_only_listed_step_replaced_while_checked_lists_again(tmp_path, monkeypatch):
  """keep_checkpoints=1: the run saves step 2 and deletes step 1 after the reader listed [1]."""
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=1)
  checkpointing.save(checkpoints.latest, state_at(1), {})
  real = integrity.newest_usable_step
  replaced = []

  def replaced_while_checked(directory, steps):
    if not replaced:
      replaced.append(True)
      checkpointing.save(checkpoints.latest, state_at(2), {})  # deletes step 1 (keep=1)
    return real(directory, steps)

  monkeypatch.setattr(integrity, "newest_usable_step", replaced_while_checked)
  params, step = checkpointing.restore_params(tmp_path, "latest", state_at(0).params)
  assert step == 2 and replaced
  jax.tree.map(np.testing.assert_array_equal, params, state_at(2).params)


def test_a_step_deleted_while_orbax_lists_the_folder_is_listed_again(tmp_path, monkeypatch):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=1)
  checkpointing.save(checkpoints.latest, state_at(1), {})
  real, vanished = checkpointing.ocp.CheckpointManager, []

  def listing_loses_a_step(directory, *args, **kwargs):
    if not vanished:  # a step listed, then deleted by the run before Orbax read its folder
      vanished.append(directory)
      raise FileNotFoundError(2, "No such file or directory", str(directory) + "/0")
    return real(directory, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", listing_loses_a_step)
  params, step = checkpointing.restore_params(tmp_path, "latest", state_at(0).params)
  assert step == 1 and vanished
  jax.tree.map(np.testing.assert_array_equal, params, state_at(1).params)


def test_a_corrupt_only_step_is_still_refused(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=1)
  checkpointing.save(checkpoints.latest, state_at(1), {})
  shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")  # damaged, nobody writing
  with pytest.raises(integrity.CorruptCheckpointError, match="no intact checkpoint"):
    checkpointing.restore_params(tmp_path, "latest", state_at(0).params)


def test_a_named_step_deleted_while_read_is_one_line(tmp_path, monkeypatch):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=3)
  for step in (1, 2):
    checkpointing.save(checkpoints.latest, state_at(step), {})
  _deleting_after_resolve(monkeypatch, [1])
  with pytest.raises(errors.MissingFileError, match=r"checkpoint 1 in .* was deleted while it was "
                     r"read .*name a newer step, or latest$"):
    checkpointing.restore_params(tmp_path, "1", state_at(0).params)


def test_a_step_that_fails_to_read_without_being_deleted_keeps_its_traceback(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=3)
  checkpointing.save(checkpoints.latest, state_at(1), {})
  wrong_shape = {"w": jnp.zeros((5, 5)), "b": jnp.zeros(3)}
  with pytest.raises(Exception) as info:
    checkpointing.restore_params(tmp_path, "latest", wrong_shape)
  assert not isinstance(info.value, errors.UserInputError)


def test_unfinished_saves_are_removed_before_make_checkpoints_returns(tmp_path):
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=2)
  checkpointing.save(checkpoints.latest, state_at(1), {})
  unfinished = [tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1733350000",
                tmp_path / "best" / "2.orbax-checkpoint-tmp-1733350001"]
  for folder in unfinished:
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "partial").write_bytes(b"x" * 10)
  before = set(threading.enumerate())
  checkpoints = checkpointing.make_checkpoints(tmp_path, keep=2)
  # Done synchronously: no thread is left to print a traceback if the program stops at once.
  assert not any(folder.exists() for folder in unfinished)
  assert [t for t in threading.enumerate() if t not in before and not t.daemon] == []
  assert checkpoints.latest.all_steps() == [1]
  assert checkpointing.make_checkpoints(tmp_path, read_only=True).latest.all_steps() == [1]
