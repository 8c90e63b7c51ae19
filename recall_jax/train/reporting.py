"""What the user sees of a run: JSONL metrics, TensorBoard events, PNG curves, a metrics table."""

from __future__ import annotations

import json
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from recall_jax import figures

_log = logging.getLogger(__name__)


def say(message: str) -> None:
  """Shows a progress message to the user (process 0 only), kept clear of the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _tensorboard_writer(logdir: pathlib.Path):
  """A TensorBoard scalar writer when one is installed (tensorboardX or TensorFlow), else None."""
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX.SummaryWriter(str(logdir))
  except ImportError:
    pass
  try:
    from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
    return tensorboard.SummaryWriter(str(logdir))
  except ImportError:
    return None


class MetricWriter:
  """Appends `{"step", "kind", ...metrics}` lines to `<workdir>/metrics.jsonl` (and TensorBoard).

  Only the writing process (process 0 of a multi-host run) should create one with
  `enabled=True`; a disabled writer accepts and drops everything.

  Attributes:
    rows: every row of the run in order: those a resumed run wrote before (read once, here) and
      those written since; what the plots are drawn from.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.enabled = enabled
    self.rows: list[dict[str, Any]] = read_metrics(self.path) if enabled else []
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = _tensorboard_writer(self.workdir / "tensorboard")
      if self._tb is None:
        _log.info("no TensorBoard writer installed (tensorboardX or tensorflow); JSONL only")

  def write(self, step: int, kind: str, metrics: Mapping[str, Any]) -> None:
    """Records scalar `metrics` of `kind` ('train' or 'eval') at `step`."""
    if not self.enabled:
      return
    row = {"step": int(step), "kind": kind}
    row.update({k: (float(v) if isinstance(v, (float, np.floating)) else
                    int(v) if isinstance(v, (int, np.integer)) else v)
                for k, v in metrics.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    self.rows.append(row)
    if self._tb is not None:
      # tensorboardX names it add_scalar, flax's writer scalar.
      add = getattr(self._tb, "add_scalar", None) or self._tb.scalar
      for name, value in metrics.items():
        if isinstance(value, (int, float, np.number)):
          add(f"{kind}/{name}", float(value), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file, in order (an empty list if it does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(rows: Sequence[Mapping[str, Any]],
                out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes `training_curve.png` (loss and learning rate) and `recall.png` (Recall@k over steps).

  Args:
    rows: metrics.jsonl rows (`MetricWriter.rows`, `read_metrics`).
    out_dir: folder for the PNGs.

  Returns:
    The paths written (a plot without data is not written).
  """
  out_dir = pathlib.Path(out_dir)
  written = []
  train = [r for r in rows if r["kind"] == "train" and "loss" in r]
  if train:
    fig, ax = figures.new_figure(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if "learning_rate" in train[0]:
      ax2 = ax.twinx()
      ax2.plot([r["step"] for r in train], [r["learning_rate"] for r in train], color="C1",
               label="learning rate", linestyle="--")
      ax2.set_ylabel("learning rate")
    ax.set_title("training loss")
    fig.tight_layout()
    written.append(out_dir / "training_curve.png")
    fig.savefig(written[-1], dpi=100)
  evals = [r for r in rows if r["kind"] == "eval"]
  keys = sorted({k for r in evals for k in r if "/recall@" in k},
                key=lambda k: (k.split("/")[0], int(k.rsplit("@", 1)[1])))
  if evals and keys:
    fig, ax = figures.new_figure(figsize=(7, 4))
    for key in keys:
      points = [(r["step"], r[key]) for r in evals if key in r]
      ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("Recall@k")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("retrieval on the test split")
    fig.tight_layout()
    written.append(out_dir / "recall.png")
    fig.savefig(written[-1], dpi=100)
  return written


def format_table(metrics: Mapping[str, Any]) -> str:
  """A two-column text table of metrics, splits grouped."""
  width = max((len(k) for k in metrics), default=0)
  lines = []
  for name, value in metrics.items():
    shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
    lines.append(f"  {name:<{width}}  {shown}")
  return "\n".join(lines)
