"""Training time lost to a checkpoint save: async saves (the trainer's) against synchronous ones.

  python benchmarks/checkpoint_save.py                    # 100 MB of parameters: 300 MB of state
  python benchmarks/checkpoint_save.py --params-mb 25 --steps 4 --rounds 1  # a quick look

Both tasks save the same way. The state is a `TrainState` of float32 parameters with its AdamW
moments (3x the parameters). A jitted step that donates the state (an AdamW update plus a fixed
matmul load standing in for the forward and backward passes) runs `--steps` times, three ways in
each round: without a save, with a synchronous save after its first step (Orbax, then the
checksum manifest, before the next step), and with an async save (`checkpointing.AsyncSaves`:
the next step starts once the state is in host memory; files and manifest follow in the
background, and the timing includes waiting for them after the last step). The time lost to a
save is a run's time minus the run without one; figures are medians over `--rounds`.
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from recall_jax.train import checkpointing
from recall_jax.train import train_step as train_step_lib


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores, jax devices: {jax.devices()}"


def make_state(params_mb: float, optimizer) -> train_step_lib.TrainState:
  """A state whose float32 parameters take `params_mb` MB, in 1,024-wide matrices."""
  rows = max(int(params_mb * 1e6 / 4 / 1024 / 8), 1)
  keys = jax.random.split(jax.random.key(0), 8)
  params = {f"w{i}": jax.random.normal(k, (rows, 1024), jnp.float32) for i, k in enumerate(keys)}
  return train_step_lib.init_train_state(params, optimizer)


def make_step(optimizer, work: int):
  """A donated step: an AdamW update of every parameter plus `work` 1,024^2 matmuls."""
  def step(state):
    x = state.params["w0"][:1024] * 0.03  # from the state: nothing folds at compile time
    y = x
    for _ in range(work):
      y = jnp.tanh(y @ x)
    grads = jax.tree.map(lambda p: p * 1e-3 + jnp.mean(y) * 1e-6, state.params)
    new_state, _ = train_step_lib.apply_gradients(state, jnp.zeros(()), grads, optimizer)
    return new_state

  return jax.jit(step, donate_argnums=0)


def timed_run(step, state, steps: int, save=None):
  """Seconds for `steps` steps (and `save(state)` after the first, when given)."""
  start = time.perf_counter()
  for i in range(steps):
    state = step(state)
    if i == 0 and save is not None:
      save(state)
  jax.block_until_ready(state)
  return time.perf_counter() - start, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params-mb", type=float, default=100.0)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--work", type=int, default=8, help="1,024^2 matmuls per step")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  optimizer = optax.adamw(1e-4)
  state = make_state(args.params_mb, optimizer)
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
  step = make_step(optimizer, args.work)
  state = jax.block_until_ready(step(state))  # compile
  print(f"machine: {_machine()}")
  print(f"state: {state_mb:.0f} MB ({args.params_mb:.0f} MB of parameters + AdamW moments); "
        f"{args.steps} steps per run, {args.rounds} rounds")

  root = tempfile.mkdtemp(prefix="checkpoint_save_")
  times = {"none": [], "sync": [], "async": []}
  blocking = []
  try:
    for r in range(args.rounds):
      t, state = timed_run(step, state, args.steps)
      times["none"].append(t)

      sync = checkpointing.make_checkpoints(os.path.join(root, f"sync{r}"), keep=1)
      t, state = timed_run(step, state, args.steps,
                           save=lambda s, m=sync.latest: checkpointing.save(m, s, {}))
      times["sync"].append(t)

      latest = checkpointing.make_checkpoints(os.path.join(root, f"async{r}"), keep=1).latest
      with checkpointing.AsyncSaves() as saves:
        def save_async(s, saves=saves, latest=latest):
          jax.block_until_ready(s)  # the step itself is not part of what save() blocks on
          tick = time.perf_counter()
          saves.save(latest, s, {})
          blocking.append(time.perf_counter() - tick)
        start = time.perf_counter()
        t, state = timed_run(step, state, args.steps, save=save_async)
        saves.wait()
        times["async"].append(time.perf_counter() - start)
      shutil.rmtree(os.path.join(root, f"sync{r}"))
      shutil.rmtree(os.path.join(root, f"async{r}"))
  finally:
    shutil.rmtree(root, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in times.items()}
  per_step = med["none"] / args.steps
  lost_sync, lost_async = med["sync"] - med["none"], med["async"] - med["none"]
  print(f"step: {per_step:.3f} s; run of {args.steps} steps without a save: {med['none']:.2f} s")
  print(f"time lost to one save: sync {lost_sync:.2f} s ({lost_sync / per_step:.1f} steps), "
        f"async {lost_async:.2f} s ({lost_async / per_step:.1f} steps); "
        f"async / sync = {lost_async / lost_sync:.2f}")
  print(f"async save() returns after {statistics.median(blocking):.2f} s (the copy to host "
        "memory); the rest of the write overlaps the steps")


if __name__ == "__main__":
  main()
