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
  """The saved train state as Orbax wrote it (nested dicts of arrays) on this process's first
  device, whatever devices saved it."""
  folder = (workdir / "checkpoints" / str(step) / "state").absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(folder).item_metadata.tree)
  return checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


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


def _main(workdir: pathlib.Path, omniglot_root, *flags: str, devices: int = 1
          ) -> subprocess.CompletedProcess:
  env = {**os.environ, "RECALL_JAX_DATA": str(omniglot_root), "PYTHONPATH": str(REPO),
         "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/omniglot.py:smoke",
       "--workdir", str(workdir), "--config.data.max_eval_images=100",
       "--config.num_grid_queries=0", "--config.checkpoint_every_steps=2", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_memory_sharded_over_two_devices_trains_saves_and_resumes_bit_identically(
    omniglot_root, tmp_path):
  """Each of 2 devices holds half of the memory's rows; the checkpoint restores into that
  layout and the resumed run is the straight run, bit for bit."""
  memory = ["--config.loss.memory_size=48", "--config.loss.memory_start_step=1"]
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  for workdir, steps in ((straight, 4), (interrupted, 2), (interrupted, 4)):
    proc = _main(workdir, omniglot_root, *memory, f"--config.max_steps={steps}", devices=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resumed from step 2" in proc.stdout + proc.stderr
  loss = lambda workdir: {r["step"]: r["loss"] for r in rows(workdir, "train")}
  assert sorted(loss(interrupted)) == [1, 2, 3, 4]
  assert loss(interrupted) == loss(straight)
  a, b = saved_state(straight, 4), saved_state(interrupted, 4)
  assert int(a["memory"]["count"]) == MEMORY_SIZE
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_memory_that_does_not_divide_over_the_devices_is_refused_in_one_line(
    omniglot_root, tmp_path):
  proc = _main(tmp_path, omniglot_root, "--config.loss.memory_size=47", devices=2)
  assert proc.returncode != 0
  assert "loss.memory_size 47 must be divisible by the 2 devices" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_resuming_a_run_with_a_loss_of_other_learned_parameters_is_refused_in_one_line(
    omniglot_root, tmp_path):
  first = _main(tmp_path, omniglot_root, "--config.max_steps=1")
  assert first.returncode == 0, first.stderr[-4000:]
  proc = _main(tmp_path, omniglot_root, "--config.max_steps=2", "--config.loss.name=proxy_anchor")
  assert proc.returncode != 0
  assert ('loss.name: "recall_at_k" (no learned parameters) when the run started, '
          '"proxy_anchor" (learned parameters in the checkpoints) now') in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(r["step"] for r in rows(tmp_path, "train")) == [1]  # nothing trained or saved
