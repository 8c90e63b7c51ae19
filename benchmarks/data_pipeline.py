"""Decode + augment throughput of the training pipeline on 224 px crops of ~500x375 JPEGs.

Generates synthetic photos (smooth random fields plus sensor-like noise, JPEG quality 90, about
the size of SOP / CUB images) in a temporary folder, then measures, in one process:

- `train_augment` (decode -> RandomResizedCrop 224 -> flip), the per-record cost;
- `make_train_loader(worker_count=0)`, the same plus batching, on an in-memory source;
- `eval_transform` (resize 256 -> center crop 224);

and reports images/s per core and the workers needed to feed a consumer of `--target` images/s
(default 2,600/s, one H100 training step's appetite). Optionally also times the loader with
`--workers N` grain processes.

Then the overlap with training: the loader feeds a fake training step (`--step-seconds`, default
0.2 s, a sleep, which like a real step leaves the CPU to other threads) with batches built ahead
in the background (the default: `read_threads=2, prefetch_batches=2`) and built on demand
(`read_threads=0, prefetch_batches=0`), interleaved, median of `--repeats`; and the decode-once
cache (`InMemorySource(decode_channels=...)`) against held encoded bytes on Omniglot-like 105 px
1-bit PNGs cropped to 28 px in batches of 1,000 (the demo's input).

Last, the mega-batch (`--mega-batch`, default 4,000 images of 224 px per step, 0: skip): the
loader with `--mega-workers` grain processes (default: one per core) builds `--mega-steps`
steps; its images per CPU-second of all its processes (main and workers, read from /proc, so
robust to other programs sharing the cores) against a bare PIL loop (decode, random crop box,
resize to 224) in one process, and its peak memory (the sum of the processes' proportional set
sizes, sampled every 50 ms, less this process's before the loader starts) in global batches
(B x 224 x 224 x 3 bytes). Linux only (/proc).

  python benchmarks/data_pipeline.py [--images 400] [--seconds 10] [--workers 2]
                                     [--step-seconds 0.2] [--steps 8] [--repeats 3]
                                     [--mega-batch 4000] [--mega-workers 2] [--mega-steps 2]
                                     [--mega-prefetch 2] [--only-mega]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import statistics
import tempfile
import threading
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw

from recall_jax import data
from recall_jax.data import transforms

from descriptors import machine_name  # benchmarks/: the script's own folder


def synthetic_jpegs(folder: pathlib.Path, count: int, seed: int = 0) -> list[bytes]:
  """Writes and returns `count` JPEGs of about 500x375 pixels (sizes vary by +-20%)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    width, height = int(500 * rng.uniform(0.8, 1.2)), int(375 * rng.uniform(0.8, 1.2))
    coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC),
                        np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
    out.append(buffer.getvalue())
  return out


def _rate(fn, seconds: float) -> tuple[float, float]:
  """Calls fn() (which processes some images and returns how many) for ~seconds.

  Returns images per CPU-second of this process (the per-core rate, robust to other programs
  sharing the cores) and images per wall-clock second.
  """
  fn()  # Warm-up.
  done, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    done += fn()
  return done / (time.process_time() - cpu_start), done / (time.perf_counter() - start)


def synthetic_strokes(count: int, seed: int = 0) -> list[bytes]:
  """`count` 105x105 1-bit PNGs of a few random dark strokes on white (Omniglot's format)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    image = PIL.Image.new("1", (105, 105), 1)
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(3):
      draw.line([tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(4)], fill=0, width=3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out.append(buffer.getvalue())
  return out


def overlapped_rate(make_loader, step_s: float, steps: int) -> float:
  """Images/s of a loop that takes a batch and then 'trains' for `step_s` seconds (a sleep)."""
  loader = make_loader()
  try:
    next(loader)  # Start-up (threads, first batch) is not what is measured.
    images, start = 0, time.perf_counter()
    for _ in range(steps):
      images += len(next(loader)["label"])
      time.sleep(step_s)
    return images / (time.perf_counter() - start)
  finally:
    loader.close()


def _median_rates(cases: dict, repeats: int, measure) -> dict[str, float]:
  """Runs the cases interleaved `repeats` times; the median rate of each."""
  rates = {name: [] for name in cases}
  for _ in range(repeats):
    for name, case in cases.items():
      rates[name].append(measure(case))
  return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=400)
  parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per case")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--resize-size", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--target", type=float, default=2600.0, help="images/s the trainer consumes")
  parser.add_argument("--workers", type=int, default=0,
                      help="also time the loader with N grain workers")
  parser.add_argument("--step-seconds", type=float, default=0.2, help="the fake training step")
  parser.add_argument("--steps", type=int, default=8, help="steps per overlap measurement")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
  parser.add_argument("--mega-batch", type=int, default=4000, help="images per step; 0: skip")
  parser.add_argument("--mega-workers", type=int, default=os.cpu_count())
  parser.add_argument("--mega-steps", type=int, default=2, help="steps measured after the first")
  parser.add_argument("--mega-prefetch", type=int, default=2, help="the loader's prefetch_batches")
  parser.add_argument("--only-mega", action="store_true", help="run the mega-batch part only")
  args = parser.parse_args()
  print(f"machine: {machine_name()}")

  with tempfile.TemporaryDirectory() as tmp:
    encoded = synthetic_jpegs(pathlib.Path(tmp), args.images)
  mean_kb = np.mean([len(e) for e in encoded]) / 1024
  print(f"{len(encoded)} synthetic JPEGs, mean {mean_kb:.0f} KiB; "
        f"CPU cores visible: {os.cpu_count()}")
  if not args.only_mega:
    small_batches(args, encoded)
  if args.mega_batch:
    mega_batch(encoded, batch_size=args.mega_batch, workers=args.mega_workers,
               steps=args.mega_steps, image_size=args.image_size, seconds=args.seconds,
               prefetch_batches=args.mega_prefetch)


def small_batches(args: argparse.Namespace, encoded: list[bytes]) -> None:
  """Per-record costs, the loader in batches of `--batch-size`, overlap and the decode cache."""

  position = iter(range(1 << 62))

  def augment_some() -> int:
    for e in encoded[:50]:
      transforms.train_augment(e, np.random.default_rng([0, next(position)]),
                               image_size=args.image_size)
    return 50

  def decode_some() -> int:
    for e in encoded[:50]:
      PIL.Image.open(io.BytesIO(e)).convert("RGB").load()
    return 50

  def eval_some() -> int:
    for e in encoded[:50]:
      transforms.eval_transform(e, image_size=args.image_size, resize_size=args.resize_size)
    return 50

  labels = np.repeat(np.arange(len(encoded) // 4), 4)
  source = [{"image": e, "label": int(l), "id": str(i)}
            for i, (e, l) in enumerate(zip(encoded, labels))]
  sampler = data.MPerClassSampler(labels, args.batch_size, 4, seed=0)

  def loader_rate(workers: int) -> tuple[float, float]:
    loader = data.make_train_loader(source, sampler, image_size=args.image_size, seed=0,
                                    worker_count=workers, read_threads=1)
    try:
      return _rate(lambda: len(next(loader)["label"]), args.seconds)
    finally:
      loader.close()

  decode_rate = _rate(decode_some, args.seconds)
  train_rate = _rate(augment_some, args.seconds)
  eval_rate = _rate(eval_some, args.seconds)
  loader = loader_rate(0)
  print("images/s per CPU-second of this process (per core) | per wall-clock second")
  rows = [("reference: full-size PIL decode only", decode_rate),
          (f"train_augment (decode, RandomResizedCrop {args.image_size}, flip)", train_rate),
          ("make_train_loader, worker_count=0, read_threads=1", loader),
          (f"eval_transform (resize {args.resize_size}, center crop {args.image_size})", eval_rate)]
  for name, (per_cpu, per_wall) in rows:
    print(f"  {name:58s} {per_cpu:7.0f} | {per_wall:7.0f}")
  per_core = min(train_rate[0], loader[0])
  print(f"workers (cores) for {args.target:.0f} img/s: {math.ceil(args.target / per_core)} "
        f"(at {per_core:.0f} img/s per core, assuming linear scaling)")
  if args.workers:
    _, wall = loader_rate(args.workers)
    print(f"make_train_loader, worker_count={args.workers}: {wall:7.0f} img/s wall-clock")

  # --- Overlap with a training step ------------------------------------------------------------
  def loader_with(read_threads: int, prefetch_batches: int):
    return lambda: data.make_train_loader(source, sampler, image_size=args.image_size, seed=0,
                                          read_threads=read_threads,
                                          prefetch_batches=prefetch_batches)

  cases = {"built ahead (read_threads=2, prefetch_batches=2)": loader_with(2, 2),
           "on demand (read_threads=0, prefetch_batches=0)": loader_with(0, 0)}
  rates = _median_rates(cases, args.repeats,
                        lambda make: overlapped_rate(make, args.step_seconds, args.steps))
  print(f"with a {args.step_seconds:.2f} s fake step per batch of {args.batch_size} "
        f"(median of {args.repeats}, interleaved):")
  for name, rate in rates.items():
    print(f"  {name:58s} {rate:7.0f} img/s")
  ahead, on_demand = rates.values()
  print(f"  ratio built ahead / on demand: {ahead / on_demand:.2f}x "
        f"(bound: step alone {args.batch_size / args.step_seconds:.0f} img/s)")

  # --- Decode-once cache on the demo's input -------------------------------------------------
  strokes = synthetic_strokes(2000)
  stroke_labels = np.repeat(np.arange(len(strokes) // 4), 4)
  stroke_source = _ListSource([{"image": e, "label": int(label), "id": str(i)}
                               for i, (e, label) in enumerate(zip(strokes, stroke_labels))],
                              stroke_labels)
  stroke_sampler = data.MPerClassSampler(stroke_labels, 1000, 4, seed=0)
  held = {"encoded PNG bytes in memory": data.InMemorySource(stroke_source, progress=False),
          "decoded once (decode_channels=1)": data.InMemorySource(stroke_source, decode_channels=1,
                                                                   progress=False)}

  def stroke_rate(held_source) -> float:
    loader = data.make_train_loader(held_source, stroke_sampler, image_size=28, seed=0, channels=1,
                                    flip=False, read_threads=0, prefetch_batches=0)
    try:
      return _rate(lambda: len(next(loader)["label"]), args.seconds)[0]
    finally:
      loader.close()

  rates = _median_rates(held, args.repeats, stroke_rate)
  print("Omniglot-like 105 px 1-bit PNGs -> 28 px, batches of 1,000, one thread "
        f"(images per CPU-second, median of {args.repeats}):")
  for name, rate in rates.items():
    print(f"  {name:58s} {rate:7.0f} img/s")
  encoded_rate, decoded_rate = rates.values()
  print(f"  ratio decoded / encoded: {decoded_rate / encoded_rate:.2f}x "
        f"({held['decoded once (decode_channels=1)'].nbytes / 2**20:.0f} MiB held for "
        f"{len(strokes)} images)")


def _descendants(pid: int) -> list[int]:
  """`pid` and every process below it (grain's workers), from /proc."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      children.setdefault(ppid, []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    out.append(todo.pop())
    todo.extend(children.get(out[-1], []))
  return out


def _cpu_seconds(pids: list[int]) -> float:
  """User + system CPU seconds of `pids` (those still alive)."""
  total, tick = 0.0, os.sysconf("SC_CLK_TCK")
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
      pass
  return total


def _pss_bytes(pids: list[int]) -> int:
  """The summed proportional set size of `pids`: shared pages counted once overall."""
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/smaps_rollup") as f:
        total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
      pass
  return total


class _PeakMemory:
  """Samples the summed PSS of this process and its descendants every 50 ms, keeping the peak."""

  def __init__(self):
    self.peak, self._stop = 0, threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self) -> None:
    while not self._stop.wait(0.05):
      self.peak = max(self.peak, _pss_bytes(_descendants(os.getpid())))

  def __enter__(self) -> _PeakMemory:
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()


def mega_batch(encoded: list[bytes], *, batch_size: int, workers: int, steps: int,
               image_size: int, seconds: float, prefetch_batches: int) -> None:
  """The loader at a mega-batch against a bare PIL loop: rate per core and peak memory."""
  # Records cycle through the JPEGs, so any batch size needs no more unique images.
  count = max(batch_size, len(encoded))
  labels = np.arange(count) // 4
  source = [{"image": encoded[i % len(encoded)], "label": int(labels[i]), "id": str(i)}
            for i in range(count)]
  sampler = data.MPerClassSampler(labels, batch_size, 4, seed=0)
  rng = np.random.default_rng(0)

  def bare_pil_some() -> int:
    for e in encoded[:50]:
      image = PIL.Image.open(io.BytesIO(e)).convert("RGB")
      box = transforms.random_resized_crop_box(*image.size, rng)
      np.asarray(image.resize((image_size, image_size), PIL.Image.BILINEAR, box=box))
    return 50

  bare, _ = _rate(bare_pil_some, seconds)
  batch_bytes = batch_size * image_size * image_size * 3
  before = _pss_bytes([os.getpid()])
  with _PeakMemory() as memory:
    start = time.perf_counter()
    loader = data.make_train_loader(source, sampler, image_size=image_size, seed=0,
                                    worker_count=workers, prefetch_batches=prefetch_batches)
    try:
      next(loader)
      first_s = time.perf_counter() - start
      # Workers that die are not counted; grain keeps them for the iterator's life.
      pids = _descendants(os.getpid())
      workers_pids = [pid for pid in pids if pid != os.getpid()]
      main_start, workers_start = _cpu_seconds([os.getpid()]), _cpu_seconds(workers_pids)
      wall_start = time.perf_counter()
      for _ in range(steps):
        next(loader)
      main_cpu = _cpu_seconds([os.getpid()]) - main_start
      workers_cpu = _cpu_seconds(workers_pids) - workers_start
      cpu = main_cpu + workers_cpu
      wall = time.perf_counter() - wall_start
      workers_pss = _pss_bytes(workers_pids)
    finally:
      loader.close()
  per_core = steps * batch_size / cpu
  print(f"mega-batch B = {batch_size:,} at {image_size} px ({batch_bytes / 2**20:.0f} MiB per "
        f"global batch), {workers} grain workers, prefetch_batches={prefetch_batches}, "
        f"{steps} steps after the first:")
  print(f"  bare PIL loop (decode, crop box, resize), one process: {bare:7.0f} img/s per core")
  print(f"  make_train_loader, all its processes:                 {per_core:7.0f} img/s per core "
        f"({steps * batch_size / wall:.0f} img/s wall-clock, first batch after {first_s:.1f} s)")
  print(f"  CPU seconds per 1,000 images: workers {1000 * workers_cpu / (steps * batch_size):.2f}, "
        f"main process (receiving, stacking) {1000 * main_cpu / (steps * batch_size):.2f}; "
        f"bare PIL {1000 / bare:.2f}")
  print(f"  ratio loader / bare PIL per core: {per_core / bare:.2f}x (goal >= 0.9x)")
  print(f"  peak memory of the loader's processes: {(memory.peak - before) / 2**30:.2f} GiB = "
        f"{(memory.peak - before) / batch_bytes:.2f} global batches (goal <= 3), of which the "
        f"worker processes at the end {workers_pss / 2**30:.2f} GiB (their interpreters and "
        "imports, a few images)")


class _ListSource(list):
  """Records in a list with the `labels` the sampler and `InMemorySource` read."""

  def __init__(self, records, labels):
    super().__init__(records)
    self.labels = labels


if __name__ == "__main__":
  main()
