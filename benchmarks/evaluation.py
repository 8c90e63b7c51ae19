"""Benchmark: SOP-size exact retrieval evaluation (60,502 x 512, recall@1/10/100/1000) vs faiss.

Embeddings are random but clustered like SOP's test split (classes of 2-12 images around random
centres), L2-normalised. Times, on whatever JAX backend is default:
  * `retrieval_metrics` (all metrics: recall@k, precision@1, R-precision, MAP@R, MAP), first call,
    compilation included, then `--repeat` warm calls; `--path` picks the symmetric (tiles computed
    once) or the query-block path, default what `retrieval_metrics` picks itself;
  * optionally `knn(k=1000, exclude_self=True)`, the like-for-like counterpart of faiss;
  * faiss-cpu `IndexFlatIP` build + search of k=1001 (self included) when faiss is installed.

Usage: python benchmarks/evaluation.py [--num 60502] [--dim 512] [--k 1000] [--no-knn] [--no-faiss]
                                      [--path auto|symmetric|query-blocks] [--repeat 0]
"""

import argparse
import time

import jax
import numpy as np

from recall_jax.evaluation import knn, retrieval_metrics

_PATHS = {"auto": None, "symmetric": True, "query-blocks": False}


def clustered_embeddings(num: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(num, dim) float32 unit vectors in classes of 2-12, and (num,) int64 labels."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(2, 13, num // 2 + 1)
  labels = np.repeat(np.arange(sizes.size), sizes)[:num]
  centres = rng.standard_normal((labels.max() + 1, dim)).astype(np.float32)
  x = centres[labels] + 2.0 * rng.standard_normal((num, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x, labels.astype(np.int64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=60502)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--k", type=int, default=1000, help="largest recall@k cut-off")
  parser.add_argument("--block", type=int, default=1024)
  parser.add_argument("--path", choices=tuple(_PATHS), default="auto",
                      help="retrieval_metrics path (auto: its own choice)")
  parser.add_argument("--repeat", type=int, default=0, help="warm calls timed after the first")
  parser.add_argument("--no-knn", action="store_true", help="skip timing knn alone")
  parser.add_argument("--no-faiss", action="store_true", help="skip faiss")
  args = parser.parse_args()

  x, labels = clustered_embeddings(args.num, args.dim)
  k_values = tuple(k for k in (1, 10, 100, 1000) if k < args.k) + (args.k,)
  print(f"data: {args.num} x {args.dim}, {labels.max() + 1} classes, k_values={k_values}, "
        f"backend={jax.default_backend()} ({jax.device_count()} x {jax.devices()[0].device_kind})")

  symmetric = _PATHS[args.path]
  start, cpu = time.perf_counter(), time.process_time()
  metrics = retrieval_metrics(x, labels, k_values=k_values, block=args.block, symmetric=symmetric)
  print(f"recall_jax retrieval_metrics ({args.path} path): "
        f"{time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU (incl. compile)")
  for _ in range(args.repeat):
    start, cpu = time.perf_counter(), time.process_time()
    retrieval_metrics(x, labels, k_values=k_values, block=args.block, symmetric=symmetric)
    print(f"recall_jax retrieval_metrics warm: {time.perf_counter() - start:.2f} s wall, "
          f"{time.process_time() - cpu:.1f} s CPU")
  print("  " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in metrics.items()))

  ours_knn = None
  if not args.no_knn:
    start, cpu = time.perf_counter(), time.process_time()
    _, ours_knn = knn(x, x, args.k, exclude_self=True, block=args.block)
    print(f"recall_jax knn(k={args.k}, exclude_self): {time.perf_counter() - start:.1f} s wall, "
          f"{time.process_time() - cpu:.1f} s CPU (incl. compile)")

  if not args.no_faiss:
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("faiss: not installed, skipped")
      return
    start, cpu = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatIP(args.dim)
    index.add(x)
    _, neighbours = index.search(x, args.k + 1)
    print(f"faiss IndexFlatIP search(k={args.k + 1}) ({faiss.omp_get_max_threads()} threads): "
          f"{time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    # Drop self, then recall@k from faiss's lists as a cross-check of ours.
    rows = np.arange(args.num)[:, None]
    neighbours = np.array([n[n != i][:args.k] for i, n in zip(rows[:, 0], neighbours)])
    hit = labels[neighbours] == labels[:, None]
    has_positive = np.bincount(labels)[labels] > 1
    faiss_recall = {k: hit[has_positive, :k].any(axis=1).mean() for k in k_values}
    print("  faiss recall: " + ", ".join(f"recall@{k}={v:.4f}" for k, v in faiss_recall.items()))
    if ours_knn is not None:
      agree = np.mean(ours_knn[:, :10] == neighbours[:, :10])
      print(f"  top-10 neighbour agreement with recall_jax knn: {agree:.6f}")


if __name__ == "__main__":
  main()
