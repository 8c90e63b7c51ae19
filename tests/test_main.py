"""The command line (recall_jax.main): flag and config errors, the console script, --mode eval.

Serves both tasks (category-level runs here; landmark runs in tests/train/test_landmarks.py).
"""

import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra, message", [
    (["--config.batch_size=30"], "not divisible by samples_per_class"),
    (["--config.no_such_key=1"], "error: unknown config key --config.no_such_key"),
    (["--config.batch_size=abc"], "batch_size"),
    (["--checkpoint=newest", "--mode=eval"], "'latest', 'best' or a step number"),
])
def test_user_errors_are_one_line_before_anything_is_built(tmp_path, extra, message):
  proc = subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(tmp_path), *extra],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_console_script_runs_main(tmp_path):
  # What pip installs as `recall-jax`: the function pyproject.toml names, with main's flags.
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  module, function = scripts["recall-jax"].split(":")
  argv = ["recall-jax", "--config", "configs/omniglot.py:smoke", "--workdir", str(tmp_path),
          "--config.no_such_key=1"]
  proc = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {function}; "
                         f"sys.argv = {argv!r}; {function}()"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: unknown config key --config.no_such_key"


def test_eval_mode_prints_and_records_every_set(tmp_path, omniglot_root):
  """Category-level: `--mode eval` of a trained checkpoint prints its table and appends an eval
  row with the training run's own figures (the landmark configs' counterpart is
  tests/train/test_landmarks.py::test_smoke_config_trains_and_runs_the_revisited_evaluation)."""
  run = lambda *extra: subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(tmp_path), "--config.max_steps=2", "--config.num_grid_queries=0",
       "--config.data.max_eval_images=200", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run("--mode=eval", "--checkpoint=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint 2 (step 2):" in proc.stdout
  table = proc.stdout.split("checkpoint 2 (step 2):", 1)[1]
  assert "test/recall@1" in table and "test/num_queries" in table
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  trained, evaluated = [row for row in rows if row["kind"] == "eval"]
  assert trained["step"] == evaluated["step"] == 2
  assert evaluated["test/num_queries"] == 200
  for metric in ("test/recall@1", "test/recall@8"):
    assert 0.0 <= evaluated[metric] <= 1.0
    assert evaluated[metric] == pytest.approx(trained[metric], abs=1e-6)
