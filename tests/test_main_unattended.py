"""recall_jax.main as a batch scheduler runs it: no terminal, TensorBoard, compilation cache."""

import os
import pathlib
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

from recall_jax import config as config_lib
from recall_jax import errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir, omniglot_root, *extra):
  """A smoke run with stdout and stderr captured (not terminals), compilations logged."""
  env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(workdir), f"--config.data.root={omniglot_root}",
       "--config.num_grid_queries=0", "--config.data.max_eval_images=100", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _scalars(events_file):
  """{tag: [(step, value)]} of a TensorBoard events file (TFRecord framing, read directly)."""
  data, out, at = events_file.read_bytes(), {}, 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_plain_progress_tensorboard_and_a_warm_compilation_cache(tmp_path, omniglot_root):
  first = _train(tmp_path / "first", omniglot_root)
  # No terminal: plain progress lines, no carriage-return redraws in the captured output.
  assert "\r" not in first.stdout + first.stderr
  last = [line for line in first.stdout.splitlines() if line.startswith("train step ")][-1]
  assert last.startswith("train step 3/3 (100%) | loss ") and " | ETA " in last

  # TensorBoard events with the train scalars of every logged step.
  (events,) = (tmp_path / "first" / "tensorboard").glob("events.out.tfevents.*")
  scalars = _scalars(events)
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
  assert {"train/learning_rate", "train/images_per_s"} <= set(scalars)

  # The first run filled the cache under its workdir; a re-launch with a fresh workdir pointed
  # at that cache loads the compiled computations instead of compiling them.
  cache = tmp_path / "first" / "compilation_cache"
  entries = {p.name for p in cache.iterdir()}
  assert entries
  assert "Persistent compilation cache hit" not in first.stderr
  second = _train(tmp_path / "second", omniglot_root, f"--config.compilation_cache_dir={cache}")
  assert second.stderr.count("Persistent compilation cache hit") >= 3
  assert not (tmp_path / "second" / "compilation_cache").exists()


def test_a_compilation_cache_path_that_is_a_file_is_refused(tmp_path):
  c = config_lib.smoke(config_lib.base_config())
  c.compilation_cache_dir = str(tmp_path / "cache")
  config_lib.validate(c)  # A folder still to be made is fine.
  (tmp_path / "cache").write_text("not a folder")
  with pytest.raises(errors.ConfigError, match="compilation_cache_dir .* is a file, not a folder"):
    config_lib.validate(c)
