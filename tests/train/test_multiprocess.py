"""A whole training run on two `jax.distributed` CPU processes, through `recall_jax.main`.

Both processes train, evaluate (the embeddings gathered across processes), save, and a rerun
resumes and finishes with the metrics of one process trained on the same data and config.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def _write_folder_dataset(root: pathlib.Path) -> None:
  """<root>/{train,test}/<class>/<i>.png: 4 classes of 28 x 28 grey noisy prototypes."""
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 256, (4, 28, 28))
  for split, per_class in (("train", 8), ("test", 6)):
    for label, prototype in enumerate(prototypes):
      folder = root / split / f"c{label}"
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = np.clip(prototype + rng.normal(0, 40, prototype.shape), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


def _command(data: pathlib.Path, workdir: pathlib.Path, max_steps: int) -> list[str]:
  # 32 training images at 4 turns: 128 images, 4 steps of 32 per epoch; the test split's 24
  # images are evaluated at the last step and at the end of the epoch.
  return [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
          "--workdir", str(workdir), "--config.data.name=folder", f"--config.data.path={data}",
          f"--config.data.root={data.parent}", f"--config.max_steps={max_steps}"]


def _run_two_processes(data: pathlib.Path, workdir: pathlib.Path, max_steps: int) -> list[str]:
  port = _free_port()
  procs = [subprocess.Popen(
      _command(data, workdir, max_steps), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i}:\n{output[-6000:]}"
  return outputs


def _eval_rows(workdir: pathlib.Path) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row for row in rows if row.get("kind") == "eval"}


def _saved_steps(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_two_processes_train_evaluate_save_resume_and_match_one_process(tmp_path):
  data = tmp_path / "photos"
  _write_folder_dataset(data)
  one, two = tmp_path / "one", tmp_path / "two"
  # The one-process reference runs alongside the first two-process run (the test's wall time).
  reference = subprocess.Popen(_command(data, one, max_steps=4), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _run_two_processes(data, two, max_steps=2)
    reference_output = reference.communicate(timeout=TIMEOUT_S)[0]
  finally:
    if reference.poll() is None:
      reference.kill()
      reference.communicate()
  assert reference.returncode == 0, reference_output[-6000:]
  assert _saved_steps(two / "checkpoints") == [2]
  assert set(_eval_rows(two)) == {2}

  outputs = _run_two_processes(data, two, max_steps=4)
  assert "resumed from step 2" in outputs[0]
  assert _saved_steps(two / "checkpoints") == [2, 4]
  two_rows, one_rows = _eval_rows(two), _eval_rows(one)
  assert set(two_rows) == {2, 4} and set(one_rows) == {4}
  want, got = one_rows[4], two_rows[4]
  assert want.keys() == got.keys()
  # The two-process gradient sums the same rows in another order: equal to float tolerance.
  for key in want:
    if isinstance(want[key], float):
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    else:
      assert got[key] == want[key], key
  assert want["test/num_queries"] == 24
