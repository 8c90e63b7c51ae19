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
  proxies: Proxy-Anchor and normalized softmax (learned proxies), in three stages on validation:
          the learning rates at B = 256 (the network's, PROXY_LEARNING_RATES, and the proxies'
          as a multiple of it, PROXY_LR_FACTORS), then every batch size of `batch` with the
          chosen rates (`--sweep-seeds` seeds), then the best batch size completed to `--seeds`.

memory and proxies are VALIDATED studies (run them apart: `--only memory,proxies`): they train
on 25 of the 30 background alphabets and compare settings on the other 5 (every sixth by name,
as `cold_start_omniglot.py` does); once every validation run is done, the settings they compare
(for the proxy losses, the rates and batch size chosen on validation) score their final
checkpoints once on the 20 test alphabets. Files: `study_omniglot_validated.{md,json}`.

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
  python benchmarks/study_omniglot.py --only memory,proxies     # the validated studies
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
from typing import Any


REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "omniglot.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from omniglot_folders import class_subset_folder, validation_folder  # noqa: E402

LOSSES = ("recall_at_k", "smooth_ap", "contrastive", "multi_similarity")
PROXY_LOSSES = ("proxy_anchor", "normalized_softmax")
MEMORY_LOSSES = ("recall_at_k", "smooth_ap")
LOSS_LABELS = {"recall_at_k": "RS@k", "smooth_ap": "Smooth-AP", "contrastive": "Contrastive",
               "multi_similarity": "Multi-similarity", "proxy_anchor": "Proxy-Anchor",
               "normalized_softmax": "Normalized softmax"}
STUDIES = ("losses", "batch", "simix", "memory", "proxies")
DEFAULT_STUDIES = ("losses", "batch", "simix")  # memory and proxies: with --only
# Studies whose settings are compared on a validation split of the background alphabets; only the
# settings they compare (and, for proxies, the batch size chosen on validation) meet the test
# alphabets, once, after every validation run.
VALIDATED_STUDIES = ("memory", "proxies")
VALIDATION_EVERY = 6  # hold out every 6th background alphabet: 5 of 30, 158 characters
# The proxy losses' learning rates, chosen first, on validation at PROXY_PROBE_BATCH: the
# network's (the demo's 3e-3 suits RS@k from scratch; the Proxy-Anchor paper fine-tunes a
# pretrained network with AdamW at 1e-4) and the proxies' own, as a multiple of it
# (`loss.param_learning_rate`; the config's default is the paper's 100 x). The batch size is then
# swept with the chosen pair.
PROXY_LEARNING_RATES = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
PROXY_LR_FACTORS = (100.0, 10.0)
PROXY_PROBE_BATCH = 256
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
  # "test": trained on the 30 background alphabets, evaluated on the 20 evaluation ones;
  # "validation": trained on 25 background alphabets, evaluated on the other 5, checkpoint kept
  # for one evaluation on the test alphabets if its setting is chosen.
  split: str = "test"
  # The loss's own parameters' learning rate, as a multiple of the network's; None: the
  # config's default.
  param_lr_factor: float | None = None
  learning_rate: float | None = None  # the network's (`optimizer.learning_rate`); None: the demo's

  @property
  def key(self) -> str:
    memory = f"|M={self.memory_size}" if self.memory_size else ""
    split = "|val" if self.split == "validation" else ""
    factor = "" if self.param_lr_factor is None else f"|plr={self.param_lr_factor:g}x"
    rate = "" if self.learning_rate is None else f"|lr={self.learning_rate:g}"
    return (f"{self.loss}|B={self.batch_size}{memory}|simix={int(self.simix)}|"
            f"classes={self.class_fraction:g}|seed={self.seed}{rate}{factor}{split}")


def plan(studies: list[str], seeds: int, sweep_seeds: int | None = None
         ) -> dict[str, list[RunSpec]]:
  """The runs of each study (runs shared between studies appear in both).

  Args:
    studies: names from STUDIES.
    seeds: seeds of every setting that is reported.
    sweep_seeds: seeds of each batch size of the proxy losses' sweep (default `seeds`); the
      batch size chosen on validation is completed to `seeds` by `proxy_completion`.
  """
  runs: dict[str, list[RunSpec]] = {}
  seed_list = range(seeds)
  sweep_list = range(seeds if sweep_seeds is None else min(sweep_seeds, seeds))
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
        *(RunSpec(l, DEMO_BATCH, False, 1.0, s, split="validation") for s in seed_list),
        *(RunSpec(l, MEMORY_BATCH, False, 1.0, s, memory_size=DEMO_BATCH, split="validation")
          for s in seed_list))]
  if "proxies" in studies:
    # Stage 1 (`proxy_lr_probe`); stages 2 and 3 depend on what it finds (`proxy_sweep`,
    # `proxy_completion`). Listed here at the default rate, for the dry run.
    runs["proxies"] = proxy_lr_probe() + [
        RunSpec(l, b, False, 1.0, s, split="validation") for l in PROXY_LOSSES
        for b in BATCH_SIZES for s in sweep_list]
  return runs


Rates = tuple[float, float]  # (the network's learning rate, the proxies' factor)


def proxy_lr_probe() -> list[RunSpec]:
  """Stage 1 of the proxy study: each proxy loss at PROXY_PROBE_BATCH, seed 0, at every pair of
  PROXY_LEARNING_RATES x PROXY_LR_FACTORS (on validation)."""
  return [RunSpec(l, PROXY_PROBE_BATCH, False, 1.0, 0, split="validation", param_lr_factor=f,
                  learning_rate=lr)
          for l in PROXY_LOSSES for lr in PROXY_LEARNING_RATES for f in PROXY_LR_FACTORS]


def best_rates(probe: list[RunSpec], records: dict[str, dict]) -> dict[str, Rates]:
  """Each proxy loss's (learning rate, factor) with the highest validation R@1 (the first listed
  on a tie)."""
  best: dict[str, tuple[float, Rates]] = {}
  for run in probe:
    score = records[run.key]["metrics"]["val/recall@1"]
    if run.loss not in best or score > best[run.loss][0]:
      best[run.loss] = (score, (run.learning_rate, run.param_lr_factor))
  return {loss: rates for loss, (_, rates) in best.items()}


def proxy_sweep(rates: dict[str, Rates], sweep_seeds: int) -> list[RunSpec]:
  """Stage 2: every batch size of BATCH_SIZES with each loss's chosen rates (validation)."""
  return [RunSpec(l, b, False, 1.0, s, split="validation", learning_rate=rates[l][0],
                  param_lr_factor=rates[l][1])
          for l in PROXY_LOSSES for b in BATCH_SIZES for s in range(sweep_seeds)]


def val_r1(records: list[dict]) -> float:
  return statistics.mean(r["metrics"]["val/recall@1"] for r in records)


def best_batch_sizes(proxy_runs: list[RunSpec], records: dict[str, dict]) -> dict[str, int]:
  """Each proxy loss's batch size with the highest mean validation R@1 (the smaller on a tie),
  among `proxy_runs` (one rate per loss: the sweep's)."""
  best: dict[str, tuple[float, int]] = {}
  for run, recs in grouped(proxy_runs, records):
    score = (val_r1(recs), -run.batch_size)
    if run.loss not in best or score > best[run.loss]:
      best[run.loss] = score
  return {loss: -negative for loss, (_, negative) in best.items()}


def proxy_completion(chosen: dict[str, int], seeds: int,
                     rates: dict[str, Rates] | None = None) -> list[RunSpec]:
  """Stage 3: the runs that bring each proxy loss's chosen batch size (at its chosen rates, if
  given) to `seeds` seeds."""
  rates = rates or {}
  return [RunSpec(loss, batch, False, 1.0, s, split="validation",
                  learning_rate=rates.get(loss, (None, None))[0],
                  param_lr_factor=rates.get(loss, (None, None))[1])
          for loss, batch in chosen.items() for s in range(seeds)]


def tested_runs(runs_by_study: dict[str, list[RunSpec]], records: dict[str, dict]
                ) -> list[RunSpec]:
  """The validated runs that meet the test alphabets: every memory-study run, and each proxy
  loss's runs at its batch size chosen on validation."""
  tested = list(runs_by_study.get("memory", []))
  if "proxies" in runs_by_study:
    rates = best_rates([r for r in runs_by_study["proxies"] if r in proxy_lr_probe()], records)
    sweep = [r for r in runs_by_study["proxies"]
             if (r.learning_rate, r.param_lr_factor) == rates.get(r.loss)]
    chosen = best_batch_sizes(sweep, records)
    tested += [r for r in sweep if chosen[r.loss] == r.batch_size]
  return list(dict.fromkeys(tested))


def load_demo_config():
  spec = importlib.util.spec_from_file_location("omniglot_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


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
  if run.learning_rate is not None:
    c.optimizer.learning_rate = run.learning_rate
  if run.param_lr_factor is not None:
    c.loss.param_learning_rate = run.param_lr_factor * c.optimizer.learning_rate
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
              cache: pathlib.Path) -> dict[str, Any]:
  """Trains and evaluates one run; returns its record.

  Test-split runs train in a temporary folder. Validation runs keep theirs (under `cache`, named
  by the run's key) so that `test_one` can later score the final checkpoint on the test
  alphabets; their metrics are stored as `val/...`.
  """
  from recall_jax.data import paths
  from recall_jax.train import trainer

  data_folder = paths.data_root() / "omniglot"
  data_path = None
  if run.split == "validation":
    folder, _ = validation_folder(data_folder / "images_background.zip", VALIDATION_EVERY, cache)
    data_path = str(folder)
  elif run.class_fraction < 1:
    data_path = str(class_subset_folder(data_folder, run.class_fraction, run.seed,
                                        cache / "study_subsets"))
  c = make_config(run, images, max_eval_images, data_path)
  if run.split == "validation":
    workdir = cache / "study_runs" / run.key.replace("|", "_").replace("=", "")
    shutil.rmtree(workdir, ignore_errors=True)  # an interrupted attempt: start it again
  else:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="study_omniglot_"))
  tick = time.perf_counter()
  try:
    results = trainer.train_and_evaluate(c, workdir)
  finally:
    if run.split != "validation":
      shutil.rmtree(workdir, ignore_errors=True)
  seconds = time.perf_counter() - tick
  if not results:
    raise RuntimeError(f"run {run.key} stopped before evaluating")
  metrics = {k: float(v) for k, v in results.items()}
  if run.split == "validation":  # the trainer names the evaluated split "test"
    metrics = {k.replace("test/", "val/", 1): v for k, v in metrics.items()}
  return {**dataclasses.asdict(run), "key": run.key, "steps": c.max_steps,
          "images_seen": c.max_steps * run.batch_size, "seconds": seconds,
          "metrics": metrics, "workdir": str(workdir) if run.split == "validation" else None}


def test_one(run: RunSpec, record: dict[str, Any], images: int, max_eval_images: int | None
             ) -> dict[str, float]:
  """Scores a validation run's final checkpoint on the 20 test alphabets (`--mode eval`)."""
  from recall_jax.train import modes

  c = make_config(run, images, max_eval_images, None)
  metrics = modes.evaluate_checkpoint(c, record["workdir"], "latest")
  return {k: float(v) for k, v in metrics.items()}


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
  if study == "proxies":
    rate = "" if run.learning_rate is None else f", lr {run.learning_rate:g}"
    factor = "" if run.param_lr_factor is None else f", proxies {run.param_lr_factor:g} x"
    return f"{LOSS_LABELS[run.loss]}, B = {run.batch_size:,}{rate}{factor}"
  if study == "losses":
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
    key = (run.loss, run.batch_size, run.simix, run.class_fraction, run.memory_size,
           run.param_lr_factor, run.learning_rate)
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
    if study in VALIDATED_STUDIES:
      continue  # their own table: validated_table
    for run, recs in grouped(runs, records):
      cells = [mean_std([r["metrics"][f"test/recall@{k}"] for r in recs]) for k in K_VALUES]
      seconds = statistics.mean(r["seconds"] for r in recs)
      lines.append(f"| {titles[study]} | {setting_label(study, run)} | {recs[0]['steps']} | "
                   f"{len(recs)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
  cells = [f"{baseline[f'test/recall@{k}']:.3f}" for k in K_VALUES]
  lines.append("| reference | raw pixels (no training) | 0 | - | " + " | ".join(cells) + " | - |")
  return "\n".join(lines) + "\n"


def validated_table(runs_by_study: dict[str, list[RunSpec]], records: dict[str, dict],
                    tested: list[RunSpec], baseline: dict[str, float], header: str) -> str:
  """Validation R@1 of every setting of the validated studies, then the test Recall@k of the
  settings that met the test alphabets ('-' for the others)."""
  titles = {"memory": "Mega-batch vs memory", "proxies": "Proxy losses"}
  tested_keys = {r.key for r in tested}
  lines = [header, "",
           "| study | setting | steps | seeds | val R@1 | test R@1 | test R@2 | test R@4 | "
           "test R@8 | s/run |",
           "|---|---|---:|---:|---|---|---|---|---|---:|"]
  for study, runs in runs_by_study.items():
    if study not in VALIDATED_STUDIES:
      continue
    for run, recs in grouped(runs, records):
      val = mean_std([r["metrics"]["val/recall@1"] for r in recs])
      if all(r["key"] in tested_keys for r in recs):
        test = [mean_std([r["test_metrics"][f"test/recall@{k}"] for r in recs]) for k in K_VALUES]
      else:
        test = ["-"] * len(K_VALUES)
      chosen = " (chosen on val)" if study == "proxies" and test[0] != "-" else ""
      seconds = statistics.mean(r["seconds"] for r in recs)
      lines.append(f"| {titles[study]} | {setting_label(study, run)}{chosen} | {recs[0]['steps']} "
                   f"| {len(recs)} | {val} | " + " | ".join(test) + f" | {seconds:.0f} |")
  cells = [f"{baseline[f'test/recall@{k}']:.3f}" for k in K_VALUES]
  lines.append("| reference | raw pixels (no training) | 0 | - | - | " + " | ".join(cells)
               + " | - |")
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
  p.add_argument("--only", default=None,
                 help=f"comma-separated studies among {', '.join(STUDIES)} (default: "
                 f"{', '.join(DEFAULT_STUDIES)})")
  p.add_argument("--sweep-seeds", type=int, default=1,
                 help="seeds per batch size in the proxy losses' sweep on validation (the "
                 "chosen batch size is then completed to --seeds)")
  p.add_argument("--dry-run", action="store_true",
                 help="list the runs and check each one's config; train nothing")
  p.add_argument("--out-dir", type=pathlib.Path, default=REPO / "benchmarks" / "results")
  p.add_argument("--fresh", action="store_true", help="ignore runs stored in the JSON")
  args = p.parse_args(argv)
  mode = MODES["quick" if args.quick else "full"]
  args.seeds = mode["seeds"] if args.seeds is None else args.seeds
  args.images = mode["images"] if args.images is None else args.images
  args.max_eval_images = mode["max_eval_images"]
  if args.seeds < 1 or args.sweep_seeds < 1:
    p.error("--seeds and --sweep-seeds must be at least 1")
  args.studies = (list(DEFAULT_STUDIES) if args.only is None
                  else [name.strip() for name in args.only.split(",") if name.strip()])
  unknown = [name for name in args.studies if name not in STUDIES]
  if unknown or not args.studies:
    p.error(f"--only {args.only!r}: choose among {', '.join(STUDIES)}")
  validated = {name in VALIDATED_STUDIES for name in args.studies}
  if len(validated) > 1:
    p.error(f"the validated studies ({', '.join(VALIDATED_STUDIES)}) have their own protocol "
            "and files: run them apart from the others")
  args.stem = "study_omniglot_validated" if validated == {True} else "study_omniglot"
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
    print("\n".join(dry_run(plan(args.studies, args.seeds, args.sweep_seeds), args.images,
                            args.max_eval_images)))
    return
  import jax
  from recall_jax.data import paths

  # Seeds of one setting share shapes: the persistent cache compiles each setting once.
  jax.config.update("jax_compilation_cache_dir", str(paths.default_cache_dir() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  runs_by_study = plan(args.studies, args.seeds, args.sweep_seeds)
  demo = load_demo_config()
  # Stored runs are reused only if the demo config they ran with is unchanged.
  digest = hashlib.sha256(demo.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
  settings = {"images": args.images, "max_eval_images": args.max_eval_images,
              "config": str(CONFIG_FILE.relative_to(REPO)), "config_digest": digest,
              "validation_every": VALIDATION_EVERY}
  args.out_dir.mkdir(parents=True, exist_ok=True)
  json_path = args.out_dir / f"{args.stem}.json"
  stored: dict[str, Any] = {}
  if json_path.is_file() and not args.fresh:
    stored = json.loads(json_path.read_text())
  records: dict[str, dict] = {}
  if stored.get("settings") == settings:
    records = {r["key"]: r for r in stored.get("runs", [])}
  cache = paths.default_cache_dir() / "benchmarks"
  start = time.perf_counter()

  def save(baseline=None):
    json_path.write_text(json.dumps({"settings": settings, "baseline": baseline,
                                     "runs": list(records.values())}, indent=1))

  def train(runs: list[RunSpec]) -> None:
    unique = list(dict.fromkeys(runs))
    todo = [run for run in unique if run.key not in records]
    print(f"study: {len(unique)} runs ({len(unique) - len(todo)} stored), {args.images:,} images "
          f"each, evaluation on {args.max_eval_images or 'all'} images", flush=True)
    for i, run in enumerate(todo, 1):
      print(f"[{i}/{len(todo)}] {run.key} ...", flush=True)
      records[run.key] = train_one(run, args.images, args.max_eval_images, cache)
      m = records[run.key]["metrics"]
      r1 = m.get("test/recall@1", m.get("val/recall@1"))
      print(f"[{i}/{len(todo)}] {run.key}: R@1 {r1:.3f} ({run.split}) in "
            f"{records[run.key]['seconds']:.0f} s (total {time.perf_counter() - start:.0f} s)",
            flush=True)
      save(stored.get("baseline") if stored.get("settings") == settings else None)

  if "proxies" in runs_by_study:
    # Staged: the proxies' rate, then the batch size at that rate, then the seeds.
    probe = proxy_lr_probe()
    train([run for runs in runs_by_study.values() for run in runs
           if run.split != "validation" or run in probe or run.loss not in PROXY_LOSSES])
    rates = best_rates(probe, records)
    print(f"proxy losses' (learning rate, proxies' factor) chosen on validation: {rates}",
          flush=True)
    sweep = proxy_sweep(rates, min(args.sweep_seeds, args.seeds))
    train(sweep)
    chosen = best_batch_sizes(sweep, records)
    print(f"proxy losses' batch sizes chosen on validation: {chosen}", flush=True)
    completion = proxy_completion(chosen, args.seeds, rates)
    train(completion)
    runs_by_study["proxies"] = list(dict.fromkeys(probe + sweep + completion))
  else:
    train([run for runs in runs_by_study.values() for run in runs])

  # The test alphabets, once, after every validation run: the chosen settings only.
  tested = tested_runs(runs_by_study, records)
  for run in tested:
    if "test_metrics" not in records[run.key]:
      print(f"test alphabets: {run.key}", flush=True)
      records[run.key]["test_metrics"] = test_one(run, records[run.key], args.images,
                                                  args.max_eval_images)
      save(stored.get("baseline") if stored.get("settings") == settings else None)

  baseline = raw_pixel_baseline(args.max_eval_images)
  save(baseline)
  evaluated = args.max_eval_images or "all 13,180"
  budget = (f"{args.images:,} training images per run, {args.seeds} seed(s) (mean ± std over "
            f"seeds); {demo.model.name} from scratch, {demo.optimizer.name} lr "
            f"{demo.optimizer.learning_rate:g} with warm-up over the first quarter of the steps, "
            f"training classes at {demo.data.rotated_classes} quarter-turn(s), "
            f"m = {demo.samples_per_class}; machine: {os.cpu_count()}-core CPU "
            f"({jax.devices()[0].platform}); total "
            f"{sum(r['seconds'] for r in records.values()):.0f} s of training+evaluation.")
  mode = "quick" if args.quick else "full"
  tables = []
  if any(study not in VALIDATED_STUDIES for study in runs_by_study):
    header = (f"Omniglot study ({mode}): evaluation on {evaluated} images of the 20 held-out "
              f"alphabets; {budget}")
    tables.append(markdown_table(runs_by_study, records, baseline, header))
    plot(runs_by_study, records, baseline, args.out_dir / "study_omniglot.png",
         f"Omniglot, {args.images:,} images per run, {args.seeds} seed(s), eval on {evaluated}")
  if any(study in VALIDATED_STUDIES for study in runs_by_study):
    _, held_out = validation_folder(paths.data_root() / "omniglot" / "images_background.zip",
                                    VALIDATION_EVERY, cache)
    header = (f"Omniglot study ({mode}), validated: trained on 25 background alphabets, "
              f"compared on the other {len(held_out)} ({', '.join(held_out)}; all their images), "
              "then the compared settings scored once on "
              f"{evaluated} images of the 20 test alphabets (for the proxy losses: the learning "
              f"rates with the best validation R@1 at B = {PROXY_PROBE_BATCH}, seed 0, then the "
              f"batch size with the best mean validation R@1 over {args.sweep_seeds} seed(s), "
              f"then {args.seeds} seeds of it); {budget}")
    tables.append(validated_table(runs_by_study, records, tested, baseline, header))
  table = "\n".join(tables)
  print(table)
  (args.out_dir / f"{args.stem}.md").write_text(table)
  print(f"wrote {args.out_dir / args.stem}.md and .json")


if __name__ == "__main__":
  main(sys.argv[1:])
