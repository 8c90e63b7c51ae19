"""Data-parallel training (start-up, batch assembly, the sharded step) on forced CPU devices.

Serves both tasks: square batches and whole images in aspect buckets, on 8 devices and on two
processes.

Multi-device checks run in subprocesses (tests/train/sharding_worker.py, which gets its CPU
devices from `chex.set_n_cpu_devices`): the device count is fixed when JAX starts, and this pytest
process has one CPU device.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recall_jax import parallel
from recall_jax.train import batch_assembly
from recall_jax.train import distributed
from recall_jax.train import sharded_step
from recall_jax import batch_layout
from recall_jax.train import train_step as train_step_lib

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _worker_module():
  spec = importlib.util.spec_from_file_location("sharding_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


def test_eight_devices_equal_one_device():
  """Loss, gradients and the updated parameters match the one-device full batch (1e-5)."""
  result = subprocess.run([sys.executable, str(WORKER), "eight"], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  assert "EIGHT_OK" in result.stdout
  assert result.stdout.count("case ok") == 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
  """2 processes x 4 devices == 1 process x 1 device; their checkpoint resumes on 1 device."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), "process", str(tmp_path)], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-2000:]}\n{err[-6000:]}"
    assert f"PROCESS_{i}_OK" in out

  worker = _worker_module()
  want_loss, want_grads = worker.bucketed_reference()
  for i in range(2):  # aspect buckets of different sizes on the two processes
    got = np.load(tmp_path / f"bucketed_{i}.npz")
    assert worker.relative_error(got["loss"], want_loss) <= 1e-5
    worker.assert_trees_close({k: got[k] for k in want_grads}, want_grads, rtol=1e-4,
                              what=f"bucketed process {i} ")
  losses, states = worker.reference_steps(worker.STEPS + 1)
  for i in range(2):
    got = json.loads((tmp_path / f"losses_{i}.json").read_text())
    np.testing.assert_allclose(got, losses[:worker.STEPS], rtol=1e-5)
    params = dict(np.load(tmp_path / f"params_{i}.npz"))
    worker.assert_trees_close(params, states[worker.STEPS - 1].params, what=f"process {i} ")

  # Restore the 8-device, 2-process checkpoint on this process's single device, take one more
  # step there: the same as the uninterrupted single-device run.
  opt = worker.optimizer()
  template = train_step_lib.init_train_state(
      jax.tree.map(jax.numpy.asarray, worker.init_params()), opt)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert manager.latest_step() == worker.STEPS
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(worker.STEPS, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  assert int(restored.step) == worker.STEPS
  # Adam's moments accumulate gradients summed over 8 devices in another order than on one;
  # tau2 = 0.01 amplifies float32 rounding 100x (the mega-batch tests' reason for 1e-4 too).
  worker.assert_trees_close(restored.opt_state, states[worker.STEPS - 1].opt_state, rtol=1e-4,
                            what="restored opt_state ")
  images, labels = worker.dataset()
  from recall_jax.data import sampler as sampler_lib
  sampler = sampler_lib.MPerClassSampler(labels, worker.GLOBAL_BATCH, worker.M, seed=0)
  idx = sampler.batch_indices(worker.STEPS)
  loss_fn, uses_rng = worker.loss_fn_for(worker.GLOBAL_BATCH, worker.M, True)
  step = train_step_lib.make_train_step(worker.embed_fn, loss_fn, opt, chunk_size=8,
                                        loss_uses_rng=uses_rng)
  resumed, metrics = step(restored, images[idx], labels[idx],
                          jax.random.fold_in(jax.random.key(0), worker.STEPS))
  np.testing.assert_allclose(float(metrics["loss"]), losses[worker.STEPS], rtol=1e-5)
  worker.assert_trees_close(resumed.params, states[worker.STEPS].params, what="resumed ")


# ------------------------------------------------------------------------------------------------
# Single-process behaviour and errors (this process: one CPU device).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {"launcher": "slurm"}),
    ({"SLURM_NTASKS": "4"}, None),  # not inside a job allocation
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {"launcher": "mpi"}),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
      "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"},
     {"launcher": "explicit", "coordinator_address": "10.0.0.1:1234", "num_processes": 2,
      "process_id": 1}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
])
def test_distributed_environment_detection(env, expected):
  assert distributed.distributed_environment(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 not in [0, JAX_NUM_PROCESSES=2)"),
])
def test_distributed_environment_errors(env, message):
  with pytest.raises(ValueError) as e:
    distributed.distributed_environment(env)
  assert message in str(e.value)


def test_initialize_distributed_single_process_is_a_no_op():
  assert distributed.initialize_distributed({}) == (0, 1)
  assert not jax.distributed.is_initialized()


def test_check_batch_layout():
  assert batch_layout.check_batch_layout(4000, 125, 8) == 4
  assert batch_layout.check_batch_layout(32, 4, 8, num_processes=2, samples_per_class=4) == 1
  with pytest.raises(ValueError, match=r"global batch 4000 is not divisible by "
                     r"chunk_size_per_device 150 x 8 devices = 1200 \(per-device batch 500"):
    batch_layout.check_batch_layout(4000, 150, 8)
  with pytest.raises(ValueError, match="multiple of 64"):
    batch_layout.check_batch_layout(100, 8, 8)
  with pytest.raises(ValueError, match="not a multiple of samples_per_class 4"):
    batch_layout.check_batch_layout(48, 1, 8, num_processes=8, samples_per_class=4)
  with pytest.raises(ValueError, match="8 devices do not split evenly over 3 processes"):
    batch_layout.check_batch_layout(48, 1, 8, num_processes=3)
  with pytest.raises(ValueError, match="chunk_size_per_device must be a positive integer"):
    batch_layout.check_batch_layout(48, 0, 8)


def test_single_device_mesh_step_and_batch_errors():
  """On one device the sharded step is the plain step; bad batches fail before compiling."""
  worker = _worker_module()
  mesh = parallel.data_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  loss_fn, _ = worker.loss_fn_for(8, 4, False)
  opt = worker.optimizer()
  state = sharded_step.make_sharded_state(worker.init_params(), opt, mesh)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
  images, labels = worker.dataset()
  images, labels = images[:8], np.repeat(np.arange(2), 4).astype(np.int32)
  with pytest.raises(ValueError, match="same leading axis"):
    batch_assembly.global_batch({"image": images, "label": labels[:7]}, mesh)
  batch = batch_assembly.global_batch({"image": images, "label": labels}, mesh)
  assert batch["image"].shape == images.shape
  assert batch["image"].sharding.spec == parallel.row_sharding(mesh).spec
  step = sharded_step.make_sharded_train_step(worker.embed_fn, loss_fn, opt, mesh,
                                              chunk_size_per_device=3)
  with pytest.raises(ValueError,
                     match="global batch 8 is not divisible by chunk_size_per_device 3"):
    step(state, batch["image"], batch["label"])
  step = sharded_step.make_sharded_train_step(worker.embed_fn, loss_fn, opt, mesh,
                                              chunk_size_per_device=4)
  with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
    step(state, batch["image"], batch["label"][:4])
  ref = train_step_lib.make_train_step(worker.embed_fn, loss_fn, opt, chunk_size=4)(
      train_step_lib.init_train_state(jax.tree.map(jax.numpy.asarray, worker.init_params()), opt),
      images, labels)
  new, metrics = step(state, batch["image"], batch["label"])
  np.testing.assert_allclose(float(metrics["loss"]), float(ref[1]["loss"]), rtol=1e-6)
  worker.assert_trees_close(new.params, ref[0].params, rtol=1e-6)
