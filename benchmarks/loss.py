"""RS@k loss forward+backward: time and peak memory, JAX vs a vectorised PyTorch version.

  python benchmarks/loss.py                                 # B = 1000, 4000, 4000+simix; D = 512
  python benchmarks/loss.py --sizes 4000 --query-block none,512 --repeats 20 --no-torch

Batches: `--sizes` is a comma list of cases; `N` is N real rows in classes of `--per-class` (4,
so P = 3 positives per query) and `N+simix` is N real rows followed by SiMix's virtual rows (for
N = 4,000 and m = 4: 6,000 virtual rows, 10,000 in all, classes of 10, P = 9). Rows are random
unit vectors in R^D (SiMix rows are not renormalised, as in training); labels are int32.

JAX: `jax.jit(jax.value_and_grad(recall_at_k_surrogate))` w.r.t. the (B, D) rows, for each
`--query-block` setting ("none" = one block), each in a fresh subprocess (so that an
out-of-memory error ends only that case and the GPU's peak-memory counter belongs to it alone).
Peak memory: on GPU `device.memory_stats()['peak_bytes_in_use']`; everywhere XLA's planned
memory from `lower(...).compile().memory_analysis()` (arguments + temporaries + outputs). A
setting whose planned memory exceeds `--max-gib` is reported and not run.

PyTorch (when `import torch` works and not `--no-torch`): `torch_recall_at_k` below, the same
formula vectorised: sims = E @ E.T in float32, each query's positives gathered with the same
(B, P) index layout, the (Q, P, B) sigmoid of clipped similarity differences with the same
masking (j != p; j = q counted, count_query_in_rank=True), forward+backward through autograd.
When the (B, P, B) intermediates would exceed `--max-gib`, queries are processed in blocks with
`torch.utils.checkpoint` (the same rematerialisation JAX's `query_block` does). The two losses
must agree (relative difference printed); the JAX/PyTorch time ratio uses the fastest JAX
setting that ran. Both use all cores by default (`torch.set_num_threads(os.cpu_count())`,
`--torch-threads` to change; XLA's CPU backend uses every core by default).

Times are the minimum and the median over `--repeats` calls after one warm-up call; on a shared
CPU the minimum is the better estimate of the cost, and the CPU-seconds per call (all threads of
the process) are printed too. The load average at start and end is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

D_DEFAULT = 512
K_VALUES = (1, 2, 4, 8, 16)
TAU1, TAU2 = 1.0, 0.01
CLIP = 50.0
GIB = 2.0**30
_ENV = dict(os.environ)  # for the JAX subprocesses, before main() pins this process to CPU


# ----------------------------------------------------------------------------- data


def parse_size(token: str) -> tuple[int, bool]:
  """'4000' -> (4000, False); '4000+simix' -> (4000, True)."""
  token = token.strip().lower()
  if token.endswith("+simix"):
    return int(token[:-len("+simix")]), True
  return int(token), False


def make_batch(real_rows: int, use_simix: bool, dim: int, per_class: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(B, dim) float32 rows and (B,) int32 labels; deterministic in `seed`.

  Real rows are unit vectors in classes of `per_class` consecutive rows; with `use_simix` the
  virtual rows of `recall_jax.simix.simix` (alpha drawn here with NumPy, so both frameworks see
  the same numbers) are appended.
  """
  if real_rows % per_class:
    raise ValueError(f"{real_rows} rows are not a multiple of per_class={per_class}")
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((real_rows, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = np.repeat(np.arange(real_rows // per_class, dtype=np.int32), per_class)
  if not use_simix:
    return x, labels
  import jax  # pylint: disable=g-import-not-at-top
  from recall_jax import simix as simix_lib  # pylint: disable=g-import-not-at-top
  num_pairs = simix_lib.num_simix_pairs(labels)
  alpha = rng.uniform(0.0, 1.0, num_pairs).astype(np.float32)
  with jax.default_device(jax.devices("cpu")[0]):
    rows, aug_labels = simix_lib.simix(jax.numpy.asarray(x), jax.numpy.asarray(labels),
                                       alpha=jax.numpy.asarray(alpha))
  return np.asarray(rows, np.float32), np.asarray(aug_labels, np.int32)


def positive_layout(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each row's positives in row order, padded (to P = largest class - 1) with row 0.

  Written independently of recall_jax (NumPy) but with the same (B, P) layout.
  Returns pos_idx (B, P) int64, pos_valid (B, P) bool, num_positives (B,) int64.
  """
  b = labels.shape[0]
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  p = int(counts.max()) - 1
  pos_idx = np.zeros((b, p), np.int64)
  pos_valid = np.zeros((b, p), bool)
  members = [[] for _ in counts]
  for row, c in enumerate(inverse):
    members[c].append(row)
  for rows in members:
    for q in rows:
      others = [r for r in rows if r != q]
      pos_idx[q, :len(others)] = others
      pos_valid[q, :len(others)] = True
  return pos_idx, pos_valid, counts[inverse] - 1


# ----------------------------------------------------------------------------- PyTorch


def torch_recall_at_k(emb, pos_idx, pos_valid, num_positives, *, k_values=K_VALUES, tau1=TAU1,
                      tau2=TAU2, query_block: int | None = None):
  """RS@k in PyTorch, count_query_in_rank=True, the same formula as recall_jax.

  Args:
    emb: (B, D) float32 tensor (requires_grad for the backward).
    pos_idx: (B, P) int64 positive row indices (padding slots point at row 0).
    pos_valid: (B, P) bool, False on padding slots.
    num_positives: (B,) int64 |P_q|.
    query_block: None (all queries at once) or a block size; blocks are checkpointed.

  Returns:
    Scalar float32 loss: mean over queries with a positive of 1 - mean_k R_qk.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import checkpoint  # pylint: disable=g-import-not-at-top

  sims = emb @ emb.T  # (B, B) float32
  b = sims.shape[0]
  column = torch.arange(b, device=emb.device)

  def block(sim_rows, pidx, pvalid, npos):
    s_pos = torch.gather(sim_rows, 1, pidx)  # (Q, P)
    diff = (sim_rows[:, None, :] - s_pos[:, :, None]) / tau2  # (Q, P, B)
    terms = torch.sigmoid(diff.clamp(-CLIP, CLIP))
    keep = column[None, None, :] != pidx[:, :, None]
    rank = 1.0 + torch.where(keep, terms, 0.0).sum(-1)  # (Q, P)
    recalls = []
    for k in k_values:
      hit = torch.sigmoid(((k - rank) / tau1).clamp(-CLIP, CLIP))
      hits = torch.where(pvalid, hit, 0.0).sum(-1)
      denom = torch.clamp(torch.clamp(npos, max=k), min=1).to(rank.dtype)
      recalls.append(torch.clamp(hits, max=k) / denom)
    return 1.0 - torch.stack(recalls, 0).mean(0)  # (Q,)

  if query_block is None or query_block >= b:
    per_query = block(sims, pos_idx, pos_valid, num_positives)
  else:
    per_query = torch.cat([
        checkpoint.checkpoint(block, sims[s:s + query_block], pos_idx[s:s + query_block],
                              pos_valid[s:s + query_block], num_positives[s:s + query_block],
                              use_reentrant=False)
        for s in range(0, b, query_block)])
  has_positive = num_positives > 0
  return torch.where(has_positive, per_query, 0.0).sum() / has_positive.sum().clamp(min=1)


def torch_block_that_fits(b: int, p: int, max_gib: float) -> int | None:
  """None if ~6 live (B, P, B) float32 tensors fit in max_gib, else the largest power-of-2 block."""
  def need(q):
    return 6 * q * p * b * 4 / GIB
  if need(b) <= max_gib:
    return None
  q = 1 << 14
  while q > 16 and need(q) > max_gib:
    q //= 2
  return q


def bench_torch(x: np.ndarray, labels: np.ndarray, repeats: int, max_gib: float,
                threads: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  pos_idx, pos_valid, num_pos = positive_layout(labels)
  block = torch_block_that_fits(len(labels), pos_idx.shape[1], max_gib)
  emb = torch.tensor(x, device=device, requires_grad=True)
  pidx = torch.tensor(pos_idx, device=device)
  pvalid = torch.tensor(pos_valid, device=device)
  npos = torch.tensor(num_pos, device=device)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def step():
    emb.grad = None
    loss = torch_recall_at_k(emb, pidx, pvalid, npos, query_block=block)
    loss.backward()
    return loss

  loss = step()  # warm-up
  sync()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times, cpus = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    sync()
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
  if device == "cuda":  # give the cached blocks back before the next JAX subprocess starts
    del emb, pidx, pvalid, npos
    torch.cuda.empty_cache()
  return dict(impl="torch", device=device, block=block, threads=threads, loss=float(loss.item()),
              min_s=min(times), median_s=statistics.median(times),
              cpu_s=statistics.median(cpus), peak_gib=peak, planned_gib=None)


# ----------------------------------------------------------------------------- JAX


def bench_jax(size: str, query_block: int | None, args) -> dict:
  """One JAX case in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from recall_jax.losses import recall_at_k_surrogate  # pylint: disable=g-import-not-at-top

  real, use_simix = parse_size(size)
  x_np, labels_np = make_batch(real, use_simix, args.dim, args.per_class)
  p = int(np.unique(labels_np, return_counts=True)[1].max()) - 1
  x, labels = jax.device_put(x_np), jax.device_put(labels_np)

  # "none" means one block of all rows; the loss itself would pick a block from its budget.
  block = len(labels_np) if query_block is None else query_block
  fn = jax.jit(jax.value_and_grad(
      lambda e, y: recall_at_k_surrogate(e, y, max_positives=p, query_block=block)))
  t0 = time.perf_counter()
  compiled = fn.lower(x, labels).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  planned = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / GIB
  out = dict(impl="jax", size=size, rows=len(labels_np), positives=p, block=query_block,
             device=jax.devices()[0].device_kind, backend=jax.default_backend(),
             compile_s=compile_s, planned_gib=planned)
  if planned > args.max_gib:
    out["skipped"] = f"planned {planned:.2f} GiB > --max-gib {args.max_gib}"
    return out
  loss, _ = jax.block_until_ready(compiled(x, labels))  # warm-up
  times, cpus = [], []
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(x, labels))
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  stats = jax.devices()[0].memory_stats()
  peak = stats.get("peak_bytes_in_use") / GIB if stats and "peak_bytes_in_use" in stats else None
  out.update(loss=float(loss), min_s=min(times), median_s=statistics.median(times),
             cpu_s=statistics.median(cpus), peak_gib=peak)
  return out


def _jax_subprocess(size: str, block: str, argv: list[str], timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", f"{size}:{block}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_ENV)
  except subprocess.TimeoutExpired:
    return dict(impl="jax", size=size, block=block, error=f"timed out after {timeout:.0f} s")
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(impl="jax", size=size, block=block,
              error=f"exit {proc.returncode}: " + " | ".join(tail)[-300:])


def _parse_block(token: str) -> int | None:
  return None if token.strip().lower() in ("none", "0", "") else int(token)


def _ms(s: float | None) -> str:
  return "      -" if s is None else f"{1e3 * s:9.1f}"


def _gib(g: float | None) -> str:
  return "   n/a" if g is None else f"{g:6.3f}"


def _row(r: dict) -> str:
  name = f"{r['impl']:5s} block={str(r.get('block')):5s}"
  if "threads" in r:
    name += f" threads={r['threads']}"
  if "error" in r:
    return f"  {name}  FAILED: {r['error']}"
  if "skipped" in r:
    return f"  {name}  not run: {r['skipped']}"
  return (f"  {name}  min {_ms(r['min_s'])} ms  median {_ms(r['median_s'])} ms"
          f"  cpu {_ms(r['cpu_s'])} ms  peak {_gib(r['peak_gib'])} GiB"
          f"  planned {_gib(r['planned_gib'])} GiB  loss {r['loss']:.7f}")


def run(args, argv: list[str]) -> dict:
  """All cases; prints a table and returns a JSON-able summary."""
  print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)
  torch_ok = False
  if not args.no_torch:
    torch_ok = importlib.util.find_spec("torch") is not None
    if not torch_ok:
      print("torch: not installed; JAX only")
  blocks = args.query_block.split(",")
  results = []
  for size in args.sizes.split(","):
    real, use_simix = parse_size(size)
    jax_runs = [_jax_subprocess(size, b, argv, args.case_timeout) for b in blocks]
    ran = [r for r in jax_runs if "min_s" in r]
    header = next((r for r in jax_runs if "rows" in r), {})
    print(f"B={header.get('rows', '?')} ({size}), D={args.dim}, P={header.get('positives', '?')}, "
          f"{header.get('device', '?')} ({header.get('backend', '?')}):", flush=True)
    for r in jax_runs:
      print(_row(r), flush=True)
    best = min(ran, key=lambda r: r["min_s"]) if ran else None
    entry = dict(size=size, rows=header.get("rows"), positives=header.get("positives"),
                 device=header.get("device"), backend=header.get("backend"), jax=jax_runs,
                 best_jax=best)
    if torch_ok:
      x, labels = make_batch(real, use_simix, args.dim, args.per_class)
      try:
        t = bench_torch(x, labels, args.repeats, args.max_gib, args.torch_threads)
      except Exception as e:  # e.g. out of memory: report, go on with the next size.
        t = dict(impl="torch", block=None, error=f"{type(e).__name__}: {str(e)[:200]}")
      print(_row(t), flush=True)
      entry["torch"] = t
      if best is not None and "min_s" in t:
        rel = abs(best["loss"] - t["loss"]) / abs(t["loss"])
        ratio = best["min_s"] / t["min_s"]
        entry.update(loss_rel_diff=rel, jax_over_torch=ratio)
        print(f"  -> fastest JAX block={best['block']}: JAX/PyTorch time = {ratio:.2f} (min), "
              f"{best['median_s'] / t['median_s']:.2f} (median); "
              f"loss relative difference {rel:.2e}", flush=True)
    results.append(entry)
  print(f"load average at end: {os.getloadavg()}", flush=True)
  return dict(load_average_end=os.getloadavg(), results=results)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1000,4000,4000+simix",
                      help="comma list: N (N real rows) or N+simix (N real rows + SiMix rows)")
  parser.add_argument("--dim", type=int, default=D_DEFAULT)
  parser.add_argument("--per-class", type=int, default=4, help="real rows per class (m)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up")
  parser.add_argument("--query-block", default="none,256,1024",
                      help="comma list of JAX query_block settings to try ('none' = one block)")
  parser.add_argument("--max-gib", type=float, default=8.0,
                      help="skip JAX settings planning more memory; block PyTorch to fit it")
  parser.add_argument("--case-timeout", type=float, default=900.0,
                      help="seconds before a JAX case's subprocess is abandoned")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads (default: all cores, as XLA uses)")
  parser.add_argument("--json", help="also write the summary to this JSON file")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: 'size:block' in this process
  return parser


def main(argv: list[str] | None = None) -> dict | None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.one:
    size, block = args.one.rsplit(":", 1)
    print(json.dumps(bench_jax(size, _parse_block(block), args)))
    return None
  # This process only builds data (and runs PyTorch): keep JAX off the accelerator here so
  # that it neither takes GPU memory from PyTorch nor pollutes the subprocesses' peaks.
  # (Subprocesses get the original environment; `--one` ignores `--json`.)
  os.environ["JAX_PLATFORMS"] = "cpu"
  summary = run(args, argv)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()
