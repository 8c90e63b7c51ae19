"""Forward + backward throughput (images/s) of the backbones, with timm for reference.

  python benchmarks/backbones.py                      # ViT-B/16 and ResNet-50, 224 px, bf16, b=256
  python benchmarks/backbones.py --batch 8 --steps 3  # small run on a CPU

For each model: one jitted step computing the gradient of a scalar loss of the embeddings w.r.t.
`params` (no optimizer update), timed over `--steps` calls after `--warmup` calls. On GPU the ViTs
are also run with cuDNN flash attention (tokens zero-padded to `--pad-to`, padded keys masked),
which needs a token count cuDNN accepts (197 is rejected). When torch and timm import, the same
fwd+bwd runs in PyTorch with bf16 autocast (channels-last for ResNet) on the same device.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import models

_TIMM_NAMES = {"vit_b16": "vit_base_patch16_224", "vit_b32": "vit_base_patch32_224",
               "vit_s16": "vit_small_patch16_224", "resnet50": "resnet50"}


def bench_jax(name: str, batch: int, image_size: int, dtype, steps: int, warmup: int,
              **model_kwargs) -> float:
  """Images/s of jitted fwd+bwd w.r.t. params for model `name`."""
  model = models.get_model(name, dtype=dtype, image_size=image_size, **model_kwargs)
  variables = models.init_variables(model, jax.random.key(0), image_size)
  params = variables.pop("params")
  rest = variables  # batch_stats (frozen) or nothing.
  images = jax.random.randint(jax.random.key(1), (batch, image_size, image_size, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)

  @jax.jit
  def step(params, images):
    def loss(p):
      emb = model.apply({"params": p, **rest}, images, train=True)
      return jnp.mean(emb @ emb[0])
    return jax.value_and_grad(loss)(params)

  for _ in range(warmup):
    jax.block_until_ready(step(params, images))
  start = time.perf_counter()
  for _ in range(steps):
    out = step(params, images)
  jax.block_until_ready(out)
  return batch * steps / (time.perf_counter() - start)


def bench_timm(name: str, batch: int, image_size: int, steps: int, warmup: int) -> float | None:
  """Images/s of PyTorch/timm fwd+bwd with bf16 autocast, or None without torch/timm."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except Exception as e:  # ImportError, or timm failing to import next to a CPU torch.
    print(f"  timm: skipped ({type(e).__name__}: {e})")
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = timm.create_model(_TIMM_NAMES[name], pretrained=False, num_classes=0,
                            img_size=image_size) if name.startswith("vit") else (
                                timm.create_model(_TIMM_NAMES[name], pretrained=False,
                                                  num_classes=0))
  model = model.to(device).train()
  images = torch.randn(batch, 3, image_size, image_size, device=device)
  if name.startswith("resnet"):
    model = model.to(memory_format=torch.channels_last)
    images = images.to(memory_format=torch.channels_last)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      out = model(images)
    loss = out.float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(warmup):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return batch * steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="vit_b16,resnet50")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--pad-to", type=int, default=200,
                      help="token count for the cuDNN attention run (GPU only)")
  parser.add_argument("--no-timm", action="store_true")
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  on_gpu = jax.default_backend() == "gpu"
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
        f"{args.image_size} px, compute {args.dtype}, {args.steps} timed steps")
  for name in args.models.split(","):
    runs = [("xla attention" if name.startswith("vit") else "jax", {})]
    if on_gpu and name.startswith("vit"):
      runs.append((f"cudnn attention, padded to {args.pad_to}",
                   dict(attention_implementation="cudnn", attention_pad_to=args.pad_to)))
    for label, kwargs in runs:
      try:
        ips = bench_jax(name, args.batch, args.image_size, dtype, args.steps, args.warmup,
                        **kwargs)
        print(f"{name:10s} {label:36s} {ips:10.1f} img/s")
      except Exception as e:  # e.g. cuDNN rejecting a shape; report and go on.
        print(f"{name:10s} {label:36s} failed: {type(e).__name__}: {str(e)[:200]}")
    if not args.no_timm and name in _TIMM_NAMES:
      ips = bench_timm(name, args.batch, args.image_size, args.steps, args.warmup)
      if ips is not None:
        print(f"{name:10s} {'timm + torch bf16 autocast':36s} {ips:10.1f} img/s")


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
