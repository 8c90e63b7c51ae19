"""Does RS@k fail to start on Omniglot without head centring, and does a warm-up loss fix it?

Every run is the project's own training program (`recall_jax.train.trainer.train_and_evaluate`)
on the demo config (`configs/omniglot.py`: small CNN from scratch, 4 quarter-turns per character
as classes, Adam at 3e-3 with 20 warm-up steps) for the same small number of steps, changed only
where a variant says:

  a. centring off, RS@k from step 0;
  b. centring off, a warm-up loss (`--warmup_loss`, default multi-similarity) for the first
     `--warmup_steps`, then RS@k;
  c. centring on (the demo's setting), RS@k from step 0.
  d. (with `--no_turns`) as a, without the turned classes.

Each run logs the cold-start checks of the trainer (median rank of the positives and RS@k's
gradient norm with respect to the embeddings, at the first RS@k step and at steps 10, 50, 100)
and whether it printed its warning. Models are compared on a VALIDATION split carved from the 30
background alphabets: `--val_alphabets` of them (every sixth, sorted by name: 5 alphabets, 158
characters, 3,160 images) are held out of training and evaluated leave-one-out (Recall@1, every
image querying the others). The 20 evaluation alphabets are never used.

The split needs no trainer option: the script writes a folder with an `images_background.zip`
holding the training alphabets and an `images_evaluation.zip` holding the validation alphabets
(members renamed under `images_evaluation/`, bytes copied), and points `config.data.path` at it.

  python benchmarks/cold_start_omniglot.py                      # demo model: 5-10 min, 2 CPU cores
  python benchmarks/cold_start_omniglot.py --model small_cnn --optimizer sgd --lr 0.05  # ~3 min
  python benchmarks/cold_start_omniglot.py --steps 20 --batch_size 200   # a quick look

Data: `$RECALL_JAX_DATA/omniglot/images_background.zip`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "omniglot.py"
sys.path.insert(0, str(REPO))  # this checkout's recall_jax, not another installed copy
sys.path.insert(0, str(REPO / "benchmarks"))

from omniglot_folders import validation_folder  # noqa: E402


def load_demo_config():
  spec = importlib.util.spec_from_file_location("omniglot_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def make_config(args, data_path: pathlib.Path, *, center: bool, warmup: bool, turns: bool):
  c = load_demo_config()
  c.data.path = str(data_path)
  c.data.download = False
  c.model.center_head_init = center
  c.model.name = args.model
  c.data.rotated_classes = 4 if turns else 1
  if warmup:
    c.loss.warmup_name = args.warmup_loss
    c.loss.warmup_steps = args.warmup_steps
  c.batch_size = args.batch_size
  c.chunk_size = 125 if args.batch_size % 125 == 0 else args.batch_size // 4
  c.max_steps = args.steps
  c.epochs = 10**6  # bounded by max_steps
  c.optimizer.milestones = ()
  c.optimizer.warmup_steps = args.lr_warmup
  if args.optimizer:
    c.optimizer.name = args.optimizer
  if args.lr:
    c.optimizer.learning_rate = args.lr
  c.eval_every_epochs = 10**6  # evaluate once, after the last step
  c.checkpoint_every_steps = 10**9
  c.num_grid_queries = 0
  c.log_every_steps = 1
  c.seed = args.seed
  return c


def run_variant(c) -> dict:
  from recall_jax.train import trainer  # pylint: disable=import-outside-toplevel

  workdir = pathlib.Path(tempfile.mkdtemp(prefix="cold_start_"))
  tick = time.perf_counter()
  try:
    results = trainer.train_and_evaluate(c, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  checks = [r for r in rows if r["kind"] == "cold_start"]
  train = [r for r in rows if r["kind"] == "train"]
  return {
      "seconds": time.perf_counter() - tick,
      "checks": [{k: r[k] for k in ("step", "median_positive_rank", "rsk_gradient_norm",
                                    "cannot_learn")} for r in checks],
      "warned": any(r["cannot_learn"] for r in checks),
      "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
      "loss_every_5_steps": [round(r["loss"], 4) for r in train[::5]],
      "last_rsk_loss": next((r["loss"] for r in reversed(train)
                             if r["loss_name"] == "recall_at_k"), None),
      "val_recall@1": float(results["test/recall@1"]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  # 51: the trainer's check before update 50 runs.
  parser.add_argument("--steps", type=int, default=51)
  parser.add_argument("--lr_warmup", type=int, default=20,
                      help="linear learning-rate warm-up steps (the demo's 20; 0: Adam's full "
                      "step size from the first update)")
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--warmup_loss", default="multi_similarity")
  parser.add_argument("--warmup_steps", type=int, default=20)
  parser.add_argument("--every", type=int, default=6, help="hold out every N-th alphabet")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--optimizer", default=None, help="adam (the demo's), adamw or sgd")
  parser.add_argument("--lr", type=float, default=None, help="default: the demo's 3e-3")
  parser.add_argument("--model", default="small_cnn_flat",
                      help="the demo's small_cnn_flat, or small_cnn (average pooling)")
  parser.add_argument("--no_turns", action="store_true", help="also run d (no turned classes)")
  parser.add_argument("--variants", default="abc", help="which of a, b, c, d to run")
  parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
  args = parser.parse_args()

  from recall_jax.data import paths  # pylint: disable=import-outside-toplevel

  background = paths.data_root() / "omniglot" / "images_background.zip"
  if not background.is_file():
    sys.exit(f"{background} not found: set RECALL_JAX_DATA to the folder holding omniglot/")
  folder, held_out = validation_folder(background, args.every,
                                       paths.default_cache_dir() / "benchmarks")
  print(f"validation alphabets ({len(held_out)}): {', '.join(held_out)}")
  variants = {
      "a": ("centring off, RS@k", dict(center=False, warmup=False, turns=True)),
      "b": (f"centring off, {args.warmup_loss} for {args.warmup_steps} steps, then RS@k",
            dict(center=False, warmup=True, turns=True)),
      "c": ("centring on, RS@k", dict(center=True, warmup=False, turns=True)),
      "d": ("centring off, RS@k, no turned classes", dict(center=False, warmup=False,
                                                          turns=False)),
  }
  chosen = args.variants + ("d" if args.no_turns and "d" not in args.variants else "")
  results = {}
  for key in chosen:
    name, kwargs = variants[key]
    print(f"\n== {key}. {name}", flush=True)
    results[key] = {"name": name, **run_variant(make_config(args, folder, **kwargs))}
    print(json.dumps(results[key]), flush=True)

  print(f"\n{args.model}, {args.optimizer or 'adam'} at {args.lr or 3e-3:g}, {args.steps} steps "
        f"of B = {args.batch_size}, learning-rate warm-up "
        f"{args.lr_warmup} steps, seed {args.seed}; validation: "
        f"{len(held_out)} held-out background alphabets\n")
  print("| run | checks: step (median positive rank, RS@k grad norm) | warned | last RS@k loss "
        "| val R@1 | s |")
  print("|---|---|---|---|---|---|")
  for key, r in results.items():
    checks = "; ".join(f"{c['step']} ({c['median_positive_rank']:.0f}, "
                       f"{c['rsk_gradient_norm']:.1e})" for c in r["checks"])
    last = "-" if r["last_rsk_loss"] is None else f"{r['last_rsk_loss']:.3f}"
    print(f"| {key}. {r['name']} | {checks} | {'yes' if r['warned'] else 'no'} | {last} | "
          f"{r['val_recall@1']:.3f} | {r['seconds']:.0f} |")
  if args.json:
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                     "validation_alphabets": held_out, "runs": results},
                                    indent=1) + "\n")


if __name__ == "__main__":
  main()
