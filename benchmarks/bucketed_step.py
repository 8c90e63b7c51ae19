"""Training in aspect buckets vs padding every image into the square: pixels and step time.

  python benchmarks/bucketed_step.py                 # a CPU: tiny ResNet, 128 px, B = 256
  python benchmarks/bucketed_step.py --model resnet101_landmark --image-size 1024 \
      --batch 256 --chunk 16 --steps 5              # a GPU (B rows per device, as the recipe)

Images follow an aspect mix (`--mix`, width:height ratios and their shares; the default is an
assumed photo collection: 4:3 landscape 50 %, 3:4 portrait 20 %, square 10 %, 16:9 10 %, 2:3
portrait 10 %), drawn independently per image.

1. The plan (no model): `data.estimate_plan` from two sampled batches of `--plan-batch` rows,
   `--margin` as `data.bucket_margin`; then, over `--trials` fresh batches, how many need a
   larger bucket (a recompile) and the pixels embedded per step relative to padding every image
   into the (S, S) square (slots x bucket area; the real pixels are given too).
2. One jitted training gradient (`megabatch.bucketed_value_and_grad`, RS@k) on a batch of
   `--batch` such images, timed three ways in one run: every image in the square bucket (the
   layout without buckets), the estimated plan for that batch size, and each image in its own
   bucket (no overflow: the least compute the bucket shapes allow). Median of `--steps` calls
   after the compiling call. The model has random weights: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from descriptors import machine_name  # benchmarks/: the script's own folder

from recall_jax import data
from recall_jax import models
from recall_jax.data import aspect_buckets
from recall_jax.losses import recall_at_k
from recall_jax.train import megabatch

DEFAULT_MIX = "4:3=0.5,3:4=0.2,1:1=0.1,16:9=0.1,2:3=0.1"


def _mix(text: str) -> tuple[np.ndarray, np.ndarray]:
  """'w:h=share,...' -> (aspect w / h, shares summing to 1)."""
  ratios, shares = [], []
  for part in text.split(","):
    ratio, share = part.split("=")
    w, h = ratio.split(":")
    ratios.append(float(w) / float(h))
    shares.append(float(share))
  shares = np.asarray(shares) / np.sum(shares)
  return np.asarray(ratios), shares


def _sizes(rng: np.random.Generator, n: int, mix, image_size: int) -> list[tuple[int, int]]:
  """(h, w) after resizing the longer side to image_size, for n images drawn from the mix."""
  ratios, shares = mix
  aspect = ratios[rng.choice(len(ratios), n, p=shares)]
  return [aspect_buckets.resized_shape(1000, round(1000 * a), image_size) for a in aspect]


def _buckets_of(sizes, shapes) -> np.ndarray:
  return np.asarray([aspect_buckets.assign_bucket(h, w, shapes) for h, w in sizes], np.int64)


def _pixels(capacities, shapes) -> int:
  return sum(c * h * w for c, (h, w) in zip(capacities, shapes))


def plan_study(args, mix, shapes) -> dict:
  rng = np.random.default_rng(0)
  chunk = args.chunk
  sample = _buckets_of(_sizes(rng, 2 * args.plan_batch, mix, args.image_size), shapes)
  plan = data.estimate_plan(sample, shapes=shapes, rows_per_step=args.plan_batch,
                            chunk_rows=chunk, samples_per_class=args.samples_per_class,
                            margin=args.margin)
  square = -(-args.plan_batch // chunk) * chunk * args.image_size ** 2
  grown, pixels, real = 0, [], []
  for _ in range(args.trials):
    sizes = _sizes(rng, args.plan_batch, mix, args.image_size)
    capacities, _, _ = data.assign_slots(_buckets_of(sizes, shapes), plan)
    grown += capacities != plan.capacities
    pixels.append(_pixels(capacities, shapes) / square)
    real.append(sum(h * w for h, w in sizes) / square)
  return {"rows": args.plan_batch, "chunk_rows": chunk, "margin": args.margin,
          "capacities": " ".join(map(str, plan.capacities)),
          "shapes": " ".join(f"{h}x{w}" for h, w in shapes),
          "batches_needing_a_larger_bucket": f"{grown} of {args.trials}",
          "pixels_vs_square": round(statistics.mean(pixels), 4),
          "real_pixels_vs_square": round(statistics.mean(real), 4)}


def _batch(images, buckets_of_rows, capacities, plan_shapes, position):
  """A BucketedBatch with each image at (bucket, position) of the given capacities."""
  arrays = [np.zeros((c, h, w, 4), np.uint8) for c, (h, w) in zip(capacities, plan_shapes)]
  for array in arrays:
    array[..., 3] = 255  # empty slots: blank image, full mask
  for image, k, p in zip(images, buckets_of_rows, position):
    arrays[k][p] = 0
    arrays[k][p, :image.shape[0], :image.shape[1]] = image
  slots = data.flat_slots(np.asarray(buckets_of_rows), np.asarray(position), capacities)
  return megabatch.BucketedBatch(tuple(jnp.asarray(a) for a in arrays), jnp.asarray(slots))


def step_study(args, mix, shapes) -> dict:
  rng = np.random.default_rng(1)
  sizes = _sizes(rng, args.batch, mix, args.image_size)
  images = [np.concatenate([rng.integers(0, 256, (h, w, 3), np.uint8),
                            np.full((h, w, 1), 255, np.uint8)], axis=-1) for h, w in sizes]
  own = _buckets_of(sizes, shapes)
  labels = jnp.asarray(np.repeat(np.arange(args.batch // args.samples_per_class),
                                 args.samples_per_class), jnp.int32)
  chunk = args.chunk
  sample = _buckets_of(_sizes(rng, 2 * args.batch, mix, args.image_size), shapes)
  estimated = data.estimate_plan(sample, shapes=shapes, rows_per_step=args.batch,
                                 chunk_rows=chunk, samples_per_class=args.samples_per_class,
                                 margin=args.margin)
  layouts = {
      "square": data.BucketPlan(shapes, (0,) * (len(shapes) - 1)
                                + (-(-args.batch // chunk) * chunk,), chunk),
      "plan": estimated,
      "own_bucket": data.BucketPlan(shapes, tuple(
          -(-int(n) // chunk) * chunk for n in np.bincount(own, minlength=len(shapes))), chunk),
  }
  model = models.get_model(args.model, image_size=args.image_size)
  variables = models.init_variables(model, jax.random.key(0), args.image_size)
  params = variables.pop("params")

  def embed_fn(p, x, key):
    del key
    pixels, mask = data.split_mask_channel(x)
    return model.apply({"params": p, **variables}, pixels, mask=mask, train=True)

  k_values = tuple(k for k in recall_at_k.DEFAULT_K_VALUES if k < args.batch - 1)
  loss_fn = functools.partial(recall_at_k.recall_at_k_loss, k_values=k_values,
                              samples_per_class=args.samples_per_class)
  step = jax.jit(megabatch.bucketed_value_and_grad(
      embed_fn, loss_fn, chunk_size=chunk, keep_activations=jax.default_backend() == "cpu"))
  out = {}
  for name, plan in layouts.items():
    capacities, bucket, position = data.assign_slots(own, plan)
    batch = _batch(images, bucket, capacities, shapes, position)
    start = time.perf_counter()
    jax.block_until_ready(step(params, batch, labels))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(step(params, batch, labels))
      times.append(time.perf_counter() - start)
    out[name] = {"capacities": " ".join(map(str, capacities)),
                 "compile_and_first_s": round(first, 2),
                 "median_step_s": round(statistics.median(times), 4),
                 "pixels_vs_square": round(_pixels(capacities, shapes)
                                           / _pixels(layouts["square"].capacities, shapes), 4)}
  for name in ("plan", "own_bucket"):
    out[name]["time_vs_square"] = round(out[name]["median_step_s"]
                                        / out["square"]["median_step_s"], 3)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet_tiny_landmark_test")
  parser.add_argument("--image-size", type=int, default=128)
  parser.add_argument("--num-buckets", type=int, default=4)
  parser.add_argument("--batch", type=int, default=256, help="rows of the timed step")
  parser.add_argument("--chunk", type=int, default=16, help="rows per chunk")
  parser.add_argument("--samples-per-class", type=int, default=4)
  parser.add_argument("--margin", type=float, default=5.0)
  parser.add_argument("--mix", default=DEFAULT_MIX)
  parser.add_argument("--plan-batch", type=int, default=4096, help="rows of the plan study")
  parser.add_argument("--trials", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--json", help="also write the result to this file")
  args = parser.parse_args()
  mix = _mix(args.mix)
  shapes = aspect_buckets.bucket_shapes(args.image_size, num_buckets=args.num_buckets)
  result = {"machine": machine_name(), "backend": jax.default_backend(), "jax": jax.__version__,
            "model": args.model, "image_size": args.image_size, "mix": args.mix,
            "plan": plan_study(args, mix, shapes), "step": step_study(args, mix, shapes)}
  assert math.isfinite(result["step"]["plan"]["median_step_s"])
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
