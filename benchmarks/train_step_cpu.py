"""The demo's training step on the CPU: JAX (as the trainer builds it) against its PyTorch twin.

  python benchmarks/train_step_cpu.py                 # B = 1,000, m = 4, chunks of 125, 7 rounds
  python benchmarks/train_step_cpu.py --ops standard,cpu --rounds 9 --torch-threads 2

JAX: `configs/omniglot.py`'s model (`small_cnn_flat`, 28 px grey, 512-d), loss (RS@k with
`max_positives = m - 1`) and optimizer (Adam with L2 weight decay), in the step the trainer builds
on a CPU: `sharded_step.make_sharded_train_step(..., keep_activations=True)` over the data mesh,
state donated. `--ops` lists the model's `ops` settings to time ('standard': flax's convolution,
GroupNorm and max-pool; 'cpu': the matmul and reshape forms of `recall_jax.models.conv`).

PyTorch: the same layers (3x3 convolutions without bias, GroupNorm(8), ReLU, ceil-mode 2x2
max-pool, flatten, LayerNorm, Linear, L2-normalise), the same RS@k formula (`benchmarks/loss.py`'s
vectorised version) and `torch.optim.Adam(weight_decay=...)`, plain forward+backward of the whole
batch, `--torch-threads` threads.

All settings run in one process, interleaved round by round on the same batch; the figures are
medians over `--rounds` rounds after two warm-up steps each, in wall-clock seconds and in CPU
seconds of the process (all threads; less sensitive than wall time to other jobs on the cores). Also
printed: images/s, and the achieved GFLOP/s (matmul and convolution FLOPs of forward + backward, the
B x B similarity included; elementwise work not counted) against the best float32 matmul rate
measured in the same run (2048^3, JAX and PyTorch).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import losses
from recall_jax import models
from recall_jax import parallel
from recall_jax.train import batch_assembly
from recall_jax.train import optimizer as optimizer_lib
from recall_jax.train import sharded_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import loss as loss_bench  # noqa: E402  pylint: disable=g-import-not-at-top


def demo_config():
  spec = importlib.util.spec_from_file_location("omniglot_config", ROOT / "configs/omniglot.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_batch(batch_size: int, per_class: int, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, size, size, 1), np.uint8)
  labels = rng.permutation(np.repeat(np.arange(batch_size // per_class), per_class)).astype(
      np.int32)
  return images, labels


def training_flops(channels, size: int, embedding_dim: int, batch_size: int) -> float:
  """Matmul/convolution FLOPs of one forward + backward of the whole step."""
  flops, cin, hw = 0.0, 3, size
  for i, c in enumerate(channels):
    forward = 2.0 * hw * hw * 9 * cin * c
    flops += forward * (2 if i == 0 else 3)  # no input gradient for the first layer
    cin, hw = c, -(-hw // 2)
  flops += 3 * 2.0 * hw * hw * cin * embedding_dim
  flops *= batch_size
  flops += 3 * 2.0 * batch_size * batch_size * embedding_dim  # similarities, forward + backward
  return flops


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  mm = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  jax.block_until_ready(mm(ja, jb))
  ta @ tb
  best = {"jax": np.inf, "torch": np.inf}
  for _ in range(repeats):
    tick = time.perf_counter()
    jax.block_until_ready(mm(ja, jb))
    best["jax"] = min(best["jax"], time.perf_counter() - tick)
    tick = time.perf_counter()
    ta @ tb
    best["torch"] = min(best["torch"], time.perf_counter() - tick)
  return {k: 2.0 * n**3 / t / 1e9 for k, t in best.items()}


def jax_step(c, ops: str, images: np.ndarray, labels: np.ndarray, chunk_size: int):
  """A `() -> None` that runs one training step of the trainer's CPU form (state carried)."""
  model = models.get_model(c.model.name, embedding_dim=c.model.embedding_dim,
                           image_size=c.data.image_size, ops=ops)
  params = models.init_variables(model, jax.random.key(0), c.data.image_size,
                                 channels=c.data.channels)["params"]
  rsk = c.loss.recall_at_k
  loss_kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rsk.items()
                 if k in ("k_values", "tau1", "tau2", "count_query_in_rank")}
  loss_fn = lambda e, y: losses.get_loss("recall_at_k")(
      e, y, max_positives=c.samples_per_class - 1, **loss_kwargs)
  optimizer, _ = optimizer_lib.make_optimizer(c, steps_per_epoch=100)
  mesh = parallel.data_mesh()
  step = sharded_step.make_sharded_train_step(
      lambda p, x, r: model.apply({"params": p}, x, train=True), loss_fn, optimizer, mesh,
      chunk_size_per_device=chunk_size, keep_activations=True)
  holder = {"state": sharded_step.make_sharded_state(params, optimizer, mesh)}
  batch = batch_assembly.global_batch({"image": images, "label": labels}, mesh)

  def run():
    holder["state"], metrics = step(holder["state"], batch["image"], batch["label"], None)
    return float(metrics["loss"])

  return run


def torch_step(c, images: np.ndarray, labels: np.ndarray, threads: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  layers, cin = [], 3
  for ch in (32, 64, 128, 128):
    layers += [nn.Conv2d(cin, ch, 3, padding=1, bias=False), nn.GroupNorm(min(8, ch), ch, 1e-5),
               nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)]
    cin = ch
  size = c.data.image_size
  for _ in range(4):
    size = -(-size // 2)
  net = nn.Sequential(*layers, nn.Flatten(), nn.LayerNorm(cin * size * size, eps=1e-5),
                      nn.Linear(cin * size * size, c.model.embedding_dim))
  optimizer = torch.optim.Adam(net.parameters(), lr=c.optimizer.learning_rate,
                               weight_decay=c.optimizer.weight_decay)
  mean = torch.tensor(models.common.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(models.common.IMAGENET_STD).view(1, 3, 1, 1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  pos_idx, pos_valid, num_pos = (torch.from_numpy(a) for a in loss_bench.positive_layout(labels))
  k_values = tuple(c.loss.recall_at_k.k_values)

  def run():
    optimizer.zero_grad(set_to_none=True)
    pixels = (x.float() / 255.0).expand(-1, 3, -1, -1)
    emb = nn.functional.normalize(net((pixels - mean) / std), dim=1)
    loss = loss_bench.torch_recall_at_k(emb, pos_idx, pos_valid, num_pos, k_values=k_values,
                                        tau1=c.loss.recall_at_k.tau1,
                                        tau2=c.loss.recall_at_k.tau2)
    loss.backward()
    optimizer.step()
    return loss.item()

  return run


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=1000)
  parser.add_argument("--chunk-size", type=int, default=125)
  parser.add_argument("--ops", default="standard,cpu",
                      help="comma list of the model's `ops` settings to time")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)

  c = demo_config()
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}); "
        f"jax {jax.__version__}")
  images, labels = make_batch(args.batch_size, c.samples_per_class, c.data.image_size)
  runners = {}
  for ops in args.ops.split(","):
    tick = time.perf_counter()
    runners[f"jax ops={ops}"] = jax_step(c, ops, images, labels, args.chunk_size)
    runners[f"jax ops={ops}"]()
    print(f"jax ops={ops}: built + compiled + first step in {time.perf_counter() - tick:.1f} s",
          flush=True)
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    runners[f"torch {torch.__version__} ({args.torch_threads} threads)"] = torch_step(
        c, images, labels, args.torch_threads)
  for run in runners.values():
    run()
  times = {name: [] for name in runners}
  cpu_times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, run in runners.items():
      tick, cpu_tick = time.perf_counter(), time.process_time()
      run()
      times[name].append(time.perf_counter() - tick)
      cpu_times[name].append(time.process_time() - cpu_tick)
  peak = matmul_peak()
  flops = training_flops((32, 64, 128, 128), c.data.image_size, c.model.embedding_dim,
                         args.batch_size)
  best_peak = max(peak.values())
  print(f"B = {args.batch_size}, m = {c.samples_per_class}, chunk {args.chunk_size}; "
        f"{flops / 1e9:.1f} GFLOP per step; float32 matmul 2048^3: JAX {peak['jax']:.0f}, "
        f"PyTorch {peak['torch']:.0f} GFLOP/s")
  medians = {name: statistics.median(t) for name, t in times.items()}
  cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
  reference = next((n for n in medians if n.startswith("torch")), None)
  print(f"{'setting':<34} {'median s':>9} {'min s':>7} {'CPU-s':>7} {'img/s':>7} {'GFLOP/s':>8} "
        f"{'of peak':>8} {'/ torch':>8} {'CPU / torch':>11}")
  for name, median in medians.items():
    ratio = f"{median / medians[reference]:.2f}" if reference else "-"
    cpu_ratio = f"{cpu_medians[name] / cpu_medians[reference]:.2f}" if reference else "-"
    rate = flops / median / 1e9
    print(f"{name:<34} {median:>9.3f} {min(times[name]):>7.3f} {cpu_medians[name]:>7.2f} "
          f"{args.batch_size / median:>7.0f} {rate:>8.1f} {rate / best_peak:>8.0%} {ratio:>8} "
          f"{cpu_ratio:>11}")
  return medians


if __name__ == "__main__":
  main()
