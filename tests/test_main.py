"""The command line (recall_jax.main): flag and config errors, the console script."""

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
