"""A polite stop: SIGTERM (cluster preemption) or a first Ctrl-C asks the run to save and stop.

Used by both tasks' training loop. It polls the request once per step: a single process reads the
signal flag (no device work); several hosts agree with a collective, which the loop asks for only
at its boundaries (log, evaluation and save steps) so that ordinary steps do not wait for each
other. On several hosts a stop therefore waits for the next boundary: keep `log_every_steps`
short enough for the cluster's grace period.

The coordination service's own preemption notice (`multihost_utils.reached_preemption_sync_point`)
is not used: it covers SIGTERM only, and only once the Python handler here does not replace it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np


@contextlib.contextmanager
def stop_requests(say: Callable[[str], None] = print) -> Iterator[Callable[[], str | None]]:
  """Turns SIGTERM and a first Ctrl-C into a stop request while the context is open.

  Args:
    say: shows the user that a signal arrived (process 0's progress output).

  Yields:
    `poll(collective=True) -> str | None`: what asked to stop (a signal's name), or None. On
    several processes, a poll with `collective` all-gathers the hosts' flags (if any host was
    asked, all of them stop), so every process must make it at the same point; one without it
    returns None until such a poll. A single process always reads its own flag.

  The previous handlers are restored on exit; a second Ctrl-C interrupts at once. Outside the
  main thread signals are left alone.
  """
  received: list[str] = []

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if name == "SIGINT" and received:
      raise KeyboardInterrupt
    received.append(name)
    say(f"{name} received: saving a checkpoint after this step, then stopping")

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
      pass

  def poll(collective: bool = True) -> str | None:
    if jax.process_count() > 1:
      if not collective:
        return None
      # Hosts must agree, or one would save while the others step on.
      flags = multihost_utils.process_allgather(np.array(len(received) > 0))
      if np.any(flags) and not received:
        received.append("a stop request on another host")
    return received[0] if received else None

  try:
    yield poll
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
