"""XLA's memory plan of the accelerator training step at mega-batch sizes, without running it.

  python benchmarks/memory_plan.py                          # ViT-B/16 bf16, B = 4000,16000,65536
  python benchmarks/memory_plan.py --model vit_s16 --remat none,block --chunk-size 100
  python benchmarks/memory_plan.py --query-block 1024       # pass RS@k's query block explicitly
  python benchmarks/memory_plan.py --batches 4000 --remat none,block,dots --layouts unrolled,scan
  python benchmarks/memory_plan.py --step backbone --batches 4000 --layouts unrolled,scan

Builds the step an accelerator runs (`train_step.make_train_step` with `keep_activations=False`: the
memory-flat two-pass loop; RS@k with `max_positives = m - 1`, AdamW, state donated), lowers it on
abstract inputs (uint8 images of `--image-size`, labels in classes of m = 4: nothing is allocated)
and compiles it for the default backend, then prints `compile().memory_analysis()` per batch size,
`--remat` setting and `--layouts` layout of the repeated blocks (`scan`: one `nn.scan` over stacked
layers, the models' default; `unrolled`: one copy per layer), with chunks of the largest divisor of
B not above `--chunk-size` (B = 65,536 at 100: 64): temporaries (XLA's scratch for activations, the
loss and everything else live inside the step), arguments (state + batch) and outputs, and the
compile time. It runs on any machine; on a CPU the plan is XLA:CPU's (fusion and layouts differ from
a GPU's, so the absolute figures are indicative; how they scale with B is the point). The loss's
`query_block` is left to the loss's default unless `--query-block` is given. `--step backbone`
plans the backbone alone instead: forward+backward of one chunk, without loss, optimizer or the
chunk loop.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from recall_jax import models
from recall_jax.losses.recall_at_k import recall_at_k_surrogate
from recall_jax.train import train_step as train_step_lib

PER_CLASS = 4
GIB = 2.0**30


def largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def plan(args, batch: int, remat: str, layout: str = "scan") -> dict[str, float]:
  """Compiles one step; returns GiB of temporaries, arguments and outputs, and compile seconds."""
  kwargs = dict(dtype=jnp.dtype(args.dtype), image_size=args.image_size,
                embedding_dim=args.embedding_dim, remat=remat, scan=layout == "scan")
  model = models.get_model(args.model, **kwargs)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0),
                                                           args.image_size))
  params = variables.pop("params")
  frozen = variables

  def embed_fn(p, x, key):
    rngs = {} if key is None else {"dropout": key}
    return model.apply({"params": p, **frozen}, x, train=True, rngs=rngs)

  chunk = largest_divisor_at_most(batch, args.chunk_size)
  if args.step == "backbone":
    # The backbone alone: forward+backward of one chunk, no loss, optimizer or chunk loop.
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(embed_fn(p, x, jax.random.key(0)))))
    chunk_images = jax.ShapeDtypeStruct((chunk, args.image_size, args.image_size, 3), jnp.uint8)
    return _compiled_figures(lambda: grad.lower(params, chunk_images).compile(), chunk)
  loss_kwargs = dict(max_positives=PER_CLASS - 1)
  if args.query_block:
    loss_kwargs["query_block"] = args.query_block
  loss_fn = lambda e, y: recall_at_k_surrogate(e, y, **loss_kwargs)
  optimizer = optax.adamw(1e-5, weight_decay=1e-4)
  step = train_step_lib.make_train_step(embed_fn, loss_fn, optimizer, chunk_size=chunk,
                                        keep_activations=False)
  state = jax.eval_shape(lambda p: train_step_lib.init_train_state(p, optimizer), params)
  images = jax.ShapeDtypeStruct((batch, args.image_size, args.image_size, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return _compiled_figures(lambda: step.lower(state, images, labels, rng).compile(), chunk)


def _compiled_figures(compile_fn, chunk: int) -> dict[str, float]:
  tick = time.perf_counter()
  compiled = compile_fn()
  seconds = time.perf_counter() - tick
  memory = compiled.memory_analysis()
  return dict(chunk=chunk, temp=memory.temp_size_in_bytes / GIB,
              args=memory.argument_size_in_bytes / GIB,
              out=memory.output_size_in_bytes / GIB, alias=memory.alias_size_in_bytes / GIB,
              compile_s=seconds)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="vit_b16")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--embedding-dim", type=int, default=512)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batches", default="4000,16000,65536")
  parser.add_argument("--chunk-size", type=int, default=100)
  parser.add_argument("--remat", default="none,block",
                      help="comma list of the backbone's remat settings")
  parser.add_argument("--layouts", default="scan",
                      help="comma list of block layouts: scan (stacked layers), unrolled")
  parser.add_argument("--step", default="train", choices=["train", "backbone"],
                      help="train: the mega-batch training step; backbone: forward+backward of "
                      "one chunk through the backbone only")
  parser.add_argument("--query-block", type=int, default=None,
                      help="RS@k query block (default: the loss's own default)")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
        f"{args.step} step, {args.model} {args.image_size} px {args.dtype}, chunk "
        f"{args.chunk_size}, query_block {args.query_block or 'loss default'}", flush=True)
  print(f"{'B':>7} {'chunk':>6} {'layout':>8} {'remat':>6} {'temp GiB':>9} {'args GiB':>9} "
        f"{'out GiB':>8} {'compile s':>10}", flush=True)
  results = {}
  for layout in args.layouts.split(","):
    for remat in args.remat.split(","):
      for batch in (int(b) for b in args.batches.split(",")):
        r = plan(args, batch, remat, layout)
        results[(batch, remat, layout)] = r
        print(f"{batch:>7} {r['chunk']:>6} {layout:>8} {remat:>6} {r['temp']:>9.2f} "
              f"{r['args']:>9.2f} {r['out']:>8.2f} {r['compile_s']:>10.1f}", flush=True)
      batches = [b for b, m, l in results if (m, l) == (remat, layout)]
      first, last = results[(batches[0], remat, layout)], results[(batches[-1], remat, layout)]
      if len(batches) > 1:
        print(f"{layout}, remat={remat}: temporaries at B = {batches[-1]} / B = {batches[0]}: "
              f"{last['temp'] / first['temp']:.2f}x (target <= 1.2x)", flush=True)
  # Ratios against the first layout's remat=none plan at each batch size.
  base_layout = args.layouts.split(",")[0]
  for (batch, remat, layout), r in results.items():
    base = results.get((batch, "none", base_layout))
    if base and (remat, layout) != ("none", base_layout):
      print(f"B = {batch}, {layout}, remat={remat} vs {base_layout}, remat=none: temporaries "
            f"{r['temp'] / base['temp']:.2f}x, compile time "
            f"{r['compile_s'] / base['compile_s']:.2f}x", flush=True)
  return results


if __name__ == "__main__":
  main()
