"""Figures drawn without pyplot, for both tasks' PNGs (curves, retrieval grids, search results).

Each figure is a `matplotlib.figure.Figure` of its own, saved through the Agg canvas: nothing here
selects matplotlib's global backend or registers figures with pyplot, so importing this package in
a notebook or a GUI program leaves its plotting as it was, and figures are freed when dropped.
"""

from __future__ import annotations

from typing import Any


def new_figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float],
               squeeze: bool = True) -> tuple[Any, Any]:
  """A new figure and its grid of axes (`Figure.subplots`), figsize in inches.

  Returns:
    `(figure, axes)`: axes as `Figure.subplots` returns them (an (rows, cols) array of axes when
    `squeeze` is False).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=figsize)
  return figure, figure.subplots(rows, cols, squeeze=squeeze)
