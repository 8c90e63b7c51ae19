"""Training progress on the console (both tasks): a tqdm bar on a terminal, plain lines elsewhere.

Under a batch scheduler (SLURM, a pipe, `nohup`) stdout is a file: tqdm's carriage-return redraws
would pile up in it as one ever-growing line. There, a plain line

  train step 1200/5000 (24%) | loss 0.4321 | lr 1.00e-04 | img_s 2510 | ETA 1:02:03

is printed at most every `every_s` seconds (and for the last step) instead. Both take the same
calls (`update` after each step, then `set_postfix` with its figures), so the training loop does
not care which it has.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import tqdm

# Seconds between two plain progress lines: a day-long run writes a few thousand lines.
DEFAULT_EVERY_S = 30.0


class PlainProgress:
  """tqdm's `update` / `set_postfix` / `close`, printed as a plain line every `every_s` seconds.

  A line is printed when the figures of a step are set (`set_postfix`) and `every_s` seconds have
  passed since the last line, or the step is the last one; `close` prints the last figures if
  they were not printed yet.
  """

  def __init__(self, *, total: int, initial: int = 0, desc: str = "train",
               every_s: float = DEFAULT_EVERY_S, stream: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.n, self._initial, self._desc = int(total), int(initial), int(initial), desc
    self._every_s, self._clock = every_s, clock
    self._stream = sys.stdout if stream is None else stream
    self._start = self._last = clock()
    self._postfix: dict[str, Any] = {}
    self._printed_n = initial

  def update(self, n: int = 1) -> None:
    self.n += n

  def set_postfix(self, **figures: Any) -> None:
    self._postfix = figures
    if self.n >= self.total or self._clock() - self._last >= self._every_s:
      self._print()

  def close(self) -> None:
    if self.n != self._printed_n:
      self._print()

  def _eta(self) -> str:
    done = self.n - self._initial
    if done <= 0:
      return "?"
    seconds = (self._clock() - self._start) / done * max(self.total - self.n, 0)
    return str(datetime.timedelta(seconds=round(seconds)))

  def _print(self) -> None:
    parts = [f"{self._desc} step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
    parts += [f"{name} {value}" for name, value in self._postfix.items()]
    parts.append(f"ETA {self._eta()}")
    print(" | ".join(parts), file=self._stream, flush=True)
    self._last, self._printed_n = self._clock(), self.n


def progress_bar(*, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 every_s: float = DEFAULT_EVERY_S,
                 stream: TextIO | None = None) -> tqdm.tqdm | PlainProgress:
  """A tqdm bar when `stream` (default stdout) is a terminal, else `PlainProgress`.

  Args:
    total: the step the run ends at.
    initial: the step it starts from (a resumed run's checkpoint).
    desc: the line's or bar's label.
    enabled: False (processes other than the first) gives a bar that shows nothing.
    every_s: seconds between plain lines.
    stream: where plain lines go; also what is asked whether it is a terminal.
  """
  stream = sys.stdout if stream is None else stream
  if not enabled or stream.isatty():
    return tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                     dynamic_ncols=True)
  return PlainProgress(total=total, initial=initial, desc=desc, every_s=every_s, stream=stream)
