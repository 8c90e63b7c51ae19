"""Mega-batch training step: images/s and peak device memory vs batch size, and the plain fwd+bwd.

  python benchmarks/megabatch.py                      # ViT-B/16, 224 px, bf16, B = 4000,16000,65536
  python benchmarks/megabatch.py --model vit_tiny_test --image-size 32 --batches 256,1024 \\
      --chunk-size 64 --steps 2 --embedding-dim 16    # tiny run on a CPU

For each batch size B, in a fresh subprocess (so that the device's peak-memory counter belongs to
that B alone, and an out-of-memory error ends only that case): one jitted `make_train_step` (RS@k
on B uint8 images of 4 per class, AdamW, state donated) with chunk size = the largest divisor of B
not above `--chunk-size`, timed over `--steps` steps after one warm-up step. Reported: compile
time, step time, images/s, the peak of `device.memory_stats()['peak_bytes_in_use']` (GPU; "n/a"
where the backend keeps no statistics) and XLA's planned memory (`memory_analysis()`: arguments +
temporaries + outputs not aliased to donated inputs). Then plain jitted fwd+bwd (`value_and_grad`
of the same loss) at each chunk size in the same way, and the ratio of the two throughputs: the
two-pass step runs one extra forward, so its ceiling is about 3/4.

Parameters are float32, compute is `--dtype` (bf16 by default); `--attention cudnn` selects cuDNN
flash attention with tokens padded to `--pad-to` (GPU only).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

from recall_jax import models
from recall_jax.losses.recall_at_k import recall_at_k_surrogate
from recall_jax.train.train_step import init_train_state
from recall_jax.train.train_step import make_train_step

PER_CLASS = 4
GIB = 2.0**30


def largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _setup(args, batch: int):
  kwargs = dict(dtype=jnp.dtype(args.dtype), image_size=args.image_size,
                embedding_dim=args.embedding_dim, remat=args.remat)
  if args.attention == "cudnn":
    kwargs.update(attention_implementation="cudnn", attention_pad_to=args.pad_to)
  model = models.get_model(args.model, **kwargs)
  variables = models.init_variables(model, jax.random.key(0), args.image_size)
  params = variables.pop("params")
  frozen = variables  # BatchNorm running statistics (ResNets) or nothing

  def embed_fn(p, x, key):
    rngs = {} if key is None else {"dropout": key}
    return model.apply({"params": p, **frozen}, x, train=True, rngs=rngs)

  # The paper's cut-offs, less those a tiny batch (a chunk, in the plain case) cannot have.
  k_values = tuple(k for k in (1, 2, 4, 8, 16) if k < batch - 1)
  loss_fn = functools.partial(recall_at_k_surrogate, max_positives=PER_CLASS - 1,
                              k_values=k_values, query_block=args.query_block)
  # Made on the device: a 65,536-image batch of 224 px is 9.9 GB of uint8.
  images = jax.jit(lambda k: jax.random.randint(
      k, (batch, args.image_size, args.image_size, 3), 0, 256, jnp.int32).astype(jnp.uint8))(
          jax.random.key(1))
  labels = jnp.repeat(jnp.arange(batch // PER_CLASS, dtype=jnp.int32), PER_CLASS)
  return embed_fn, loss_fn, params, images, labels


def _peak_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else float(stats.get("peak_bytes_in_use", 0))


def _planned_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes -
               m.alias_size_in_bytes)


def _time(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # warm-up
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def run_case(args, mode: str, batch: int) -> dict:
  """One measurement, in this process: mode 'mega' (B images) or 'plain' (B = one chunk)."""
  embed_fn, loss_fn, params, images, labels = _setup(args, batch)
  start = time.perf_counter()
  if mode == "mega":
    chunk = largest_divisor_at_most(batch, args.chunk_size)
    optimizer = optax.adamw(1e-5, weight_decay=1e-4)
    state = init_train_state(params, optimizer)
    step = make_train_step(embed_fn, loss_fn, optimizer, chunk_size=chunk)
    compiled = step.lower(state, images, labels, None).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def call():
      holder[0], metrics = compiled(holder[0], images, labels, None)
      return metrics["loss"]
  else:
    chunk = batch
    plain = jax.jit(jax.value_and_grad(
        lambda p, x, y: loss_fn(embed_fn(p, x, None), y)))
    compiled = plain.lower(params, images, labels).compile()
    compile_s = time.perf_counter() - start
    call = lambda: compiled(params, images, labels)
  seconds = _time(call, args.steps)
  peak = _peak_bytes()
  return dict(mode=mode, batch=batch, chunk=chunk, compile_s=compile_s, step_s=seconds,
              images_per_s=batch / seconds, peak_gib=None if peak is None else peak / GIB,
              planned_gib=_planned_bytes(compiled) / GIB)


def _subprocess(argv: list[str], mode: str, batch: int) -> dict:
  cmd = [sys.executable, __file__, *argv, "--one", f"{mode}:{batch}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(mode=mode, batch=batch, error=" | ".join(tail)[-300:])


def _fmt(r: dict) -> str:
  if "error" in r:
    return f"{r['mode']:5s} B={r['batch']:6d}  FAILED: {r['error']}"
  peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
  return (f"{r['mode']:5s} B={r['batch']:6d} chunk={r['chunk']:4d}  compile {r['compile_s']:6.1f} s"
          f"  step {r['step_s']:8.3f} s  {r['images_per_s']:9.1f} img/s  peak {peak} GiB"
          f"  planned {r['planned_gib']:.3f} GiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vit_b16")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--embedding-dim", type=int, default=512)
  parser.add_argument("--batches", default="4000,16000,65536")
  parser.add_argument("--chunk-size", type=int, default=512,
                      help="largest chunk; each B uses its largest divisor not above this")
  parser.add_argument("--query-block", type=int, default=512, help="RS@k query block")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
  parser.add_argument("--pad-to", type=int, default=200)
  parser.add_argument("--remat", default="none", help="backbone remat: none, block (or dots)")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: 'mode:batch' in this process
  args = parser.parse_args()

  if args.one:
    mode, batch = args.one.split(":")
    print(json.dumps(run_case(args, mode, int(batch))))
    return

  argv = [a for a in sys.argv[1:]]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}); {args.model}, "
        f"{args.image_size} px, compute {args.dtype}, float32 params, RS@k, AdamW, "
        f"{args.steps} timed steps")
  batches = [int(b) for b in args.batches.split(",")]
  results = [_subprocess(argv, "mega", b) for b in batches]
  for r in results:
    print(_fmt(r), flush=True)
  chunks = sorted({largest_divisor_at_most(b, args.chunk_size) for b in batches})
  plain = {c: _subprocess(argv, "plain", c) for c in chunks}
  for r in plain.values():
    print(_fmt(r), flush=True)
  for r in results:
    p = plain[largest_divisor_at_most(r["batch"], args.chunk_size)]
    if "error" not in r and "error" not in p:
      print(f"B={r['batch']}: mega-batch / plain fwd+bwd throughput = "
            f"{r['images_per_s'] / p['images_per_s']:.3f} (ceiling about 0.75)")
  print(json.dumps(dict(device=device.device_kind, mega=results, plain=list(plain.values()))))


if __name__ == "__main__":
  main()
