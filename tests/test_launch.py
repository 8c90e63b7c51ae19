"""The SLURM launcher gives the training processes, not only the batch shell, the early SIGTERM."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_slurm_signal_reaches_the_training_processes_in_time():
  script = (REPO / "launch" / "slurm.sbatch").read_text()
  (signal,) = re.findall(r"^#SBATCH --signal=(\S+)$", script, flags=re.MULTILINE)
  where, _, seconds = signal.partition("@")
  # "B:" signals the batch shell only; then it must trap the signal and forward it to srun.
  assert not where.startswith("B:") or re.search(r"^trap .*TERM", script, flags=re.MULTILINE)
  assert where.removeprefix("B:") in ("TERM", "SIGTERM", "15")
  assert int(seconds) >= 300
  readme = (REPO / "launch" / "README.md").read_text()
  assert "--signal=TERM@300" in readme and "1.03 GB" in readme
