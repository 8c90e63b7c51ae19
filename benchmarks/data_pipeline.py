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
robust to other programs sharing the cores; the memory sampling's own CPU time is left out of the
main process's) against a bare PIL loop (decode, random crop box,
resize to 224) in one process, and its peak memory (the sum of the processes' proportional set
sizes, sampled every 50 ms, less this process's before the loader starts) in global batches
(B x 224 x 224 x 3 bytes). Linux only (/proc).

And the landmark (whole-image) training loader (`--bucketed-batch`, default 1,000 images of
longer side `--bucketed-size` 512 per step, 0: skip) on synthetic JPEGs of mixed aspect ratios
(longer side about 1,000 px; 4:3, 3:4, 16:9, 1:1, 2:3), `--mega-workers` workers, against the
former design kept here as the reference (one grain element per step: a whole batch built by one
worker thread), in one run, the same figures as above plus the time until the first batch is
ready; a global batch is the plan's bucket arrays (capacities x bucket shape x 4 channels).

  python benchmarks/data_pipeline.py [--images 400] [--seconds 10] [--workers 2]
                                     [--step-seconds 0.2] [--steps 8] [--repeats 3]
                                     [--mega-batch 4000] [--mega-workers 2] [--mega-steps 2]
                                     [--mega-prefetch 2] [--mega-read-threads 2] [--only-mega]
                                     [--bucketed-batch 1000] [--bucketed-size 512]
                                     [--bucketed-images 200] [--only-bucketed]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import pathlib
import statistics
import tempfile
import threading
import time
import warnings

import grain
import numpy as np
import PIL.Image
import PIL.ImageDraw

from recall_jax import data
from recall_jax.data import aspect_buckets
from recall_jax.data import bucket_plan
from recall_jax.data import pipeline
from recall_jax.data import transforms

from descriptors import machine_name  # benchmarks/: the script's own folder


def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG (quality 90) of a smooth random field plus sensor-like noise."""
  coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
  smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC),
                      np.float32)
  pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def synthetic_jpegs(folder: pathlib.Path, count: int, seed: int = 0) -> list[bytes]:
  """Writes and returns `count` JPEGs of about 500x375 pixels (sizes vary by +-20%)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    width, height = int(500 * rng.uniform(0.8, 1.2)), int(375 * rng.uniform(0.8, 1.2))
    out.append(_photo(rng, width, height))
    (folder / f"{i:05d}.jpg").write_bytes(out[-1])
  return out


# Width:height of the landmark photos and their shares (an assumed photo collection).
_ASPECTS = ((4 / 3, 0.5), (3 / 4, 0.2), (16 / 9, 0.1), (1.0, 0.1), (2 / 3, 0.1))


def synthetic_landmark_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """`count` JPEGs of mixed aspect ratios (`_ASPECTS`), longer side 1,000 px +-20%."""
  rng = np.random.default_rng(seed)
  ratios, shares = zip(*_ASPECTS)
  out = []
  for _ in range(count):
    ratio, longer = rng.choice(ratios, p=shares), 1000 * rng.uniform(0.8, 1.2)
    width, height = (longer, longer / ratio) if ratio >= 1 else (longer * ratio, longer)
    out.append(_photo(rng, round(width), round(height)))
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
  parser.add_argument("--mega-read-threads", type=int, default=2,
                      help="the loader's read_threads (per worker process)")
  parser.add_argument("--only-mega", action="store_true", help="run the mega-batch part only")
  parser.add_argument("--bucketed-batch", type=int, default=1000,
                      help="whole images per step of the landmark loader; 0: skip")
  parser.add_argument("--bucketed-size", type=int, default=512, help="their longer side")
  parser.add_argument("--bucketed-images", type=int, default=200,
                      help="unique synthetic JPEGs the landmark loader's records cycle through")
  parser.add_argument("--only-bucketed", action="store_true",
                      help="run the landmark loader part only")
  args = parser.parse_args()
  print(f"machine: {machine_name()}")
  if args.only_bucketed:
    bucketed(args)
    return

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
               prefetch_batches=args.mega_prefetch, read_threads=args.mega_read_threads)
  if not args.only_mega:
    bucketed(args)


def bucketed(args: argparse.Namespace) -> None:
  """The landmark loader's part (`bucketed_batch`) with the command line's figures."""
  if args.bucketed_batch:
    bucketed_batch(batch_size=args.bucketed_batch, image_size=args.bucketed_size,
                   unique_images=args.bucketed_images, workers=args.mega_workers,
                   steps=args.mega_steps, seconds=args.seconds,
                   prefetch_batches=args.mega_prefetch, read_threads=args.mega_read_threads)


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
    self.cpu_s = 0.0  # The sampling's own CPU time (reading /proc), not the loader's.
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self) -> None:
    while not self._stop.wait(0.05):
      start = time.thread_time()
      self.peak = max(self.peak, _pss_bytes(_descendants(os.getpid())))
      self.cpu_s += time.thread_time() - start

  def __enter__(self) -> _PeakMemory:
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()


@dataclasses.dataclass
class _LoaderFigures:
  """What `_measure_loader` measures of one loader (CPU seconds of the measured steps)."""

  first_s: float  # From creating the loader to its first batch, wall-clock.
  images: int  # Images of the measured steps.
  wall_s: float
  workers_cpu: float
  main_cpu: float  # Less the memory sampling's own CPU time.
  sampling_cpu: float
  peak_bytes: int  # Peak summed PSS of the loader's processes, less this process's before.
  workers_pss: int  # The worker processes' PSS at the end.

  @property
  def per_core(self) -> float:
    return self.images / (self.workers_cpu + self.main_cpu)


def _measure_loader(make_loader, steps: int) -> _LoaderFigures:
  """The first batch's latency, then `steps` more batches' CPU time and the run's peak memory."""
  before = _pss_bytes([os.getpid()])
  with _PeakMemory() as memory:
    start = time.perf_counter()
    loader = make_loader()
    try:
      next(loader)
      first_s = time.perf_counter() - start
      # Workers that die are not counted; grain keeps them for the iterator's life.
      pids = _descendants(os.getpid())
      workers_pids = [pid for pid in pids if pid != os.getpid()]
      main_start, workers_start = _cpu_seconds([os.getpid()]), _cpu_seconds(workers_pids)
      sampling_start = memory.cpu_s
      wall_start = time.perf_counter()
      images = sum(len(next(loader)["label"]) for _ in range(steps))
      sampling = memory.cpu_s - sampling_start
      main_cpu = _cpu_seconds([os.getpid()]) - main_start - sampling
      workers_cpu = _cpu_seconds(workers_pids) - workers_start
      wall = time.perf_counter() - wall_start
      workers_pss = _pss_bytes(workers_pids)
    finally:
      loader.close()
  return _LoaderFigures(first_s, images, wall, workers_cpu, main_cpu, sampling,
                        memory.peak - before, workers_pss)


def mega_batch(encoded: list[bytes], *, batch_size: int, workers: int, steps: int,
               image_size: int, seconds: float, prefetch_batches: int, read_threads: int) -> None:
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
  figures = _measure_loader(
      lambda: data.make_train_loader(source, sampler, image_size=image_size, seed=0,
                                     worker_count=workers, prefetch_batches=prefetch_batches,
                                     read_threads=read_threads), steps)
  images = figures.images
  print(f"mega-batch B = {batch_size:,} at {image_size} px ({batch_bytes / 2**20:.0f} MiB per "
        f"global batch), {workers} grain workers, read_threads={read_threads}, "
        f"prefetch_batches={prefetch_batches}, "
        f"{steps} steps after the first:")
  print(f"  bare PIL loop (decode, crop box, resize), one process: {bare:7.0f} img/s per core")
  print(f"  make_train_loader, all its processes:                 {figures.per_core:7.0f} img/s "
        f"per core ({images / figures.wall_s:.0f} img/s wall-clock, first batch after "
        f"{figures.first_s:.1f} s)")
  print(f"  CPU seconds per 1,000 images: workers {1000 * figures.workers_cpu / images:.2f}, "
        f"main process (receiving, stacking) {1000 * figures.main_cpu / images:.2f} "
        f"(less the memory sampling's {1000 * figures.sampling_cpu / images:.2f}); "
        f"bare PIL {1000 / bare:.2f}")
  print(f"  ratio loader / bare PIL per core: {figures.per_core / bare:.2f}x (goal >= 0.9x)")
  print(f"  peak memory of the loader's processes: {figures.peak_bytes / 2**30:.2f} GiB = "
        f"{figures.peak_bytes / batch_bytes:.2f} global batches (goal <= 3), of which the "
        f"worker processes at the end {figures.workers_pss / 2**30:.2f} GiB (their interpreters "
        "and imports, a few images)")


class _WholeStepReference:
  """The former landmark training loader's grain element, kept here only to compare with: one
  step's whole batch, read, decoded, resized, flipped and padded into its slots by one call (in
  one worker thread). Its batches are those of `make_bucketed_train_loader` (the tests check)."""

  def __init__(self, source, sampler: data.MPerClassSampler, plan: data.BucketPlan,
               image_size: int):
    self.source, self.sampler, self.plan, self.image_size = source, sampler, plan, image_size

  def __call__(self, step: int) -> dict:
    step = int(step)
    records = [self.source[i] for i in self.sampler.batch_indices(step)]
    own = [aspect_buckets.assign_bucket(
        *aspect_buckets.resized_shape(*data.image_hw(r["image"]), self.image_size),
        self.plan.shapes) for r in records]
    capacities, bucket, position = data.assign_slots(np.asarray(own, np.int64), self.plan)
    arrays = tuple(bucket_plan.empty_slots(c, shape, 3)
                   for c, shape in zip(capacities, self.plan.shapes))
    for k, record in enumerate(records):
      resized = aspect_buckets.resize_longer_side(record["image"], self.image_size)
      if np.random.default_rng([0, step, k]).random() < 0.5:
        resized = resized[:, ::-1]
      arrays[bucket[k]][position[k]] = data.with_mask_channel(
          *aspect_buckets.pad_to_bucket(resized, self.plan.shapes[bucket[k]]))
    return {"image": data.BucketedImages(arrays, bucket, position),
            "label": np.asarray([r["label"] for r in records], np.int32)}


def bucketed_batch(*, batch_size: int, image_size: int, unique_images: int, workers: int,
                   steps: int, seconds: float, prefetch_batches: int, read_threads: int) -> None:
  """The landmark loader, grouped images vs one element per step, against a bare PIL loop."""
  encoded = synthetic_landmark_jpegs(unique_images, seed=1)
  count = max(batch_size, len(encoded))
  labels = np.arange(count) // 4
  source = _ListSource([{"image": encoded[i % len(encoded)], "label": int(labels[i]),
                         "id": str(i)} for i in range(count)], labels)
  sampler = data.MPerClassSampler(labels, batch_size, 4, seed=0)
  plan = data.estimate_bucket_plan(source, sampler, image_size=image_size, num_buckets=4,
                                   chunk_rows=20)
  batch_bytes = sum(c * h * w * 4 for c, (h, w) in zip(plan.capacities, plan.shapes))
  print(f"landmark loader, B = {batch_size:,} whole images (longer side {image_size} px) of "
        f"{len(encoded)} synthetic JPEGs (longer side ~1,000 px, mean "
        f"{np.mean([len(e) for e in encoded]) / 1024:.0f} KiB), plan {plan.capacities} of "
        f"{plan.shapes} ({batch_bytes / 2**20:.0f} MiB per global batch), {workers} grain "
        f"workers, read_threads={read_threads}, prefetch_batches={prefetch_batches}, {steps} "
        f"steps after the first:")

  def bare_pil_some() -> int:
    for e in encoded[:20]:
      image = PIL.Image.open(io.BytesIO(e))
      scale = image_size / max(image.size)
      size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
      image.draft("RGB", size)
      np.asarray(image.convert("RGB").resize(size, PIL.Image.BILINEAR))
    return 20

  bare, _ = _rate(bare_pil_some, seconds)
  new = lambda: data.make_bucketed_train_loader(
      source, sampler, plan=plan, image_size=image_size, seed=0, worker_count=workers,
      read_threads=read_threads, prefetch_batches=prefetch_batches)
  old = lambda: iter(pipeline.ahead(
      grain.MapDataset.range(0, 1 << 40).map(_WholeStepReference(source, sampler, plan,
                                                                 image_size)),
      worker_count=workers, read_threads=read_threads, prefetch_batches=prefetch_batches))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # A step beyond the plan grows a bucket: not measured here.
    figures = {"one element per step (former)": _measure_loader(old, steps),
               "groups of images (now)": _measure_loader(new, steps)}
  print(f"  bare PIL loop (decode, draft, resize to the longer side), one process: {bare:5.0f} "
        f"img/s per core ({1000 / bare:.2f} CPU-ms per image)")
  for name, f in figures.items():
    print(f"  {name}: {f.per_core:5.0f} img/s per core = {f.per_core / bare:.2f}x bare PIL "
          f"({f.images / f.wall_s:.0f} img/s wall-clock); CPU-ms per image: workers "
          f"{1000 * f.workers_cpu / f.images:.2f}, main {1000 * f.main_cpu / f.images:.2f}; "
          f"first batch after {f.first_s:.1f} s; peak memory {f.peak_bytes / 2**30:.2f} GiB = "
          f"{f.peak_bytes / batch_bytes:.2f} global batches (workers at the end "
          f"{f.workers_pss / 2**30:.2f} GiB)")
  old_f, new_f = figures.values()
  print(f"  now / former: {new_f.per_core / old_f.per_core:.2f}x images per CPU-second, "
        f"{new_f.first_s / old_f.first_s:.2f}x time to the first batch, "
        f"{new_f.peak_bytes / old_f.peak_bytes:.2f}x peak memory")


class _ListSource(list):
  """Records in a list with the `labels` the sampler and `InMemorySource` read."""

  def __init__(self, records, labels):
    super().__init__(records)
    self.labels = labels


if __name__ == "__main__":
  main()
