"""Plots leave matplotlib's global state alone (`recall_jax.figures` and its users)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import PIL.Image

_PROGRAM = '''
import sys
import matplotlib
matplotlib.use("svg")  # the user's own choice, e.g. a notebook's
from recall_jax.train import reporting
rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "learning_rate": 0.1} for s in (1, 2, 3)]
rows += [{"kind": "eval", "step": 3, "test/recall@1": 0.5, "test/recall@2": 0.7}]
written = reporting.plot_curves(rows, sys.argv[1])
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, len(written))
'''


def test_plot_curves_keeps_the_users_backend_and_writes_pngs(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path)], capture_output=True,
                        text=True, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["svg", "False", "2"]
  for name in ("training_curve.png", "recall.png"):
    with PIL.Image.open(tmp_path / name) as image:
      assert image.format == "PNG" and min(image.size) > 100
