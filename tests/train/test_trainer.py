"""End-to-end tests of the training program and the checkpoint modes on a tiny Omniglot run.

Category-level (square crops, Recall@k); the instance-level runs are in test_landmarks.py.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import array as jax_array  # the one Python path of float(), int(), device_get

from recall_jax import errors
from recall_jax.train import checkpointing
from recall_jax.train import experiment
from recall_jax.train import modes
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import reporting
from recall_jax.train import train_step as train_step_lib
from recall_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(name="omniglot", arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def smoke_config(omniglot_root):
  c = load_config()
  c.data.root = str(omniglot_root)
  c.num_grid_queries = 2
  c.data.max_eval_images = 200
  return c


def train_rows(workdir):
  return [r for r in reporting.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
          if r["kind"] == "train"]


def test_train_evaluate_embed(smoke_config, tmp_path, capsys, monkeypatch):
  # A relative workdir, as in the README's first command (Orbax itself wants absolute paths).
  monkeypatch.chdir(tmp_path.parent)
  results = trainer.train_and_evaluate(smoke_config, tmp_path.name)
  assert 0.0 < results["test/recall@1"] <= 1.0
  assert results["test/num_queries"] == 200
  rows = train_rows(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
  for png in ("training_curve.png", "recall.png", "retrieval_test.png"):
    assert (tmp_path / png).stat().st_size > 1000, png
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == smoke_config.batch_size

  evaluated = modes.evaluate_checkpoint(smoke_config, tmp_path.name, "latest")
  assert evaluated["test/recall@1"] == pytest.approx(results["test/recall@1"])
  assert "test/recall@1" in capsys.readouterr().out
  best = modes.evaluate_checkpoint(smoke_config, tmp_path, "best")
  assert best["test/recall@1"] == pytest.approx(results["test/recall@1"])

  out = modes.embed_split(smoke_config, tmp_path.name, "3", output=str(tmp_path / "emb.npz"))
  with np.load(out, allow_pickle=False) as f:
    emb, labels, ids = f["embeddings"], f["labels"], f["ids"]
  # embed covers the whole split, not the evaluation slice.
  assert emb.shape == (13_180, smoke_config.model.embedding_dim) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert labels.shape == ids.shape == (13_180,)
  assert len(set(ids.tolist())) == 13_180

  with pytest.raises(errors.MissingFileError, match="no checkpoint at step 7"):
    modes.evaluate_checkpoint(smoke_config, tmp_path, "7")
  with pytest.raises(errors.ConfigError, match="'latest', 'best' or a step number"):
    modes.evaluate_checkpoint(smoke_config, tmp_path, "newest")


def restored_state(c, workdir):
  """The full state of the latest checkpoint (template: a fresh state of the config's shapes)."""
  model = experiment.make_model(c)
  params = experiment.make_variables(c, model)["params"]
  template = train_step_lib.init_train_state(params, optimizer_lib.make_optimizer(c, 1)[0])
  latest = checkpointing.make_checkpoints(workdir).latest
  state, _ = checkpointing.restore(latest, latest.latest_step(), template)
  return state


def test_resume_is_bit_identical_and_nan_keeps_last_good_checkpoint(smoke_config, tmp_path,
                                                                    monkeypatch):
  smoke_config.max_steps = 4
  smoke_config.checkpoint_every_steps = 2
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(smoke_config, straight)

  interrupted = tmp_path / "interrupted"
  smoke_config.max_steps = 2
  trainer.train_and_evaluate(smoke_config, interrupted)
  smoke_config.max_steps = 4
  trainer.train_and_evaluate(smoke_config, interrupted)

  expected = {r["step"]: r["loss"] for r in train_rows(straight)}
  got = {r["step"]: r["loss"] for r in train_rows(interrupted)}
  assert sorted(got) == [1, 2, 3, 4]
  assert got == expected  # bit for bit, floats compared exactly
  state_a = restored_state(smoke_config, straight)
  state_b = restored_state(smoke_config, interrupted)
  assert int(state_a.step) == int(state_b.step) == 4
  jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
  jax.tree.map(np.testing.assert_array_equal, state_a.opt_state, state_b.opt_state)
  # Evaluation and embedding read the parameters alone, unchanged.
  params, step = checkpointing.restore_params(straight, "latest", state_a.params)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, state_a.params, params)

  # A NaN loss in the continuation stops the run and leaves checkpoint 4 as it was.
  real_make = experiment.make_loss_fn

  def poisoned(c):
    loss_fn, uses_rng = real_make(c)
    return (lambda *args: loss_fn(*args) * np.nan), uses_rng

  monkeypatch.setattr(experiment, "make_loss_fn", poisoned)
  smoke_config.max_steps = 6
  with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step 5.*step 4"):
    trainer.train_and_evaluate(smoke_config, straight)
  after = restored_state(smoke_config, straight)
  assert int(after.step) == 4
  jax.tree.map(np.testing.assert_array_equal, state_a.params, after.params)


def test_no_device_to_host_transfer_between_log_steps(smoke_config, tmp_path, monkeypatch):
  """Between boundaries the loop only dispatches work: nothing is read back from the device, and
  a log step's row is read one step late, once the next step is queued.

  Log steps 3 and 6 (log every 3) are read after steps 4 and 7 are dispatched; step 7, the last,
  saves and evaluates, which read at once. While the last dispatched step is any other, the main
  thread runs under `jax.transfer_guard_device_to_host("disallow")` (which an accelerator
  enforces), and a read of an array's value (`float`, `int`, `bool`, `jax.device_get`: what a
  CPU does not guard) raises.
  """
  c = smoke_config
  c.max_steps, c.log_every_steps, c.checkpoint_every_steps = 7, 3, 100
  c.cold_start_checks, c.num_grid_queries = False, 0
  reading_allowed_after = {4, 7}  # dispatched steps after which the loop may read
  guard, dispatched, reads = contextlib.ExitStack(), [], []
  real_value = jax_array.ArrayImpl._value

  def value(self):
    if threading.current_thread() is threading.main_thread():
      last = dispatched[-1] if dispatched else 0
      if last and last not in reading_allowed_after:
        raise AssertionError(f"a device-to-host read with step {last} the last dispatched")
      reads.append(last)
    return real_value.fget(self)

  real_step_at = experiment.Experiment.train_step_at

  def train_step_at(self, step):
    name, train_step = real_step_at(self, step)

    def step_under_guard(*args):
      guard.close()
      if step + 1 not in reading_allowed_after:
        guard.enter_context(jax.transfer_guard_device_to_host("disallow"))
      dispatched.append(step + 1)
      return train_step(*args)

    return name, step_under_guard

  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(value))
  dispatched.append(1)
  with pytest.raises(AssertionError, match="a device-to-host read"):
    float(jnp.ones(()) * 2)  # the spy sees a read
  dispatched.clear()
  monkeypatch.setattr(experiment.Experiment, "train_step_at", train_step_at)
  try:
    trainer.train_and_evaluate(c, tmp_path)
  finally:
    guard.close()
  assert [r["step"] for r in train_rows(tmp_path)] == [3, 6, 7]
  assert {4, 7} <= set(reads)  # rows 3 and 6 were read after steps 4 and 7 were queued
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train_rows(tmp_path))


def test_nan_between_boundaries_names_its_first_step(smoke_config, tmp_path, monkeypatch):
  c = smoke_config
  c.max_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 100, 3
  c.cold_start_checks, c.num_grid_queries = False, 0
  real_make = optimizer_lib.make_optimizer

  def make_optimizer(c, steps_per_epoch):
    optimizer, schedule = real_make(c, steps_per_epoch)

    def update(updates, count, params=None):  # update 4 turns the parameters into NaN
      del params
      nan_at_4 = jnp.where(count + 1 == 4, jnp.nan, 1.0)
      return jax.tree.map(lambda u: u * nan_at_4, updates), count + 1

    return optax.chain(optimizer, optax.GradientTransformation(
        lambda _: jnp.zeros([], jnp.int32), update)), schedule

  monkeypatch.setattr(experiment.optimizer_lib, "make_optimizer", make_optimizer)
  # Step 5's loss is the first NaN; nothing reads it until the save step 6, whose check names
  # step 5 and the save of step 3.
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"loss is nan at step 5; stopping without saving. .*\(step 3\)"):
    trainer.train_and_evaluate(c, tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]
  assert train_rows(tmp_path) == []


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(omniglot_root, tmp_path):
  env = dict(os.environ, RECALL_JAX_DATA=str(omniglot_root), PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(tmp_path), "--config.max_steps=200", "--config.checkpoint_every_steps=1000",
       "--config.num_grid_queries=0"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not train_rows(tmp_path) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  assert train_rows(tmp_path), "training never logged a step"
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  assert "SIGTERM received" in output
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and 1 <= saved[-1] < 200, saved
  assert saved[-1] == max(r["step"] for r in train_rows(tmp_path))


def write_folder_dataset(folder, counts, seed=0):
  """<folder>/<split>/<class>/<i>.png: 4 classes of 28 x 28 grey images, each a noisy prototype."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(0, 256, (4, 28, 28))
  for split, per_class in counts.items():
    for label, prototype in enumerate(prototypes):
      class_dir = folder / split / f"class_{label}"
      class_dir.mkdir(parents=True)
      for i in range(per_class):
        noisy = np.clip(prototype + rng.normal(0, 40, prototype.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(class_dir / f"{i}.png")


def test_folder_dataset_with_query_and_gallery_splits(tmp_path):
  write_folder_dataset(tmp_path / "photos", {"train": 8, "query": 2, "gallery": 4})
  c = load_config("default", arg=None)
  c.data.name, c.data.root, c.data.path = "folder", str(tmp_path), str(tmp_path / "photos")
  c.data.query_split, c.data.gallery_split = "query", "gallery"
  c.data.image_size = c.data.resize_size = 28
  c.data.channels, c.data.crop_scale, c.data.flip = 1, (1.0, 1.0), False
  c.data.eval_batch_size = 8
  c.model.name, c.model.embedding_dim, c.model.center_head_init = "small_cnn", 16, True
  c.batch_size, c.samples_per_class, c.chunk_size = 16, 4, 8
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  c.epochs, c.max_steps, c.eval_every_epochs = 1, 2, 1
  c.best_metric, c.num_grid_queries, c.log_every_steps = "query/recall@1", 2, 1
  c.eval.k_values = c.loss.recall_at_k.k_values = (1, 2)  # k below the batch size - 1
  workdir = tmp_path / "run"
  results = trainer.train_and_evaluate(c, workdir)
  assert results["query/num_queries"] == 8  # every query, searched in the 16 gallery images
  assert set(k for k in results if "recall@" in k) == {"query/recall@1", "query/recall@2"}
  assert (workdir / "retrieval_query.png").stat().st_size > 1000
  assert modes.evaluate_checkpoint(c, workdir, "best") == results
