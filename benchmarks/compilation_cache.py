"""Time to the first training step, persistent compilation cache cold vs warm (category-level).

Launches `python -m recall_jax.main` on a config (default the Omniglot smoke run, one step) as a
batch scheduler would (stdout a pipe, so progress comes as plain lines), three times, each in a
fresh workdir: with the cache off (`compilation_cache_dir=""`), with an empty cache (cold) and
with the cache the cold run filled (warm: a re-launched or resumed run). The time to the first
step is from the launch to the progress line of step 1, so it includes importing JAX and
preparing the data, which the cache does not change; the gain is in the compilations.

  python benchmarks/compilation_cache.py [--config configs/omniglot.py:smoke] [--repeats 1] \
      [--config.data.root=...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from descriptors import machine_name  # benchmarks/: the script's own folder

REPO = pathlib.Path(__file__).resolve().parents[1]


def time_to_first_step(config: str, workdir: pathlib.Path, cache: str, extra: list[str]) -> float:
  """Seconds from launching a one-step run to its progress line for step 1."""
  command = [sys.executable, "-m", "recall_jax.main", "--config", config, "--workdir",
             str(workdir), "--config.max_steps=1", "--config.num_grid_queries=0",
             f"--config.compilation_cache_dir={cache}", *extra]
  start = time.perf_counter()
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        text=True, env=env) as proc:
    seconds = None
    for line in proc.stdout:
      if seconds is None and line.startswith("train step 1/"):
        seconds = time.perf_counter() - start
    if proc.wait() or seconds is None:
      raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode})")
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/omniglot.py:smoke")
  parser.add_argument("--repeats", type=int, default=1, help="runs of each kind (median)")
  args, extra = parser.parse_known_args()  # The rest go to recall_jax.main.
  print(f"machine: {machine_name()}; config {args.config}, one step")
  times: dict[str, list[float]] = {"cache off": [], "cold cache": [], "warm cache": []}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for r in range(args.repeats):
      cache = tmp / f"cache{r}"
      for kind, path in (("cache off", ""), ("cold cache", cache), ("warm cache", cache)):
        workdir = tmp / f"{kind.replace(' ', '_')}{r}"
        times[kind].append(time_to_first_step(args.config, workdir, str(path), extra))
      entries = len(list(cache.iterdir()))
  print(f"time to the first step (median of {args.repeats}; {entries} cache entries):")
  for kind, seconds in times.items():
    print(f"  {kind:10s} {statistics.median(seconds):6.1f} s")
  cold, warm = statistics.median(times["cold cache"]), statistics.median(times["warm cache"])
  print(f"  ratio warm / cold: {warm / cold:.2f}x")


if __name__ == "__main__":
  main()
