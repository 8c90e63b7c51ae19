"""Decode + augment throughput of the training pipeline on 224 px crops of ~500x375 JPEGs.

Generates synthetic photos (smooth random fields plus sensor-like noise, JPEG quality 90, about
the size of SOP / CUB images) in a temporary folder, then measures, in one process:

- `train_augment` (decode -> RandomResizedCrop 224 -> flip), the per-record cost;
- `make_train_loader(worker_count=0)`, the same plus batching, on an in-memory source;
- `eval_transform` (resize 256 -> center crop 224);

and reports images/s per core and the workers needed to feed a consumer of `--target` images/s
(default 2,600/s, one H100 training step's appetite). Optionally also times the loader with
`--workers N` grain processes.

  python benchmarks/data_pipeline.py [--images 400] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import tempfile
import time

import numpy as np
import PIL.Image

from recall_jax import data
from recall_jax.data import transforms


def synthetic_jpegs(folder: pathlib.Path, count: int, seed: int = 0) -> list[bytes]:
  """Writes and returns `count` JPEGs of about 500x375 pixels (sizes vary by +-20%)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    width, height = int(500 * rng.uniform(0.8, 1.2)), int(375 * rng.uniform(0.8, 1.2))
    coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC), np.float32)
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=400)
  parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per case")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--resize-size", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--target", type=float, default=2600.0, help="images/s the trainer consumes")
  parser.add_argument("--workers", type=int, default=0, help="also time the loader with N grain workers")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    encoded = synthetic_jpegs(pathlib.Path(tmp), args.images)
  mean_kb = np.mean([len(e) for e in encoded]) / 1024
  print(f"{len(encoded)} synthetic JPEGs, mean {mean_kb:.0f} KiB; CPU cores visible: {os.cpu_count()}")

  position = iter(range(1 << 62))

  def augment_some() -> int:
    for e in encoded[:50]:
      transforms.train_augment(e, np.random.default_rng([0, next(position)]), image_size=args.image_size)
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
  source = [{"image": e, "label": int(l), "id": str(i)} for i, (e, l) in enumerate(zip(encoded, labels))]
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


if __name__ == "__main__":
  main()
