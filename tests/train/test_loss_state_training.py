"""Training end to end with a loss's own parameters (proxies) and with a cross-batch memory:
the command line trains and evaluates, checkpoints hold them, a resumed run is bit-identical."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recall_jax.train import reporting
from recall_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[2]
MEMORY_SIZE = 48  # wraps round after the second written batch of 32

CASES = {
    "proxy_anchor": ["--config.loss.name=proxy_anchor"],
    "memory": ["--config.loss.memory_size=48", "--config.loss.memory_start_step=1"],
}


def saved_state(workdir: pathlib.Path, step: int) -> dict:
  """The saved train state as Orbax wrote it (nested dicts of arrays), without a template."""
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def rows(workdir: pathlib.Path, kind: str) -> list[dict]:
  return [r for r in reporting.read_metrics(workdir / "metrics.jsonl") if r["kind"] == kind]


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_line_trains_and_evaluates(case, omniglot_root, tmp_path):
  env = {**os.environ, "RECALL_JAX_DATA": str(omniglot_root), "PYTHONPATH": str(REPO),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(tmp_path), "--config.data.max_eval_images=200",
       "--config.num_grid_queries=0", *CASES[case]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (evaluated,) = rows(tmp_path, "eval")
  assert 0.0 < evaluated["test/recall@1"] <= 1.0 and evaluated["test/num_queries"] == 200
  assert all(np.isfinite(r["loss"]) for r in rows(tmp_path, "train"))
  state = saved_state(tmp_path, 3)
  if case == "proxy_anchor":
    # One proxy per training class: 964 background characters at 4 quarter-turns (the demo's
    # rotated classes), 16-d as the smoke model.
    assert state["loss_params"].shape == (964 * 4, 16)
    assert all("loss_param_grad_norm" in r for r in rows(tmp_path, "train"))
  else:
    memory = state["memory"]
    assert memory["embeddings"].shape == (MEMORY_SIZE, 16)
    assert int(memory["count"]) == MEMORY_SIZE  # steps 2 and 3 wrote 64 rows into 48
    np.testing.assert_allclose(np.linalg.norm(memory["embeddings"], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_with_proxies_or_a_memory_is_bit_identical(case, omniglot_root, tmp_path):
  spec = importlib.util.spec_from_file_location("omniglot", REPO / "configs" / "omniglot.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.data.root, c.data.max_eval_images, c.num_grid_queries = str(omniglot_root), 100, 0
  c.checkpoint_every_steps = 2
  for flag in CASES[case]:
    key, value = flag.removeprefix("--config.loss.").split("=")
    c.loss[key] = value if key == "name" else int(value)
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  c.max_steps = 4
  trainer.train_and_evaluate(c, straight)
  c.max_steps = 2
  trainer.train_and_evaluate(c, interrupted)
  c.max_steps = 4
  trainer.train_and_evaluate(c, interrupted)

  loss = lambda workdir: {r["step"]: r["loss"] for r in rows(workdir, "train")}
  assert sorted(loss(interrupted)) == [1, 2, 3, 4]
  assert loss(interrupted) == loss(straight)  # bit for bit
  a, b = saved_state(straight, 4), saved_state(interrupted, 4)
  own = ("loss_params", "loss_opt_state") if case == "proxy_anchor" else ("memory",)
  for key in own:
    assert jax.tree.leaves(a[key]), key  # the checkpoint holds it
  jax.tree.map(np.testing.assert_array_equal, a, b)
