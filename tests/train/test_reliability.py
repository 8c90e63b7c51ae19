"""What a run guarantees when things go wrong (docs/reliability.md), end to end on a tiny run.

Each test reproduces one failure a user can meet: a second run in the same workdir, a corrupt
checkpoint, an update that diverges on a save step, a bad or changed config, a replayed resume,
an interrupted save, an evaluation of a missing or unwritable workdir, an unreadable image. The
runs train a small CNN for a few steps on a folder dataset of 28 x 28 grey images written here.
"""

import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from recall_jax import errors
from recall_jax.train import experiment
from recall_jax.train import integrity
from recall_jax.train import modes
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import reporting
from recall_jax.train import trainer
from recall_jax.train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

# A config file as a user writes one: 4 classes of noisy prototypes, a small CNN, batches of 16
# (4 classes x m = 4), two steps per epoch, evaluation only at the end.
CONFIG_FILE = textwrap.dedent("""
    from recall_jax import config as config_lib

    def get_config(arg=None):
      c = config_lib.base_config()
      c.data.name, c.data.root, c.data.path = "folder", {root!r}, {path!r}
      c.data.image_size = c.data.resize_size = 28
      c.data.channels, c.data.crop_scale, c.data.flip = 1, (1.0, 1.0), False
      c.data.eval_batch_size = 16
      c.model.name, c.model.embedding_dim = "small_cnn", 16
      c.batch_size, c.samples_per_class, c.chunk_size = 16, 4, 8
      c.optimizer.name, c.optimizer.learning_rate, c.optimizer.milestones = "adam", 1e-3, ()
      c.epochs, c.max_steps, c.eval_every_epochs = 100, 4, 100
      c.checkpoint_every_steps, c.keep_checkpoints = 2, 3
      c.log_every_steps, c.num_grid_queries = 1, 0
      c.eval.k_values = c.loss.recall_at_k.k_values = (1, 2)
      return c
    """)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Compiles each step function once for the module's many short runs of the same model."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  previous = {k: getattr(jax.config, k) for k in keys}
  for key, value in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
    jax.config.update(key, value)
  yield
  for key, value in previous.items():
    jax.config.update(key, value)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """<root>/photos/{train,test}/class_<c>/<i>.png, plus one unreadable train/class_0/broken.png."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 256, (4, 28, 28))
  for split, per_class in (("train", 8), ("test", 4)):
    for label, prototype in enumerate(prototypes):
      class_dir = root / "photos" / split / f"class_{label}"
      class_dir.mkdir(parents=True)
      for i in range(per_class):
        noisy = np.clip(prototype + rng.normal(0, 40, prototype.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(class_dir / f"{i}.png")
  broken = root / "photos" / "train" / "class_0" / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)  # a PNG signature, then garbage
  config_file = root / "tiny.py"
  config_file.write_text(CONFIG_FILE.format(root=str(root), path=str(root / "photos")))
  return config_file


def load(config_file):
  spec = importlib.util.spec_from_file_location(config_file.stem, config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def rows(workdir, kind):
  return [r for r in reporting.read_metrics(workdir / "metrics.jsonl") if r["kind"] == kind]


def saved_steps(folder):
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def cli(config_file, workdir, *extra, code=""):
  """Runs `python -m recall_jax.main` (after `code`, e.g. a patch) and returns the process."""
  argv = ["recall_jax.main", "--config", str(config_file), "--workdir", str(workdir), *extra]
  program = f"import sys\n{code}\nfrom recall_jax import main\nsys.argv = {argv!r}\nmain.run()"
  env = dict(os.environ, PYTHONWARNINGS="ignore",
             JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env, check=False)


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_second_run_in_the_same_workdir_fails_at_once(dataset, tmp_path):
  workdir = tmp_path / "run"
  hold_until_stdin_closes = (
      "import sys\nfrom recall_jax.train import workdir\n"
      f"lock = workdir.acquire_workdir_lock({str(workdir)!r})\nprint('locked', flush=True)\n"
      "sys.stdin.read()")
  holder = subprocess.Popen(
      [sys.executable, "-c", hold_until_stdin_closes],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=rf"workdir {workdir} is in use by another run \(pid {holder.pid} "):
      trainer.train_and_evaluate(load(dataset), workdir)
    # Nothing of the run was written beside the holder's lock file.
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
  finally:
    holder.communicate(input="", timeout=60)
  # Once the first run is gone (its lock released or dead with it) the folder is free again.
  with workdir_lib.lock_workdir(workdir) as lock:
    assert lock.held


def flip_bytes(step_dir):
  """Flips 16 bytes in the middle of the step's largest file (as a failing disk would)."""
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  largest.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_older_intact_one(dataset, tmp_path, capsys):
  workdir = tmp_path / "run"
  c = load(dataset)
  trainer.train_and_evaluate(c, workdir)
  checkpoints = workdir / "checkpoints"
  assert saved_steps(checkpoints) == [2, 4]
  assert all(integrity.verify_step(checkpoints / str(s)) is None for s in (2, 4))
  at_2 = modes.evaluate_checkpoint(c, workdir, "2")
  embedded = lambda which: np.load(modes.embed_split(
      c, workdir, which, output=str(tmp_path / f"{which}.npz")))["embeddings"]
  emb_2, emb_4 = embedded("2"), embedded("4")
  assert not np.array_equal(emb_2, emb_4)
  capsys.readouterr()

  flip_bytes(checkpoints / "4")
  # Evaluation: `latest` is the newest intact step, said in one line; step 4 itself is refused.
  assert modes.evaluate_checkpoint(c, workdir, "latest") == at_2
  out = capsys.readouterr().out
  assert "checkpoint latest (step 2)" in out
  said = [line for line in out.splitlines() if "is corrupt" in line]
  assert len(said) == 1 and "checkpoint 4 is corrupt or incomplete" in said[0], said
  assert "checksum mismatch" in said[0] and said[0].endswith("using step 2")
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r"checkpoint 4 in .* is corrupt or incomplete \(.*checksum mismatch\)"):
    modes.evaluate_checkpoint(c, workdir, "4")
  np.testing.assert_array_equal(embedded("latest"), emb_2)
  assert saved_steps(checkpoints) == [2, 4]  # evaluation only reads
  capsys.readouterr()

  # Resuming: the run goes back to step 2, sets step 4 aside, replays steps 3-4 and saves again.
  leftover = checkpoints / "6.orbax-checkpoint-tmp-1764000000"  # a save cut short by a 2nd Ctrl-C
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "_METADATA").write_text("{}")
  trainer.train_and_evaluate(c, workdir)
  said = [line for line in capsys.readouterr().out.splitlines() if "is corrupt" in line]
  assert len(said) == 1 and said[0].endswith("resuming from step 2"), said
  assert saved_steps(checkpoints) == [2, 4]
  assert integrity.verify_step(checkpoints / "4") is None
  assert (workdir / "corrupt_checkpoints" / "4").is_dir()  # kept for inspection
  assert not leftover.exists()  # the interrupted save's temporary folder is cleaned at start
  # The replayed steps are logged once, and the replayed run ends where the first one did.
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3, 4]
  np.testing.assert_array_equal(embedded("latest"), emb_4)


def test_no_duplicate_metric_rows_after_a_resume(dataset, tmp_path):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 3
  trainer.train_and_evaluate(c, workdir)
  # As if killed after logging step 3 but before its checkpoint was written.
  os.rename(workdir / "checkpoints" / "3", tmp_path / "3")
  c.max_steps = 4
  trainer.train_and_evaluate(c, workdir)
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3, 4]
  assert [r["step"] for r in rows(workdir, "eval")] == [4]  # step 3's evaluation was replayed


# Code run before `main` that SIGKILLs the run while the save of step 4 is being written: right
# after Orbax's async `save` returned (files still being written in the background), or once
# Orbax committed the step but before its checksum manifest is written.
KILL_DURING_SAVE_4 = {
    "orbax_write": textwrap.dedent("""
        import os, signal
        import orbax.checkpoint as ocp
        real_save = ocp.CheckpointManager.save
        def save(self, step, *args, **kwargs):
          out = real_save(self, step, *args, **kwargs)
          if step == 4 and self.directory.name == "checkpoints":
            os.kill(os.getpid(), signal.SIGKILL)
          return out
        ocp.CheckpointManager.save = save
        """),
    "manifest": textwrap.dedent("""
        import os, pathlib, signal
        from recall_jax.train import integrity
        real_write = integrity.write_manifest
        def write_manifest(step_dir):
          if pathlib.Path(step_dir).parts[-2:] == ("checkpoints", "4"):
            os.kill(os.getpid(), signal.SIGKILL)
          return real_write(step_dir)
        integrity.write_manifest = write_manifest
        """),
}


@pytest.mark.parametrize("when", sorted(KILL_DURING_SAVE_4))
def test_kill_during_an_async_save_resumes_from_the_newest_intact_step(dataset, tmp_path, when,
                                                                      capsys):
  workdir = tmp_path / "run"
  proc = cli(dataset, workdir, code=KILL_DURING_SAVE_4[when])
  assert proc.returncode == -9, proc.stderr
  checkpoints = workdir / "checkpoints"
  assert integrity.verify_step(checkpoints / "2") is None
  assert integrity.verify_step(checkpoints / "4") is not None  # absent, in flight or unverified
  capsys.readouterr()
  trainer.train_and_evaluate(load(dataset), workdir)
  out = capsys.readouterr().out
  assert "resumed from step 2" in out
  if when == "manifest":  # committed by Orbax, without its manifest: set aside, said once
    said = [line for line in out.splitlines() if "is corrupt" in line]
    assert len(said) == 1 and said[0].startswith("checkpoint 4 is corrupt or incomplete ("), said
    assert f"no {integrity.MANIFEST_NAME}" in said[0] and said[0].endswith("resuming from step 2")
    assert (workdir / "corrupt_checkpoints" / "4").is_dir()
  assert saved_steps(checkpoints) == [2, 4]
  assert all(integrity.verify_step(checkpoints / str(s)) is None for s in (2, 4))
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3, 4]


def blow_up_on_update(number, real):
  """Wraps `real` (make_optimizer) so that update `number` (1-based) turns the params into inf."""

  def make_optimizer(c, steps_per_epoch):
    optimizer, schedule = real(c, steps_per_epoch)

    def update(updates, count, params=None):
      factor = jnp.where(count + 1 == number, jnp.inf, 1.0)
      return jax.tree.map(lambda u: u * factor, updates), count + 1

    blow_up = optax.GradientTransformation(lambda _: jnp.zeros([], jnp.int32), update)
    return optax.chain(optimizer, blow_up), schedule

  return make_optimizer


def test_update_that_diverges_on_a_save_step_is_not_saved(dataset, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 6  # the blow-up comes at step 4, a save step; the loss before it is finite
  monkeypatch.setattr(experiment.optimizer_lib, "make_optimizer",
                      blow_up_on_update(4, optimizer_lib.make_optimizer))
  with pytest.raises(integrity.NonFiniteStateError,
                     match=r"NaN/inf after step 4 .*nothing was saved.*step 2 in .*checkpoints"):
    trainer.train_and_evaluate(c, workdir)
  assert saved_steps(workdir / "checkpoints") == [2]
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows(workdir, "train"))


def test_main_prints_a_divergence_as_one_line(dataset, tmp_path):
  patch = "\n".join([
      "import jax, jax.numpy as jnp, optax", "from recall_jax.train import optimizer",
      inspect.getsource(blow_up_on_update),
      "optimizer.make_optimizer = blow_up_on_update(4, optimizer.make_optimizer)"])
  proc = cli(dataset, tmp_path / "run", code=patch)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  (line,) = error_lines(proc)
  assert "NaN/inf after step 4" in line and "step 2 in" in line
  assert saved_steps(tmp_path / "run" / "checkpoints") == [2]


@pytest.mark.parametrize("extra, message", [
    ("--config.keep_checkpoints=0", "keep_checkpoints must be an integer >= 1 (0 would delete"),
    ("--config.checkpoint_every_steps=0", "checkpoint_every_steps must be an integer >= 1"),
    ("--config.samples_per_class=1", "samples_per_class must be an integer >= 2"),
    ("--config.max_steps=0", "max_steps must be None (train for `epochs`) or an integer >= 1"),
    ("--config.max_steps=-5", "max_steps must be None (train for `epochs`) or an integer >= 1"),
    ("--config.no_such_key=1", "unknown config key --config.no_such_key"),
    ("--checkpoint=newest", "--checkpoint=newest: must be 'latest', 'best' or a step number"),
    ("--checkpoint=\u00b2", "must be 'latest', 'best' or a step number"),  # a digit to isdigit
    ("--checkpoint=-1", "--checkpoint=-1: must be 'latest', 'best' or a step number"),
])
def test_config_errors_are_one_line_with_exit_status_2(dataset, tmp_path, extra, message):
  proc = cli(dataset, tmp_path / "run", extra)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  (line,) = error_lines(proc)
  assert message in line, line
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir_is_one_line(dataset, tmp_path):
  (tmp_path / "a_file").write_text("in the way")
  proc = cli(dataset, tmp_path / "a_file" / "run")  # a file where a folder should be
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  expected = f"error: workdir {tmp_path / 'a_file' / 'run'} is not writable: Not a directory"
  assert error_lines(proc) == [expected]


def test_resuming_with_an_incompatible_config_is_refused(dataset, tmp_path):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 2
  trainer.train_and_evaluate(c, workdir)
  stored = (workdir / "config.json").read_bytes()
  c.model.embedding_dim, c.seed, c.max_steps = 8, 1, 4
  with pytest.raises(errors.ConfigError) as info:
    trainer.train_and_evaluate(c, workdir)
  message = str(info.value)
  assert "model.embedding_dim: 16 when the run started, 8 now" in message
  assert "seed: 0 when the run started, 1 now" in message
  assert f"checkpoint 2 in {workdir / 'checkpoints'}" in message  # the config saved with it
  assert (workdir / "config.json").read_bytes() == stored
  assert saved_steps(workdir / "checkpoints") == [2]
  # Keys the checkpoints do not depend on may change: the run resumes and trains on.
  c.model.embedding_dim, c.seed = 16, 0
  trainer.train_and_evaluate(c, workdir)
  assert saved_steps(workdir / "checkpoints") == [2, 4]
  assert json.loads((workdir / "config.json").read_text())["max_steps"] == 4


def test_eval_of_a_missing_workdir_creates_nothing(dataset, tmp_path):
  missing = tmp_path / "no_such_run"
  for run in (lambda: modes.evaluate_checkpoint(load(dataset), missing),
              lambda: modes.embed_split(load(dataset), missing, "best")):
    with pytest.raises(errors.MissingFileError, match=f"workdir {missing} does not exist"):
      run()
  assert not missing.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.MissingFileError, match="has no checkpoints"):
    modes.evaluate_checkpoint(load(dataset), empty)
  assert list(empty.iterdir()) == []


def test_skipped_images_are_said_and_recorded_in_metrics(dataset, tmp_path, capsys):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 1
  # The lock file of a run killed by kill -9: its record is left, its flock died with it.
  workdir.mkdir()
  (workdir / ".lock").write_text('{"pid": 999999999, "host": "node7", "started": "earlier"}\n')
  trainer.train_and_evaluate(c, workdir)
  out = capsys.readouterr().out
  assert "previous run (pid 999999999 on host node7) ended without releasing the lock" in out
  assert "folder/train: 1 of 33 listed images are unreadable and were skipped" in out
  (row,) = rows(workdir, "data")
  assert row == {"step": 0, "kind": "data", "train/skipped_images": 1, "train/listed_images": 33,
                 "test/skipped_images": 0, "test/listed_images": 16}
  # Said again, and recorded again, at every start (here a resume from step 1).
  c.max_steps = 2
  trainer.train_and_evaluate(c, workdir)
  assert [r["step"] for r in rows(workdir, "data")] == [0, 1]
  assert "folder/train: 1 of 33 listed images are unreadable" in capsys.readouterr().out


def test_a_failing_evaluation_loses_no_training(dataset, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 3  # step 3 is evaluated (the last) but is not a checkpoint_every_steps step

  def fail(*args, **kwargs):
    raise RuntimeError("evaluation failed")

  with monkeypatch.context() as patch:
    patch.setattr(trainer, "_evaluate", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
      trainer.train_and_evaluate(c, workdir)
  assert saved_steps(workdir / "checkpoints") == [2, 3]  # saved before the evaluation
  assert rows(workdir, "eval") == []
  # The rerun resumes at step 3 and runs the evaluation that failed, training nothing again.
  results = trainer.train_and_evaluate(c, workdir)
  assert [r["step"] for r in rows(workdir, "eval")] == [3]
  assert results == {k: v for k, v in rows(workdir, "eval")[0].items() if "/" in k}
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3]
  assert saved_steps(workdir / "best") == [3]


def test_damaged_metrics_lines_do_not_block_a_resume(dataset, tmp_path, capsys):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 2
  trainer.train_and_evaluate(c, workdir)
  with (workdir / "metrics.jsonl").open("ab") as f:
    f.write(b'\xff\xfe\n{"step": null, "kind": "train"}\n[1, 2]\n')
  c.max_steps = 4
  trainer.train_and_evaluate(c, workdir)
  assert "skipped 3 damaged line(s)" in capsys.readouterr().out
  assert [r["step"] for r in rows(workdir, "train")] == [1, 2, 3, 4]


def test_reading_latest_while_a_run_replaces_it_every_step(dataset, tmp_path):
  """eval/search/export restore `latest` while training keeps only its newest step."""
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps, c.keep_checkpoints, c.checkpoint_every_steps = 25, 1, 1
  argv = ["recall_jax.main", "--config", str(dataset), "--workdir", str(workdir),
          "--config.max_steps=25", "--config.keep_checkpoints=1",
          "--config.checkpoint_every_steps=1"]
  program = f"import sys\nfrom recall_jax import main\nsys.argv = {argv!r}\nmain.run()"
  training = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
  steps_read = []
  try:
    while training.poll() is None and not saved_steps_if_any(workdir / "checkpoints"):
      time.sleep(0.05)
    while training.poll() is None:
      _, variables, step = modes.restore_variables(c, workdir, "latest")
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables["params"]))
      steps_read.append(step)
    output = training.communicate(timeout=300)[0]
  finally:
    if training.poll() is None:
      training.kill()
      training.communicate()
  assert training.returncode == 0, output[-4000:]
  assert len(steps_read) >= 3 and steps_read == sorted(steps_read), steps_read
  assert saved_steps(workdir / "checkpoints") == [25]


def saved_steps_if_any(folder):
  return saved_steps(folder) if folder.is_dir() else []


@pytest.mark.parametrize("damage", ["deleted", "torn"])
def test_a_damaged_config_json_does_not_skip_the_resume_check(dataset, tmp_path, damage):
  workdir = tmp_path / "run"
  c = load(dataset)
  c.max_steps = 2
  trainer.train_and_evaluate(c, workdir)
  if damage == "deleted":
    (workdir / "config.json").unlink()
  else:
    (workdir / "config.json").write_text('{"model": {"embedding_dim"')
  c.model.embedding_dim, c.max_steps = 8, 4
  with pytest.raises(errors.ConfigError,
                     match="model.embedding_dim: 16 when the run started, 8 now"):
    trainer.train_and_evaluate(c, workdir)
  assert saved_steps(workdir / "checkpoints") == [2]
