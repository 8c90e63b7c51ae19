"""Stop requests: SIGTERM and a first Ctrl-C ask to stop; a second Ctrl-C interrupts."""

import os
import signal

import numpy as np
import pytest

from recall_jax.train import preemption


def test_sigterm_is_a_stop_request_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  said = []
  with preemption.stop_requests(said.append) as poll:
    assert poll() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert poll() == "SIGTERM"
    assert poll() == "SIGTERM"
  assert said == ["SIGTERM received: saving a checkpoint after this step, then stopping"]
  assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_interrupts():
  with preemption.stop_requests(lambda _: None) as poll:
    os.kill(os.getpid(), signal.SIGINT)
    assert poll() == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_a_single_process_reads_its_flag_without_a_collective(monkeypatch):
  def no_collective(*args, **kwargs):
    raise AssertionError("a collective on a single process")

  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", no_collective)
  with preemption.stop_requests(lambda _: None) as poll:
    assert poll(collective=False) is None and poll() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert poll(collective=False) == "SIGTERM"  # between boundaries too


def test_several_processes_agree_only_at_collective_polls(monkeypatch):
  gathered = []

  def allgather(flag):
    gathered.append(bool(flag))
    return np.array([bool(flag), True])  # another host was asked to stop

  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  with preemption.stop_requests(lambda _: None) as poll:
    assert poll(collective=False) is None and gathered == []  # no collective between boundaries
    assert poll(collective=True) == "a stop request on another host"
    assert gathered == [False]
