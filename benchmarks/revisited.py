"""Wall time and memory of `revisited_metrics` with a memory-mapped 1M-distractor database.

  python benchmarks/revisited.py                       # 70 x 1,001,001 x 2,048 (an 8.2 GB file)
  python benchmarks/revisited.py --num-items 100000    # a smaller run

Writes a synthetic float32 database (Gaussian rows) to `--path` in chunks, opens it with
`np.load(mmap_mode='r')` and times one `revisited_metrics` call (compilation included) for
`--queries` queries whose ground truth mimics R-Oxford + R1M: per query `--easy`, `--hard` and
`--junk` items drawn from the first 4,993 database rows (the revisited images come first, the
distractors after them). Peak memory is sampled from /proc/self/status every 20 ms during the call:
CPU time (user + system, all threads) is reported beside the wall time, with the load average,
because on a shared machine the wall time mostly measures the other processes. `RssAnon` is the
memory the evaluation allocates (arrays, device buffers, JAX itself), `RssFile`
the pages of the mapped file (and of shared libraries) that happen to be resident, which the
kernel can drop at any time. The file is deleted afterwards unless `--keep`.

When the file system lacks room for the full database (plus 1 GiB), the run shrinks the database
to what fits and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import threading
import time

import numpy as np

from recall_jax.evaluation import revisited_metrics

_REVISITED_IMAGES = 4993
_SPARE_BYTES = 1 << 30


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


class PeakMemory:
  """Samples RssAnon / RssFile in a thread and keeps their maxima (KiB)."""

  def __init__(self, interval: float = 0.02):
    self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      for field in self.peak:
        self.peak[field] = max(self.peak[field], _status_kib(field))
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def write_database(path: str, num_items: int, dim: int, seed: int) -> None:
  """Gaussian float32 rows written in chunks of ~256 MiB, as an .npy file."""
  database = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, dim))
  rng = np.random.default_rng(seed)
  chunk = max(1, (256 << 20) // (4 * dim))
  for start in range(0, num_items, chunk):
    rows = database[start:start + chunk]
    rng.standard_normal(out=rows, dtype=np.float32)
  database.flush()
  del database


def synthetic_gnd(num_queries: int, easy: int, hard: int, junk: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed + 1)
  gnd = []
  for _ in range(num_queries):
    chosen = rng.choice(_REVISITED_IMAGES, easy + hard + junk, replace=False)
    gnd.append({"easy": chosen[:easy], "hard": chosen[easy:easy + hard],
                "junk": chosen[easy + hard:]})
  return gnd


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-items", type=int, default=1_001_001)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--queries", type=int, default=70)
  parser.add_argument("--easy", type=int, default=60)
  parser.add_argument("--hard", type=int, default=90)
  parser.add_argument("--junk", type=int, default=150)
  parser.add_argument("--block", type=int, default=None, help="database rows per step")
  parser.add_argument("--path", default="/tmp/recall_jax_revisited_benchmark.npy")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", action="store_true", help="keep the database file")
  args = parser.parse_args()

  wanted = args.num_items
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.path))).free
  fits = max(_REVISITED_IMAGES, (free - _SPARE_BYTES) // (4 * args.dim))
  num_items = min(wanted, fits)
  if num_items < wanted:
    print(f"only {free / 2**30:.1f} GiB free: database shrunk to {num_items:,} rows")

  if not (os.path.exists(args.path) and np.load(args.path, mmap_mode="r").shape
          == (num_items, args.dim)):
    start = time.perf_counter()
    write_database(args.path, num_items, args.dim, args.seed)
    print(f"wrote {num_items:,} x {args.dim} float32 ({os.path.getsize(args.path) / 1e9:.2f} GB) "
          f"in {time.perf_counter() - start:.1f} s")
  try:
    database = np.load(args.path, mmap_mode="r")
    queries = np.random.default_rng(args.seed + 2).standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    gnd = synthetic_gnd(args.queries, args.easy, args.hard, args.junk, args.seed)
    baseline = _status_kib("RssAnon")
    with PeakMemory() as memory:
      start, cpu_start = time.perf_counter(), os.times()
      metrics = revisited_metrics(queries, database, gnd, block=args.block)
      wall, cpu_end = time.perf_counter() - start, os.times()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "num_items": num_items, "dim": args.dim, "queries": args.queries,
        "listed_per_query": args.easy + args.hard + args.junk, "block": args.block,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_anon_gib": round(memory.peak["RssAnon"] / 2**20, 3),
        "rss_anon_before_gib": round(baseline / 2**20, 3),
        "peak_rss_file_gib": round(memory.peak["RssFile"] / 2**20, 3),
        "easy/map": round(metrics["easy/map"], 6),
    }
    print(json.dumps(result))
  finally:
    if not args.keep:
      os.remove(args.path)


if __name__ == "__main__":
  main()
