"""Landmark descriptor extraction throughput (images/s): ResNet-101 + GeM + whitening at 1024 px.

  python benchmarks/descriptors.py --images 2 --steps 1               # a CPU: a few images
  python benchmarks/descriptors.py --device gpu --images 64 --steps 10 --dtype bfloat16

Images are a batch of one aspect bucket (default 768 x 1024, the landscape 4:3 bucket at 1024 px)
with a validity mask covering a 750 x 1000 real region, as `recall_jax.data.aspect_buckets`
produces them. Single-scale is one masked forward pass of `resnet101_landmark` (random weights:
throughput does not depend on them); multi-scale describes the batch at (1, 1/sqrt(2), sqrt(2))
with `recall_jax.evaluation.multiscale` (about 3.5x the pixels) and combines the descriptors.
Both are jitted; the first call (compilation) is timed separately from `--steps` timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import models
from recall_jax.evaluation import multiscale


def machine_name() -> str:
  """The GPU's kind, or the CPU's model name and core count."""
  if jax.default_backend() != "cpu":
    return jax.devices()[0].device_kind
  try:
    with open("/proc/cpuinfo") as f:
      name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    name = platform.processor() or "unknown CPU"
  return f"{name}, {os.cpu_count()} cores"


def _time(fn, steps: int) -> tuple[float, float]:
  """(seconds of the first call, mean seconds of the next `steps` calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return first, (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--model", default="resnet101_landmark")
  parser.add_argument("--images", type=int, default=2, help="batch size")
  parser.add_argument("--height", type=int, default=768)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--skip-multiscale", action="store_true")
  parser.add_argument("--out", help="also write the results to this JSON file")
  args = parser.parse_args()
  if jax.default_backend() != args.device:
    raise SystemExit(f"--device {args.device} but JAX runs on {jax.default_backend()}")

  model = models.get_model(args.model, dtype=jnp.dtype(args.dtype))
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 64))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), variables)
  images = jnp.asarray(rng.integers(0, 256, (args.images, args.height, args.width, 3)), jnp.uint8)
  mask = np.zeros((args.images, args.height, args.width), bool)
  mask[:, :round(args.height * 0.977), :round(args.width * 0.977)] = True
  mask = jnp.asarray(mask)

  def describe(x, m):
    return model.apply(variables, x, mask=m)

  single = jax.jit(describe)
  power = multiscale.multiscale_power(model, variables)
  multi = jax.jit(lambda x, m: multiscale.multiscale_descriptors(describe, x, m, power=power))

  results = {"machine": machine_name(), "backend": jax.default_backend(), "model": args.model,
             "dtype": args.dtype, "batch": args.images, "shape": [args.height, args.width]}
  runs = [("single_scale", single)] + ([] if args.skip_multiscale else [("multi_scale", multi)])
  for name, fn in runs:
    first, per_call = _time(lambda fn=fn: fn(images, mask), args.steps)
    results[name] = {"images_per_s": args.images / per_call, "compile_and_first_s": first}
    print(f"{name}: {args.images / per_call:.3f} images/s "
          f"(first call incl. compile {first:.1f} s)", flush=True)
  print(json.dumps(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
