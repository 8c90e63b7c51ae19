"""Tests for checkpoint checksums and the finiteness guard, on real Orbax checkpoints."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from recall_jax import errors
from recall_jax.train import integrity
from recall_jax.train import train_step as train_step_lib

_STEPS = (10, 20)


def _state(step: int) -> train_step_lib.TrainState:
  params = {"dense": {"kernel": jnp.full((8, 4), float(step)), "bias": jnp.arange(4.0)}}
  state = train_step_lib.init_train_state(params, optax.adamw(1e-3))
  return state.replace(step=jnp.array(step, jnp.int32))


def _manager(directory: pathlib.Path, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False, **options))


def _save(manager: ocp.CheckpointManager, state) -> None:
  """Saves like the training loop does (state + JSON meta), then records the checksums."""
  step = int(state.step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"best_value": 0.5})),
               force=True)
  manager.wait_until_finished()
  integrity.write_manifest(integrity.step_path(manager.directory, step))


def _restore(manager: ocp.CheckpointManager, step: int):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(0))
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
  manager = _manager(directory, max_to_keep=3)
  for step in _STEPS:
    _save(manager, _state(step))
  manager.close()
  return directory


@pytest.fixture
def checkpoints(pristine, tmp_path) -> pathlib.Path:
  """A fresh copy of two intact saved steps (10 and 20) in tmp_path/checkpoints."""
  return pathlib.Path(shutil.copytree(pristine, tmp_path / "checkpoints"))


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_intact_steps_verify_and_restore(checkpoints):
  for step in _STEPS:
    assert integrity.verify_step(checkpoints / str(step)) is None
  assert integrity.newest_intact_step(checkpoints, _STEPS) == (20, [])
  manifest = json.loads((checkpoints / "20" / integrity.MANIFEST_NAME).read_text())
  recorded = set(manifest["files"])
  on_disk = {p.relative_to(checkpoints / "20").as_posix()
             for p in (checkpoints / "20").rglob("*") if p.is_file()}
  assert recorded == on_disk - {integrity.MANIFEST_NAME}
  assert "_CHECKPOINT_METADATA" in recorded and "state/_METADATA" in recorded
  restored = _restore(_manager(checkpoints), 20)
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((8, 4), 20.0))


def _flip_16_bytes(step_dir):
  path = _largest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  path.write_bytes(bytes(data))
  return path, "checksum mismatch"


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:-7])
  return path, "bytes"


def _delete(step_dir):
  path = _largest_array_file(step_dir)
  path.unlink()
  return path, "missing"


def _remove_state_metadata(step_dir):
  path = step_dir / "state" / "_METADATA"
  path.unlink()
  return path, "missing"


def _remove_step_metadata(step_dir):
  path = step_dir / "_CHECKPOINT_METADATA"
  path.unlink()
  return path, "missing"


@pytest.mark.parametrize("damage", [_flip_16_bytes, _truncate, _delete, _remove_state_metadata,
                                    _remove_step_metadata])
def test_damaged_newest_step_falls_back_to_the_older_one(checkpoints, damage):
  path, what = damage(checkpoints / "20")
  name = path.relative_to(checkpoints / "20").as_posix()
  problem = integrity.verify_step(checkpoints / "20")
  assert problem is not None and name in problem and what in problem
  step, skipped = integrity.newest_intact_step(checkpoints, _STEPS)
  assert step == 10
  assert skipped == [f"checkpoint 20 is corrupt or incomplete (checkpoints/20/{problem})"]
  with pytest.raises(integrity.CorruptCheckpointError, match=f"checkpoint 20 .*{name}") as info:
    integrity.require_intact(checkpoints, 20)
  assert isinstance(info.value, errors.UserInputError)
  assert integrity.require_intact(checkpoints, 10) is None


def test_a_step_without_manifest_is_not_intact(checkpoints):
  (checkpoints / "20" / integrity.MANIFEST_NAME).unlink()
  step, skipped = integrity.newest_intact_step(checkpoints, _STEPS)
  assert step == 10 and "no checksums.json" in skipped[0]


@pytest.mark.parametrize("text", ['{"format": 1, "fil', '{"format": 1, "files": {}}',
                                  '{"format": 1, "files": {"_CHECKPOINT_METADATA": {"size": 1}}}',
                                  '{"format": 2, "files": {"a": {"size": 1, "sha256": "0"}}}'])
def test_an_unreadable_manifest_is_not_intact(checkpoints, text):
  (checkpoints / "20" / integrity.MANIFEST_NAME).write_text(text)
  assert "unreadable" in integrity.verify_step(checkpoints / "20")


def test_no_intact_step_names_every_problem(checkpoints):
  _flip_16_bytes(checkpoints / "20")
  shutil.rmtree(checkpoints / "10")
  step, skipped = integrity.newest_intact_step(checkpoints, _STEPS)
  assert step is None
  assert [line.split(" is ")[0] for line in skipped] == ["checkpoint 20", "checkpoint 10"]
  assert "folder missing" in skipped[1]
  assert integrity.newest_intact_step(checkpoints, []) == (None, [])


def test_corrupt_step_is_set_aside_and_the_run_saves_it_again(checkpoints, tmp_path):
  _flip_16_bytes(checkpoints / "20")
  manager = _manager(checkpoints, max_to_keep=3)
  step, _ = integrity.newest_intact_step(checkpoints, manager.all_steps())
  for bad in [s for s in manager.all_steps() if s > step]:
    moved = integrity.set_aside(checkpoints, bad, tmp_path / "corrupt_checkpoints")
    assert moved == tmp_path / "corrupt_checkpoints" / "20" and moved.is_dir()
  manager.reload()
  assert manager.latest_step() == 10
  restored = _restore(manager, 10)
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((8, 4), 10.0))
  _save(manager, _state(20))  # replaying to step 20 saves it again
  assert integrity.newest_intact_step(checkpoints, manager.all_steps()) == (20, [])
  # A second bad step 20 does not overwrite the first one set aside.
  _delete(checkpoints / "20")
  again = integrity.set_aside(checkpoints, 20, tmp_path / "corrupt_checkpoints")
  assert again.name == "20-1"


@pytest.mark.parametrize("damage", [_flip_16_bytes, _remove_step_metadata])
def test_resume_step_goes_back_to_the_newest_intact_step(checkpoints, tmp_path, damage):
  manager = _manager(checkpoints, max_to_keep=3)
  _save(manager, _state(30))
  damage(checkpoints / "30")
  damage(checkpoints / "20")
  step, skipped = integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt_checkpoints")
  assert step == 10
  assert [line.split(" is ")[0] for line in skipped] == ["checkpoint 30", "checkpoint 20"]
  assert sorted(manager.all_steps()) == [10]
  assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["20", "30"]
  _save(manager, _state(20))  # the replayed steps save again
  assert integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt_checkpoints") == (20, [])


def test_resume_step_of_a_new_run(tmp_path):
  manager = _manager(tmp_path / "checkpoints")
  assert integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt") == (None, [])
  assert not (tmp_path / "corrupt").exists()


def test_resume_step_refuses_when_every_step_is_damaged(checkpoints, tmp_path):
  _flip_16_bytes(checkpoints / "20")
  _delete(checkpoints / "10")
  manager = _manager(checkpoints)
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r"no intact checkpoint in .*checkpoint 20 .*; checkpoint 10 ") as info:
    integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt")
  assert isinstance(info.value, errors.UserInputError)
  assert sorted(manager.all_steps()) == [10, 20]  # nothing moved
  assert not (tmp_path / "corrupt").exists()


def test_resume_step_uses_a_step_without_manifest_when_nothing_is_intact(checkpoints, tmp_path):
  """Checkpoints of a version without checksums, or a keep_checkpoints=1 run killed while writing
  the manifest of its only step: complete (Orbax commits atomically) but unverifiable."""
  manager = _manager(checkpoints, max_to_keep=3)
  _save(manager, _state(30))
  _flip_16_bytes(checkpoints / "30")
  for step in _STEPS:
    (checkpoints / str(step) / integrity.MANIFEST_NAME).unlink()
  step, messages = integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt")
  assert step == 20
  assert messages[0].startswith("checkpoint 30 is corrupt or incomplete")
  assert messages[1] == ("checkpoint 20 has no checksums.json and no older checkpoint is intact: "
                         "using it unverified")
  assert len(messages) == 2
  assert sorted(manager.all_steps()) == [10, 20]
  np.testing.assert_array_equal(_restore(manager, 20).params["dense"]["kernel"],
                                np.full((8, 4), 20.0))


def test_an_intact_older_step_wins_over_a_newer_one_without_manifest(checkpoints, tmp_path):
  (checkpoints / "20" / integrity.MANIFEST_NAME).unlink()
  manager = _manager(checkpoints)
  step, messages = integrity.resume_step(manager, set_aside_to=tmp_path / "corrupt")
  assert step == 10 and len(messages) == 1 and "no checksums.json" in messages[0]
  assert (tmp_path / "corrupt" / "20").is_dir()


def test_newest_usable_step_only_reads(checkpoints):
  _flip_16_bytes(checkpoints / "20")
  (checkpoints / "10" / integrity.MANIFEST_NAME).unlink()
  before = sorted(p.relative_to(checkpoints) for p in checkpoints.rglob("*"))
  step, messages = integrity.newest_usable_step(checkpoints, [10, 20])
  assert step == 10 and len(messages) == 2 and "unverified" in messages[1]
  assert sorted(p.relative_to(checkpoints) for p in checkpoints.rglob("*")) == before
  assert integrity.newest_usable_step(checkpoints, []) == (None, [])
  shutil.rmtree(checkpoints / "10")
  with pytest.raises(integrity.CorruptCheckpointError, match="no intact checkpoint"):
    integrity.newest_usable_step(checkpoints, [10, 20])


def test_require_intact_may_accept_a_step_without_manifest(checkpoints):
  (checkpoints / "20" / integrity.MANIFEST_NAME).unlink()
  with pytest.raises(integrity.CorruptCheckpointError, match="no checksums.json"):
    integrity.require_intact(checkpoints, 20)
  warning = integrity.require_intact(checkpoints, 20, allow_unverified=True)
  assert warning == (f"checkpoint 20 in {checkpoints} has no checksums.json: loading it "
                     "unverified")
  assert integrity.require_intact(checkpoints, 10, allow_unverified=True) is None
  _flip_16_bytes(checkpoints / "10")
  with pytest.raises(integrity.CorruptCheckpointError, match="checksum mismatch"):
    integrity.require_intact(checkpoints, 10, allow_unverified=True)
  with pytest.raises(integrity.CorruptCheckpointError, match="folder missing"):
    integrity.require_intact(checkpoints, 99, allow_unverified=True)


def test_manifest_survives_later_saves_and_restores(checkpoints):
  manager = _manager(checkpoints, max_to_keep=2)
  _restore(manager, 20)
  _save(manager, _state(30))  # Orbax deletes step 10 (max_to_keep=2), manifest and all
  assert sorted(manager.all_steps()) == [20, 30]
  assert not (checkpoints / "10").exists()
  assert integrity.newest_intact_step(checkpoints, manager.all_steps()) == (30, [])
  assert integrity.verify_step(checkpoints / "20") is None


def test_write_manifest_needs_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError):
    integrity.write_manifest(tmp_path / "40")


def test_orbax_removes_an_interrupted_save_at_start(checkpoints):
  """A save interrupted by a second Ctrl-C leaves `<step>.orbax-checkpoint-tmp-<time>`: the
  manager option `cleanup_tmp_directories=True` removes it (started when the manager is built,
  finished before its first save)."""
  leftover = checkpoints / "30.orbax-checkpoint-tmp-1764400000"
  shutil.copytree(checkpoints / "20", leftover)
  (leftover / "commit_success.txt").unlink()
  assert sorted(_manager(checkpoints).all_steps()) == [10, 20]  # never a step
  manager = _manager(checkpoints, cleanup_tmp_directories=True)
  _save(manager, _state(25))  # the first save waits for the clean-up to finish
  assert not leftover.exists()
  assert sorted(manager.all_steps()) == [10, 20, 25]


# ------------------------------------------------------------------------------------------------
# Finiteness.
# ------------------------------------------------------------------------------------------------


def _reference_is_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact) or x.dtype == jnp.bfloat16)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("leaf", [0, 1, 2])
def test_is_finite_tree_matches_numpy(bad, leaf):
  rng = np.random.default_rng(leaf)
  leaves = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(7,)).astype(np.float32),
            rng.normal(size=(2, 2)).astype(jnp.bfloat16)]
  if bad is not None:
    leaves[leaf].flat[rng.integers(leaves[leaf].size)] = bad
  tree = {"a": jnp.asarray(leaves[0]), "b": [jnp.asarray(leaves[1]), {"c": jnp.asarray(leaves[2])}],
          "count": jnp.array(3, jnp.int32)}
  assert integrity.is_finite_tree(tree) == _reference_is_finite(tree) == (bad is None)


def test_is_finite_tree_skips_integers_and_keys():
  tree = {"step": jnp.array(2**31 - 1, jnp.int32), "key": jax.random.key(0),
          "raw_key": jax.random.PRNGKey(1), "w": jnp.ones(3)}
  assert integrity.is_finite_tree(tree)
  assert integrity.is_finite_tree({})
  assert not integrity.is_finite_tree({**tree, "w": jnp.array([1.0, jnp.nan, 2.0])})


def test_is_finite_tree_on_a_train_state_and_sharded_arrays():
  state = _state(10)
  assert integrity.is_finite_tree(state)
  # A NaN that appears only in the optimizer state (Adam's second moment) is caught too.
  nan_opt = jax.tree.map(lambda x: x * jnp.nan if x.ndim == 2 else x, state.opt_state)
  assert not integrity.is_finite_tree(state.replace(opt_state=nan_opt))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rows = 4 * len(jax.devices())
  sharded = jax.device_put(jnp.ones((rows, 3)), spec)
  assert integrity.is_finite_tree({"x": sharded})
  assert not integrity.is_finite_tree({"x": sharded.at[rows - 1, 2].set(jnp.inf)})


def test_a_diverged_state_is_refused_naming_the_newest_intact_checkpoint(checkpoints):
  _flip_16_bytes(checkpoints / "20")
  state = _state(21)
  diverged = jax.tree.map(lambda x: x + jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else x,
                          state)
  integrity.raise_if_not_finite(state, step=21, checkpoint_dir=checkpoints, steps=_STEPS)
  with pytest.raises(integrity.NonFiniteStateError,
                     match=r"after step 21 .*nothing was saved. The newest intact checkpoint, "
                           r"step 10 in .*checkpoints, is finite"):
    integrity.raise_if_not_finite(diverged, step=21, checkpoint_dir=checkpoints, steps=_STEPS)
  with pytest.raises(integrity.NonFiniteStateError, match="There is no intact checkpoint"):
    integrity.raise_if_not_finite(diverged, step=1, checkpoint_dir=checkpoints, steps=[])
