"""Tests of recall_jax.train.progress: a tqdm bar on a terminal, plain lines elsewhere."""

import io

import tqdm

from recall_jax.train import progress


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _run(steps, seconds_per_step, every_s, initial=0, total=10):
  clock, out = _Clock(), io.StringIO()
  bar = progress.PlainProgress(total=total, initial=initial, every_s=every_s, stream=out,
                               clock=clock)
  for step in range(initial + 1, initial + steps + 1):
    clock.now += seconds_per_step
    bar.update(1)
    bar.set_postfix(loss=f"{1 / step:.4f}", lr="1.00e-03", img_s="250")
  bar.close()
  return out.getvalue()


def test_plain_lines_every_n_seconds_with_eta_and_the_last_step():
  # 10 steps of 4 s, a line every 10 s: after steps 3 (12 s), 6 (24 s), 9 (36 s) and the last.
  lines = _run(10, 4.0, every_s=10.0).splitlines()
  assert "\r" not in "".join(lines)
  assert [line.split(" | ")[0] for line in lines] == [
      "train step 3/10 (30%)", "train step 6/10 (60%)", "train step 9/10 (90%)",
      "train step 10/10 (100%)"]
  assert lines[0] == "train step 3/10 (30%) | loss 0.3333 | lr 1.00e-03 | img_s 250 | ETA 0:00:28"
  assert lines[-1].endswith("ETA 0:00:00")


def test_a_resumed_run_counts_its_eta_from_its_own_steps():
  # Resumed at step 6: 2 steps of 5 s done, 2 left -> 10 s.
  lines = _run(2, 5.0, every_s=8.0, initial=6).splitlines()
  assert lines == ["train step 8/10 (80%) | loss 0.1250 | lr 1.00e-03 | img_s 250 | ETA 0:00:10"]


def test_close_prints_unprinted_figures_once():
  out = _run(2, 1.0, every_s=60.0)
  assert out.splitlines()[-1].startswith("train step 2/10 (20%) | loss 0.5000")
  assert len(out.splitlines()) == 1


def test_terminal_gets_tqdm_a_file_plain_lines_other_processes_nothing():
  bar = progress.progress_bar(total=5, stream=_Terminal())
  assert isinstance(bar, tqdm.tqdm) and not bar.disable
  bar.close()
  assert isinstance(progress.progress_bar(total=5, stream=io.StringIO()), progress.PlainProgress)
  silent = progress.progress_bar(total=5, enabled=False, stream=io.StringIO())
  assert isinstance(silent, tqdm.tqdm) and silent.disable
  silent.close()
