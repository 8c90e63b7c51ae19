"""Stop requests: SIGTERM and a first Ctrl-C ask to stop; a second Ctrl-C interrupts."""

import os
import signal

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
