"""Checkpoints of a run: latest/best managers, `latest|best|N`, full and params-only restores."""

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
