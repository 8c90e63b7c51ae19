"""Do the paper's claims hold on Omniglot? Losses, batch size and SiMix, 3 seeds each.

Every run is the project's own training program (`recall_jax.train.trainer.train_and_evaluate`)
on the demo config (`configs/omniglot.py`: its small CNN from scratch with the centred head, its
optimizer and data settings, m = 4 images per class), trained on the 964 characters of the 30
background alphabets and evaluated (Recall@1/2/4/8, every image querying the others) on the 20
held-out alphabets. Within the whole study every run sees the same number of training images
(`--images`), so a larger batch takes fewer steps. The learning rate warms up linearly over the
first quarter of a run's steps (the demo's 20 warm-up steps, as a fraction, so that every batch size
gets the same share) and then stays constant (no milestone decay: the runs are shorter than the
demo's first epoch milestone).

Studies (`--only` picks one; without it, the first three):
  losses: RS@k vs Smooth-AP vs contrastive vs multi-similarity at B = 1,024 (the demo's 1,000
          rounded onto the batch-size grid, so that run is shared with `batch`).
  batch:  RS@k at B = 64, 256, 1,024 and 3,072. A batch of 4,096 with m = 4
          needs 1,024 classes per batch and Omniglot has 964; 3,072 (768 classes) is the largest
          multiple of 1,024 that fits, and keeps the images seen identical across sizes.
  simix:  RS@k with and without SiMix at B = 256, on all 964 training characters and on 10% of
          them (96 characters, 1,920 images, drawn per seed). B = 256 because a 10% batch can hold
          at most 96 x 4 = 384 images; the full-data run without SiMix is shared with `batch`.
  memory: the mega-batch against its cheap rival, a cross-batch memory: RS@k and Smooth-AP with
          an exact batch of B = 1,024, and with a batch of B / 8 = 128 ranked against itself plus
          a memory of the last 1,024 embeddings (`loss.memory_size`; the same images seen).
  proxies: Proxy-Anchor and normalized softmax (learned proxies, their own learning rate
          `loss.param_learning_rate`, default 100 x the network's) at every batch size of
          `batch`, to find where each does best.

The 10% subset needs no trainer option: the script writes an `images_background.zip` holding
only the chosen characters (the original members, bytes copied) next to a link to the official
`images_evaluation.zip`, and points `config.data.path` at that folder; the evaluation split is
the same 13,180 images in the same order.

Outputs (in `--out-dir`, default `benchmarks/results/`): `study_omniglot.md` (the table, also
printed), `study_omniglot.png` (R@1 vs batch size) and `study_omniglot.json` (every run's metrics,
seconds and settings). Runs already in that JSON with the same settings are reused, so an
interrupted study continues where it stopped; delete the JSON (or pass `--fresh`) to redo them.

  python benchmarks/study_omniglot.py --quick           # 5.5 min on 2 CPU cores: 1 seed
  python benchmarks/study_omniglot.py                   # 36 min: 3 seeds, all 13,180 test images
  python benchmarks/study_omniglot.py --only batch --seeds 2
  python benchmarks/study_omniglot.py --only memory --dry-run   # the runs' configs, checked

Data: `$RECALL_JAX_DATA/omniglot/images_{background,evaluation}.zip` (downloaded there when
missing, as for the demo).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "omniglot.py"

LOSSES = ("recall_at_k", "smooth_ap", "contrastive", "multi_similarity")
PROXY_LOSSES = ("proxy_anchor", "normalized_softmax")
MEMORY_LOSSES = ("recall_at_k", "smooth_ap")
LOSS_LABELS = {"recall_at_k": "RS@k", "smooth_ap": "Smooth-AP", "contrastive": "Contrastive",
               "multi_similarity": "Multi-similarity", "proxy_anchor": "Proxy-Anchor",
               "normalized_softmax": "Normalized softmax"}
STUDIES = ("losses", "batch", "simix", "memory", "proxies")
DEFAULT_STUDIES = ("losses", "batch", "simix")  # memory and proxies: with --only
DEMO_BATCH = 1024
BATCH_SIZES = (64, 256, 1024, 3072)
SIMIX_BATCH = 256
MEMORY_BATCH = DEMO_BATCH // 8  # with a memory of DEMO_BATCH: 1/8 of the batch, same images
SMALL_FRACTION = 0.1
MAX_CHUNK = 256  # images embedded at once: bounds activation memory at the large batch sizes
K_VALUES = (1, 2, 4, 8)
# Both sizes are multiples of every batch size above, so each run sees exactly `images` images.
MODES = {
    "quick": {"images": 6144, "seeds": 1, "max_eval_images": 2000},
    "full": {"images": 18432, "seeds": 3, "max_eval_images": None},
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the study."""

  loss: str
  batch_size: int
  simix: bool
  class_fraction: float
  seed: int
  memory_size: int = 0  # cross-batch memory rows (`loss.memory_size`); 0: none

  @property
  def key(self) -> str:
    memory = f"|M={self.memory_size}" if self.memory_size else ""
    return (f"{self.loss}|B={self.batch_size}{memory}|simix={int(self.simix)}|"
            f"classes={self.class_fraction:g}|seed={self.seed}")


def plan(studies: list[str], seeds: int) -> dict[str, list[RunSpec]]:
  """The runs of each study (runs shared between studies appear in both)."""
  runs: dict[str, list[RunSpec]] = {}
  seed_list = range(seeds)
  if "losses" in studies:
    runs["losses"] = [RunSpec(l, DEMO_BATCH, False, 1.0, s) for l in LOSSES for s in seed_list]
  if "batch" in studies:
    runs["batch"] = [RunSpec("recall_at_k", b, False, 1.0, s) for b in BATCH_SIZES
                     for s in seed_list]
  if "simix" in studies:
    runs["simix"] = [RunSpec("recall_at_k", SIMIX_BATCH, x, f, s) for f in (1.0, SMALL_FRACTION)
                     for x in (False, True) for s in seed_list]
  if "memory" in studies:
    runs["memory"] = [run for l in MEMORY_LOSSES for run in (
        *(RunSpec(l, DEMO_BATCH, False, 1.0, s) for s in seed_list),
        *(RunSpec(l, MEMORY_BATCH, False, 1.0, s, memory_size=DEMO_BATCH) for s in seed_list))]
  if "proxies" in studies:
    runs["proxies"] = [RunSpec(l, b, False, 1.0, s) for l in PROXY_LOSSES for b in BATCH_SIZES
                       for s in seed_list]
  return runs


def load_demo_config():
  spec = importlib.util.spec_from_file_location("omniglot_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def class_subset_folder(data_folder: pathlib.Path, fraction: float, seed: int,
                        cache: pathlib.Path) -> pathlib.Path:
  """A folder with Omniglot's archives where the background one keeps `fraction` of the characters.

  Args:
    data_folder: the folder holding the official `images_background.zip` / `images_evaluation.zip`.
    fraction: share of the 964 background characters kept (rounded to a whole number, >= 1).
    seed: which characters (numpy `default_rng(seed)` permutation of the sorted character names).
    cache: parent folder of the subset folders (written once, reused afterwards).

  Returns:
    The subset folder, usable as `config.data.path` for the `omniglot` dataset.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  folder = cache / f"omniglot_classes{fraction:g}_seed{seed}"
  background = folder / "images_background.zip"
  if background.is_file():
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  source = data_folder / "images_background.zip"
  if not source.is_file():
    raise FileNotFoundError(f"{source} not found: run the demo once (it downloads the archives) or "
                            "set RECALL_JAX_DATA to the folder holding omniglot/")
  with zipfile.ZipFile(source) as z:
    infos = [i for i in z.infolist() if i.filename.lower().endswith(".png")]
    # images_background/<Alphabet>/character<NN>/<file>.png -> <Alphabet>/character<NN>
    character = lambda info: "/".join(info.filename.split("/")[1:3])
    characters = sorted({character(i) for i in infos})
    keep_count = max(1, round(fraction * len(characters)))
    order = np.random.default_rng(seed).permutation(len(characters))
    keep = {characters[i] for i in order[:keep_count]}
    partial = background.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w") as out:
      for info in infos:
        if character(info) in keep:
          out.writestr(info, z.read(info))
  partial.rename(background)  # only complete archives are ever reused
  link = folder / "images_evaluation.zip"
  if not link.exists():
    link.symlink_to((data_folder / "images_evaluation.zip").resolve())
  return folder


def make_config(run: RunSpec, images: int, max_eval_images: int | None,
                data_path: str | None):
  """The demo config changed only where the study needs it."""
  c = load_demo_config()
  c.seed = run.seed
  c.loss.name = run.loss
  c.batch_size = run.batch_size
  c.chunk_size = math.gcd(run.batch_size, MAX_CHUNK)
  c.simix = run.simix
  c.loss.memory_size = run.memory_size
  steps = images // run.batch_size
  c.max_steps = steps
  c.epochs = 10**6  # the run is bounded by max_steps
  c.optimizer.warmup_steps = max(1, math.ceil(steps / 4))
  c.optimizer.milestones = ()
  c.eval_every_epochs = 10**6  # evaluate once, after the last step
  c.checkpoint_every_steps = 10**9
  c.num_grid_queries = 0
  c.log_every_steps = max(1, steps // 4)
  c.data.max_eval_images = max_eval_images
  if data_path is not None:
    c.data.path = data_path
    c.data.download = False
  return c


def train_one(run: RunSpec, images: int, max_eval_images: int | None,
              subset_cache: pathlib.Path) -> dict[str, Any]:
  """Trains and evaluates one run in a fresh working folder; returns its record."""
  from recall_jax.data import paths
  from recall_jax.train import trainer

  data_path = None
  if run.class_fraction < 1:
    data_folder = paths.data_root() / "omniglot"
    data_path = str(class_subset_folder(data_folder, run.class_fraction, run.seed, subset_cache))
  c = make_config(run, images, max_eval_images, data_path)
  workdir = tempfile.mkdtemp(prefix="study_omniglot_")
  tick = time.perf_counter()
  try:
    results = trainer.train_and_evaluate(c, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  seconds = time.perf_counter() - tick
  if not results:
    raise RuntimeError(f"run {run.key} stopped before evaluating")
  return {**dataclasses.asdict(run), "key": run.key, "steps": c.max_steps,
          "images_seen": c.max_steps * run.batch_size, "seconds": seconds,
          "metrics": {k: float(v) for k, v in results.items()}}


def raw_pixel_baseline(max_eval_images: int | None) -> dict[str, float]:
  """Recall@k of the L2-normalised raw pixels on the same evaluation images (no training)."""
  import jax.numpy as jnp
  from recall_jax import data, evaluation
  from recall_jax.train import experiment

  c = load_demo_config()
  c.data.max_eval_images = max_eval_images
  source = experiment.make_source(c, "test", max_images=c.data.max_eval_images)
  batches = data.make_eval_loader(source, image_size=c.data.image_size,
                                  resize_size=c.data.resize_size,
                                  batch_size=c.data.eval_batch_size, channels=c.data.channels)
  flat = lambda images: jnp.reshape(images, (images.shape[0], -1)).astype(jnp.float32)
  embeddings, labels, _ = evaluation.extract_embeddings(flat, batches, progress=False)
  metrics = evaluation.retrieval_metrics(embeddings, labels, k_values=K_VALUES)
  return {f"test/recall@{k}": float(metrics[f"recall@{k}"]) for k in K_VALUES} | {
      "num_queries": int(len(labels))}


# ----------------------------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def setting_label(study: str, run: RunSpec) -> str:
  if study in ("losses", "proxies"):
    return f"{LOSS_LABELS[run.loss]}, B = {run.batch_size:,}"
  if study == "memory":
    memory = f" + memory {run.memory_size:,}" if run.memory_size else " (exact mega-batch)"
    return f"{LOSS_LABELS[run.loss]}, B = {run.batch_size:,}{memory}"
  if study == "batch":
    return f"RS@k, B = {run.batch_size:,}"
  classes = "all 964 classes" if run.class_fraction == 1 else f"{run.class_fraction:.0%} of classes"
  return f"RS@k {'+ SiMix' if run.simix else 'no SiMix'}, {classes}, B = {run.batch_size}"


def grouped(runs: list[RunSpec], records: dict[str, dict]) -> list[tuple[RunSpec, list[dict]]]:
  """Runs grouped over seeds, in plan order: (the seed-0 spec, the records of every seed)."""
  groups: dict[tuple, tuple[RunSpec, list[dict]]] = {}
  for run in runs:
    key = (run.loss, run.batch_size, run.simix, run.class_fraction, run.memory_size)
    groups.setdefault(key, (run, []))[1].append(records[run.key])
  return list(groups.values())


def markdown_table(runs_by_study: dict[str, list[RunSpec]], records: dict[str, dict],
                   baseline: dict[str, float], header: str) -> str:
  titles = {"losses": "1. Losses", "batch": "2. Batch size", "simix": "3. SiMix",
            "memory": "4. Mega-batch vs memory", "proxies": "5. Proxy losses"}
  lines = [header, "",
           "| study | setting | steps | seeds | R@1 | R@2 | R@4 | R@8 | s/run |",
           "|---|---|---:|---:|---|---|---|---|---:|"]
  for study, runs in runs_by_study.items():
    for run, recs in grouped(runs, records):
      cells = [mean_std([r["metrics"][f"test/recall@{k}"] for r in recs]) for k in K_VALUES]
      seconds = statistics.mean(r["seconds"] for r in recs)
      lines.append(f"| {titles[study]} | {setting_label(study, run)} | {recs[0]['steps']} | "
                   f"{len(recs)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
  cells = [f"{baseline[f'test/recall@{k}']:.3f}" for k in K_VALUES]
  lines.append("| reference | raw pixels (no training) | 0 | - | " + " | ".join(cells) + " | - |")
  return "\n".join(lines) + "\n"


def plot(runs_by_study: dict[str, list[RunSpec]], records: dict[str, dict],
         baseline: dict[str, float], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  r1 = lambda recs: [r["metrics"]["test/recall@1"] for r in recs]
  err = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
  if "batch" in runs_by_study:
    pts = [(run.batch_size, r1(recs)) for run, recs in grouped(runs_by_study["batch"], records)]
    ax.errorbar([b for b, _ in pts], [statistics.mean(v) for _, v in pts],
                yerr=[err(v) for _, v in pts], marker="o", capsize=3, label="RS@k")
  if "losses" in runs_by_study:
    markers = {"smooth_ap": "s", "contrastive": "^", "multi_similarity": "D", "recall_at_k": "o"}
    for run, recs in grouped(runs_by_study["losses"], records):
      if run.loss == "recall_at_k" and "batch" in runs_by_study:
        continue  # already on the RS@k line
      v = r1(recs)
      ax.errorbar([run.batch_size], [statistics.mean(v)], yerr=[err(v)], marker=markers[run.loss],
                  linestyle="none", capsize=3, label=LOSS_LABELS[run.loss])
  if "simix" in runs_by_study:
    for run, recs in grouped(runs_by_study["simix"], records):
      if run.simix and run.class_fraction == 1:
        v = r1(recs)
        ax.errorbar([run.batch_size], [statistics.mean(v)], yerr=[err(v)], marker="*",
                    markersize=10, linestyle="none", capsize=3, label="RS@k + SiMix")
  ax.axhline(baseline["test/recall@1"], color="grey", linestyle=":", label="raw pixels")
  ax.set_xscale("log", base=2)
  ax.set_xticks(BATCH_SIZES, [f"{b:,}" for b in BATCH_SIZES])
  ax.set_xlabel("batch size B (images per step; same images seen by every run)")
  ax.set_ylabel("Recall@1, held-out alphabets")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"smaller study: {MODES['quick']['images']} images per run, 1 seed, the "
                 f"first {MODES['quick']['max_eval_images']} evaluation images")
  p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; quick 1)")
  p.add_argument("--images", type=int, default=None,
                 help="training images seen by every run (a multiple of every batch size)")
  p.add_argument("--only", choices=STUDIES, default=None)
  p.add_argument("--dry-run", action="store_true",
                 help="list the runs and check each one's config; train nothing")
  p.add_argument("--out-dir", type=pathlib.Path, default=REPO / "benchmarks" / "results")
  p.add_argument("--fresh", action="store_true", help="ignore runs stored in the JSON")
  args = p.parse_args(argv)
  mode = MODES["quick" if args.quick else "full"]
  args.seeds = mode["seeds"] if args.seeds is None else args.seeds
  args.images = mode["images"] if args.images is None else args.images
  args.max_eval_images = mode["max_eval_images"]
  if args.seeds < 1:
    p.error("--seeds must be at least 1")
  sizes = (*BATCH_SIZES, MEMORY_BATCH)
  bad = [b for b in sizes if args.images % b]
  if args.images <= 0 or bad:
    p.error(f"--images {args.images} must be a positive multiple of every batch size "
            f"{sizes} (not of {bad})")
  return args


def dry_run(runs_by_study: dict[str, list[RunSpec]], images: int,
            max_eval_images: int | None) -> list[str]:
  """One line per run of the plan, each run's config checked as the trainer checks it.

  Raises:
    ConfigError: a run's config is invalid.
  """
  from recall_jax import config as config_lib
  lines = []
  for study, runs in runs_by_study.items():
    for run in runs:
      c = make_config(run, images, max_eval_images, None)
      config_lib.validate(c)
      lines.append(f"{study}: {run.key}: {c.max_steps} steps of {c.batch_size}, chunks of "
                   f"{c.chunk_size}, memory {c.loss.memory_size}")
  return lines


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.dry_run:
    studies = [args.only] if args.only else list(DEFAULT_STUDIES)
    print("\n".join(dry_run(plan(studies, args.seeds), args.images, args.max_eval_images)))
    return
  import jax
  from recall_jax.data import paths

  # Seeds of one setting share shapes: the persistent cache compiles each setting once.
  jax.config.update("jax_compilation_cache_dir", str(paths.default_cache_dir() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  studies = [args.only] if args.only else list(DEFAULT_STUDIES)
  runs_by_study = plan(studies, args.seeds)
  demo = load_demo_config()
  # Stored runs are reused only if the demo config they ran with is unchanged.
  digest = hashlib.sha256(demo.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
  settings = {"images": args.images, "max_eval_images": args.max_eval_images,
              "config": str(CONFIG_FILE.relative_to(REPO)), "config_digest": digest}
  args.out_dir.mkdir(parents=True, exist_ok=True)
  json_path = args.out_dir / "study_omniglot.json"
  stored: dict[str, Any] = {}
  if json_path.is_file() and not args.fresh:
    stored = json.loads(json_path.read_text())
  records: dict[str, dict] = {}
  if stored.get("settings") == settings:
    records = {r["key"]: r for r in stored.get("runs", [])}

  unique = list(dict.fromkeys(run for runs in runs_by_study.values() for run in runs))
  todo = [run for run in unique if run.key not in records]
  print(f"study: {len(unique)} runs ({len(unique) - len(todo)} stored), {args.images:,} images "
        f"each, evaluation on {args.max_eval_images or 'all 13,180'} images", flush=True)
  start = time.perf_counter()

  def save(baseline=None):
    json_path.write_text(json.dumps({"settings": settings, "baseline": baseline,
                                     "runs": list(records.values())}, indent=1))

  for i, run in enumerate(todo, 1):
    print(f"[{i}/{len(todo)}] {run.key} ...", flush=True)
    records[run.key] = train_one(run, args.images, args.max_eval_images,
                                 paths.default_cache_dir() / "study_subsets")
    m = records[run.key]["metrics"]
    print(f"[{i}/{len(todo)}] {run.key}: R@1 {m['test/recall@1']:.3f} in "
          f"{records[run.key]['seconds']:.0f} s (total {time.perf_counter() - start:.0f} s)",
          flush=True)
    save(stored.get("baseline") if stored.get("settings") == settings else None)

  baseline = raw_pixel_baseline(args.max_eval_images)
  save(baseline)
  evaluated = args.max_eval_images or "all 13,180"
  header = (f"Omniglot study ({'quick' if args.quick else 'full'}): {args.images:,} training "
            f"images per run, {args.seeds} seed(s) (mean ± std over seeds), evaluation on "
            f"{evaluated} images of the 20 held-out alphabets; {demo.model.name} from scratch, "
            f"{demo.optimizer.name} lr {demo.optimizer.learning_rate:g} with warm-up over the "
            f"first quarter of the steps, training classes at {demo.data.rotated_classes} "
            f"quarter-turn(s), "
            f"m = {demo.samples_per_class}; machine: "
            f"{os.cpu_count()}-core CPU ({jax.devices()[0].platform}); total "
            f"{sum(r['seconds'] for r in records.values()):.0f} s of training+evaluation.")
  table = markdown_table(runs_by_study, records, baseline, header)
  print(table)
  (args.out_dir / "study_omniglot.md").write_text(table)
  plot(runs_by_study, records, baseline, args.out_dir / "study_omniglot.png",
       f"Omniglot, {args.images:,} images per run, {args.seeds} seed(s), eval on {evaluated}")
  print(f"wrote {args.out_dir / 'study_omniglot.md'}, .png and .json")


if __name__ == "__main__":
  main(sys.argv[1:])
