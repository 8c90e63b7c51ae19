"""Benchmark: searching a folder of 10,000 images with the small CNN (`recall_jax.serve.search`).

Writes `--num` small PNGs (coloured blocks, 40 x 48 px, in 100 sub-folders) under `--dir`, then
times, on whatever JAX backend is default:
  * embedding the gallery from the files (decode + resize + embed), first call with compilation,
    then again with a new model id (nothing cached, the embedder already compiled): images/s;
    and its two parts alone on the first 2,000 images: decoding in one thread, the compiled
    embedder on decoded batches;
  * opening the cached gallery (listing and stat of every file, fingerprint, reading the .npz);
  * one query image against the cached gallery (decode, embed, exact top-10): the first query
    (compiles the batch-1 embedder and the k-NN) and the median of `--repeat` later ones;
  * what a command-line search pays once the gallery is cached: opening the cache + first query.

Usage: python benchmarks/search.py [--num 10000] [--dir /tmp/recall_jax_search_bench]
                                   [--image-size 28] [--embedding-dim 512] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import time

import jax
import numpy as np
import PIL.Image

from recall_jax.models import get_model, init_variables
from recall_jax.serve import gallery as gallery_lib
from recall_jax.serve import search as search_lib


def write_images(root: pathlib.Path, num: int, seed: int = 0) -> list[pathlib.Path]:
  """`num` PNGs of random coloured 4 x 5 blocks, 40 x 48 px, in 100 sub-folders."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(num):
    blocks = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((12, 8, 1), np.uint8))
    path = root / f"part{i % 100:02d}" / f"img{i:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or "unknown CPU"


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=10000)
  parser.add_argument("--dir", default="/tmp/recall_jax_search_bench")
  parser.add_argument("--image-size", type=int, default=28)
  parser.add_argument("--embedding-dim", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeat", type=int, default=20, help="timed queries after the first")
  args = parser.parse_args()

  root = pathlib.Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  paths, seconds = timed(lambda: write_images(root / "gallery", args.num))
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}; backend {jax.default_backend()} "
        f"({jax.device_count()} x {jax.devices()[0].device_kind})")
  print(f"wrote {len(paths)} PNGs in {seconds:.1f} s")

  model = get_model("small_cnn", embedding_dim=args.embedding_dim)
  variables = init_variables(model, jax.random.key(0), args.image_size, 3)
  embed_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  transform = gallery_lib.ImageTransform(args.image_size, args.image_size + args.image_size // 7, 3)

  def embed(model_id: str):
    return gallery_lib.embed_gallery(embed_fn, root / "gallery", model_id=model_id,
                                     transform=transform, cache_dir=root / "cache",
                                     batch_size=args.batch_size, progress=False)

  gallery, cold = timed(lambda: embed("first"))
  assert not gallery.from_cache and len(gallery.relative_paths) == args.num
  print(f"embed gallery, first call (compile included): {cold:.1f} s = {args.num / cold:.0f} img/s")
  gallery, warm = timed(lambda: embed("second"))
  assert not gallery.from_cache
  print(f"embed gallery, compiled embedder: {warm:.1f} s = {args.num / warm:.0f} img/s")
  sample = paths[:2000]
  images, seconds = timed(lambda: np.stack([gallery_lib.load_image(p, transform) for p in sample]))
  print(f"  decode + resize alone, one thread: {len(sample) / seconds:.0f} img/s")
  batches = range(0, len(sample) - args.batch_size + 1, args.batch_size)
  _, seconds = timed(lambda: [np.asarray(embed_fn(images[s:s + args.batch_size]))
                              for s in batches])
  print(f"  compiled embedder alone: {len(batches) * args.batch_size / seconds:.0f} img/s")
  gallery, opened = timed(lambda: embed("second"))
  assert gallery.from_cache
  print(f"open the cached gallery: {opened * 1e3:.0f} ms")

  query = paths[args.num // 2]

  def search():
    return search_lib.search_gallery(embed_fn, gallery, query, transform=transform, top_k=10)

  results, first = timed(search)
  assert results[str(query)][0]["path"] == str(query)
  latencies = [timed(search)[1] for _ in range(args.repeat)]
  print(f"one query, first (compiles the batch-1 embedder and the k-NN): {first * 1e3:.0f} ms")
  print(f"one query, median of {args.repeat} later ones: "
        f"{statistics.median(latencies) * 1e3:.1f} ms (min {min(latencies) * 1e3:.1f} ms)")
  print(f"command-line search with a cached gallery (open cache + first query): "
        f"{(opened + first) * 1e3:.0f} ms, plus the process start and model restore")
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
