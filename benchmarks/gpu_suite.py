"""All GPU measurements of the project in one call (under 8 minutes), with a pass/fail table.

Run from the repository root on a machine with a GPU (the suite puts the checkout on PYTHONPATH
for its subprocesses, so the project need not be installed, only its dependencies):

  python benchmarks/gpu_suite.py --out gpu_suite.json --log-dir gpu_logs

Tiny plumbing check on a CPU:  python benchmarks/gpu_suite.py --cpu-smoke

Order, each case in its own subprocess (an out-of-memory error or a hang ends only that case;
every case has a time cap and the whole suite a budget, `--budget-s`, default 470 s):
  1. loss        benchmarks/loss.py: RS@k fwd+bwd at B = 1,000 / 4,000 / 4,000+SiMix (10,000
                 rows, P = 9), D = 512, query_block none and 1024, vs the vectorised PyTorch
                 version on the same GPU.
  2. backbones   benchmarks/backbones.py: ViT-B/16 (XLA and cuDNN attention) and ResNet-50 fwd+bwd,
                 bf16, batch 256, 224 px; then timm + PyTorch bf16 autocast for both, when timm
                 imports (separate processes, so JAX's preallocation does not starve PyTorch).
  3. megabatch   benchmarks/megabatch.py (its per-case `--one mode:B` entry point): ViT-B/16 RS@k
                 AdamW step at B = 4,000 and 16,000, plain fwd+bwd at the chunk (500), and
                 B = 65,536 when at least `--big-min-s` seconds remain; the encoder blocks are
                 scanned (the models' default) and rematerialised (`--mb-remat`, default block),
                 each row giving peak GPU memory and images/s.
  4. evaluation  benchmarks/evaluation.py: 60,502 x 512 exact retrieval metrics, k up to 1,000
                 (first call, compilation included, as that script times it).
Optionally (`--bucketed`): benchmarks/bucketed_step.py, ResNet-101 landmark training gradients at
1024 px in aspect buckets vs the square layout (B = 256, chunk 16).
Optionally (`--data-pipeline`), last: benchmarks/data_pipeline.py on the host's CPU cores.

Targets (one H100): loss B = 4,000 <= 5 ms; loss B = 10,000 (P = 9) peak
< 2 GiB with a query block; mega-batch >= 2,600 img/s at B = 4,000 with peak <= 16 GiB, peak
<= 24 GiB at B = 16,000, B = 65,536 runs; ViT-B/16 fwd+bwd >= 3,400 img/s; evaluation <= 2 s.
The table ends with every row's figure, target and PASS / FAIL / info / ERROR / SKIPPED, and is
written with the raw results to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Suite:
  """Runs cases under one time budget and collects table rows."""

  def __init__(self, budget_s: float, env: dict[str, str], log_dir: str):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.env = env
    self.log_dir = log_dir
    self.rows: list[dict] = []
    self.cases: list[dict] = []

  def remaining(self) -> float:
    return self.budget_s - (time.perf_counter() - self.start)

  def run(self, name: str, argv: list[str], cap_s: float) -> dict:
    """Runs `python argv...`; returns dict(ok, rc, seconds, stdout, stderr_tail, timeout)."""
    timeout = min(cap_s, self.remaining())
    if timeout < 5:
      case = dict(name=name, ok=False, skipped="suite time budget spent", stdout="")
      self.cases.append(case)
      print(f"[suite] {name}: skipped (budget spent)", flush=True)
      return case
    print(f"[suite] {name}: {' '.join(argv)}  (cap {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                            timeout=timeout, env=self.env, cwd=os.path.dirname(HERE))
      rc, out, err, timed_out = proc.returncode, proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as e:
      rc, timed_out = None, True
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t0
    with open(os.path.join(self.log_dir, re.sub(r"\W+", "_", name) + ".log"), "w") as f:
      f.write(out + "\n--- stderr ---\n" + err)
    print(out.rstrip(), flush=True)
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    if rc != 0:
      print(f"[suite] {name}: {'timed out' if timed_out else f'exit {rc}'} after "
            f"{seconds:.0f} s; stderr tail: {tail}", flush=True)
    else:
      print(f"[suite] {name}: done in {seconds:.0f} s", flush=True)
    case = dict(name=name, argv=argv, ok=rc == 0, rc=rc, timeout=timed_out, seconds=seconds,
                stdout=out, stderr_tail=tail)
    self.cases.append(case)
    return case

  def row(self, name: str, figure: str, target: str = "-", passed: bool | None = None,
          status: str | None = None) -> None:
    if status is None:
      status = "info" if passed is None else ("PASS" if passed else "FAIL")
    self.rows.append(dict(name=name, figure=figure, target=target, status=status))

  def error_row(self, name: str, case: dict, target: str = "-") -> None:
    if case.get("skipped"):
      self.row(name, "-", target, status="SKIPPED")
    elif case.get("timeout"):
      self.row(name, f"timed out after {case['seconds']:.0f} s", target, status="ERROR")
    else:
      self.row(name, (case.get("stderr_tail") or "no result")[-80:], target, status="ERROR")


def _last_json(text: str) -> dict | None:
  for line in text.splitlines()[::-1]:
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


# ----------------------------------------------------------------------------- stages


def stage_loss(suite: Suite, cfg: dict) -> None:
  out_json = os.path.join(suite.log_dir, "loss.json")
  case = suite.run("loss", [os.path.join(HERE, "loss.py"), "--sizes", cfg["loss_sizes"],
                            "--repeats", str(cfg["loss_repeats"]), "--query-block",
                            cfg["loss_blocks"], "--max-gib", str(cfg["loss_max_gib"]),
                            "--json", out_json], cfg["loss_cap"])
  if not os.path.exists(out_json):
    suite.error_row("loss", case)
    return
  with open(out_json) as f:
    summary = json.load(f)
  for r in summary["results"]:
    name = f"loss B={r['rows']} (P={r['positives']})"
    best = r.get("best_jax")
    if best is None:
      errors = [j.get("error") or j.get("skipped") for j in r["jax"]]
      suite.row(name, f"no JAX setting ran: {errors}"[:80], status="ERROR")
      continue
    ms = 1e3 * best["min_s"]
    figure = f"{ms:.2f} ms fwd+bwd (block={best['block']})"
    if "torch" in r and "min_s" in r["torch"]:
      figure += (f"; PyTorch {1e3 * r['torch']['min_s']:.2f} ms, ratio "
                 f"{r['jax_over_torch']:.2f}, loss rel diff {r['loss_rel_diff']:.1e}")
    if r["rows"] == cfg["loss_timed_rows"]:
      suite.row(name, figure, f"<= {cfg['loss_target_ms']} ms", ms <= cfg["loss_target_ms"])
    else:
      suite.row(name, figure)
    if r["positives"] == 9:  # the SiMix case: the memory target with a query block
      blocked = [j for j in r["jax"] if "min_s" in j and j["block"] is not None]
      peaks = [(j["peak_gib"] if j["peak_gib"] is not None else j["planned_gib"], j["block"])
               for j in blocked]
      if peaks:
        gib, block = min(peaks)
        suite.row(f"loss B={r['rows']} peak memory", f"{gib:.3f} GiB (block={block})",
                  "< 2 GiB", gib < 2.0)


_BACKBONE_LINE = re.compile(r"^(\S+)\s+(.+?)\s+([\d.]+) img/s\s*$")
_BACKBONE_FAIL = re.compile(r"^(\S+)\s+(.+?)\s+failed: (.*)$")


def _backbone_rows(suite: Suite, case: dict, cfg: dict, what: str) -> None:
  found = False
  for line in case.get("stdout", "").splitlines():
    m = _BACKBONE_LINE.match(line)
    f = _BACKBONE_FAIL.match(line)
    if m:
      found = True
      model, label, ips = m.group(1), m.group(2).strip(), float(m.group(3))
      name = f"{model} {label}"
      if model == cfg["vit"] and "timm" not in label:
        suite.row(name, f"{ips:.0f} img/s", f">= {cfg['vit_target']:.0f} img/s",
                  ips >= cfg["vit_target"])
      else:
        suite.row(name, f"{ips:.0f} img/s")
    elif f:
      found = True
      suite.row(f"{f.group(1)} {f.group(2).strip()}", f.group(3)[:80], status="ERROR")
  if not found:
    if "timm: skipped" in case.get("stdout", ""):
      suite.row(what, "timm/torch not importable", status="SKIPPED")
    else:
      suite.error_row(what, case)


def stage_backbones(suite: Suite, cfg: dict) -> None:
  common = ["--batch", str(cfg["bb_batch"]), "--image-size", str(cfg["bb_image_size"]),
            "--steps", str(cfg["bb_steps"]), "--warmup", "1"]
  for model in cfg["bb_models"]:
    case = suite.run(f"backbones {model}", [os.path.join(HERE, "backbones.py"), "--models",
                                            model, "--no-timm", *common], cfg["bb_cap"])
    _backbone_rows(suite, case, cfg, f"{model} jax")
  if not cfg["timm"]:
    return
  for model in cfg["bb_models"]:
    if model not in ("vit_b16", "resnet50"):
      continue
    # PyTorch alone in its process: JAX kept on the CPU there so it holds no GPU memory.
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import backbones; "
            f"ips = backbones.bench_timm({model!r}, {cfg['bb_batch']}, {cfg['bb_image_size']}, "
            f"{cfg['bb_steps']}, 1); "
            f"print(f'{model} timm + torch bf16 autocast {{ips:.1f}} img/s' if ips else '')")
    env = dict(suite.env, JAX_PLATFORMS="cpu")
    saved, suite.env = suite.env, env
    try:
      case = suite.run(f"timm {model}", ["-c", code], cfg["timm_cap"])
    finally:
      suite.env = saved
    _backbone_rows(suite, case, cfg, f"{model} timm")


def stage_megabatch(suite: Suite, cfg: dict) -> None:
  script = os.path.join(HERE, "megabatch.py")
  common = ["--model", cfg["mb_model"], "--image-size", str(cfg["mb_image_size"]),
            "--embedding-dim", str(cfg["mb_embedding_dim"]), "--chunk-size",
            str(cfg["mb_chunk"]), "--steps", str(cfg["mb_steps"]), "--remat", cfg["mb_remat"]]
  results = {}

  def one(mode: str, batch: int, cap: float, steps: int | None = None) -> dict | None:
    argv = list(common)
    if steps is not None:
      argv[argv.index("--steps") + 1] = str(steps)
    # Every mega-batch case leaves the evaluation its reserve.
    case = suite.run(f"megabatch {mode} B={batch}",
                     [script, *argv, "--one", f"{mode}:{batch}"],
                     min(cap, suite.remaining() - cfg["reserve_s"]))
    r = _last_json(case.get("stdout", "")) if case.get("ok") else None
    if r is None:
      suite.error_row(f"megabatch {mode} B={batch}", case)
    results[(mode, batch)] = r
    return r

  def peak(r: dict) -> tuple[float, str]:
    if r.get("peak_gib") is not None:
      return r["peak_gib"], "peak"
    return r["planned_gib"], "planned"

  small, large, huge = cfg["mb_batches"]
  r = one("mega", small, cfg["mb_cap"])
  if r:
    gib, kind = peak(r)
    suite.row(f"megabatch B={small} throughput", f"{r['images_per_s']:.0f} img/s "
              f"(step {r['step_s']:.3f} s, chunk {r['chunk']}, remat {cfg['mb_remat']})",
              f">= {cfg['mb_target_ips']:.0f} img/s", r["images_per_s"] >= cfg["mb_target_ips"])
    suite.row(f"megabatch B={small} memory", f"{gib:.2f} GiB {kind}",
              f"<= {cfg['mb_target_small_gib']} GiB", gib <= cfg["mb_target_small_gib"])
  chunk = max(d for d in range(1, min(small, cfg["mb_chunk"]) + 1) if small % d == 0)
  p = one("plain", chunk, cfg["mb_plain_cap"])
  if p:
    figure = f"{p['images_per_s']:.0f} img/s"
    if r:
      figure += f"; mega/plain = {r['images_per_s'] / p['images_per_s']:.3f} (ceiling ~0.75)"
    suite.row(f"plain fwd+bwd B={chunk}", figure)
  r = one("mega", large, cfg["mb_cap"])
  if r:
    gib, kind = peak(r)
    suite.row(f"megabatch B={large}", f"{r['images_per_s']:.0f} img/s, {gib:.2f} GiB {kind}",
              f"<= {cfg['mb_target_large_gib']} GiB", gib <= cfg["mb_target_large_gib"])
  if huge:
    if suite.remaining() < cfg["big_min_s"] + cfg["reserve_s"]:
      suite.row(f"megabatch B={huge} runs", f"not tried: {suite.remaining():.0f} s left",
                "runs", status="SKIPPED")
      return
    # Leave the evaluation its reserve.
    r = one("mega", huge, suite.remaining(), steps=1)
    if r:
      gib, kind = peak(r)
      suite.row(f"megabatch B={huge} runs", f"{r['images_per_s']:.0f} img/s, {gib:.2f} GiB "
                f"{kind}", "runs", True)


_EVAL_LINE = re.compile(r"retrieval_metrics \((\S+) path\): ([\d.]+) s wall")
_EVAL_WARM = re.compile(r"retrieval_metrics warm: ([\d.]+) s wall")


def stage_evaluation(suite: Suite, cfg: dict) -> None:
  # Both exact paths: which one a GPU should pick by default is what this measures.
  for path in ("symmetric", "query-blocks"):
    case = suite.run(f"evaluation {path}",
                     [os.path.join(HERE, "evaluation.py"), "--num", str(cfg["ev_num"]), "--dim",
                      "512", "--k", str(cfg["ev_k"]), "--no-knn", "--path", path, "--repeat", "2",
                      *([] if cfg["faiss"] and path == "symmetric" else ["--no-faiss"])],
                     cfg["ev_cap"])
    first, warm = _EVAL_LINE.search(case.get("stdout", "")), _EVAL_WARM.findall(
        case.get("stdout", ""))
    if not first:
      suite.error_row(f"evaluation {path}", case, f"<= {cfg['ev_target_s']} s")
      continue
    wall = min(float(w) for w in warm) if warm else float(first.group(2))
    suite.row(f"evaluation {cfg['ev_num']}x512 k<={cfg['ev_k']} ({path})",
              f"{wall:.2f} s warm, {float(first.group(2)):.1f} s first call incl. compile",
              f"<= {cfg['ev_target_s']} s", wall <= cfg["ev_target_s"])
    f = re.search(r"faiss IndexFlatIP .*?: ([\d.]+) s wall", case["stdout"])
    if f:
      suite.row("evaluation faiss IndexFlatIP (CPU)", f"{float(f.group(1)):.1f} s wall")


def stage_bucketed(suite: Suite, cfg: dict) -> None:
  out_json = os.path.join(suite.log_dir, "bucketed_step.json")
  case = suite.run("bucketed", [os.path.join(HERE, "bucketed_step.py"), "--model",
                                cfg["bk_model"], "--image-size", str(cfg["bk_image_size"]),
                                "--batch", str(cfg["bk_batch"]), "--chunk", str(cfg["bk_chunk"]),
                                "--steps", str(cfg["bk_steps"]), "--json", out_json],
                   cfg["bk_cap"])
  if not os.path.exists(out_json):
    suite.error_row("bucketed", case)
    return
  with open(out_json) as f:
    result = json.load(f)
  suite.row("bucketed pixels", f"{result['plan']['pixels_vs_square']} of the square's pixels at "
            f"B = {result['plan']['rows']}")
  for name in ("square", "plan", "own_bucket"):
    step = result["step"][name]
    ratio = f" ({step['time_vs_square']} of square)" if "time_vs_square" in step else ""
    suite.row(f"bucketed {name}", f"{step['median_step_s']} s per step{ratio}")


def stage_data_pipeline(suite: Suite, cfg: dict) -> None:
  case = suite.run("data_pipeline", [os.path.join(HERE, "data_pipeline.py"), "--images", "100",
                                     "--seconds", str(cfg["dp_seconds"])], cfg["dp_cap"])
  lines = [l for l in case.get("stdout", "").splitlines()
           if "train_augment" in l or "workers (cores)" in l]
  if not case.get("ok") or not lines:
    suite.error_row("data_pipeline", case)
    return
  for line in lines[:4]:
    suite.row("data_pipeline", line.strip()[:90])


# ----------------------------------------------------------------------------- main


def config(smoke: bool) -> dict:
  cfg = dict(
      loss_sizes="1000,4000,4000+simix", loss_repeats=20, loss_blocks="none,1024",
      loss_max_gib=60, loss_cap=110, loss_timed_rows=4000, loss_target_ms=5.0,
      bb_models=["vit_b16", "resnet50"], bb_batch=256, bb_image_size=224, bb_steps=10,
      bb_cap=110, timm=True, timm_cap=45, vit="vit_b16", vit_target=3400.0,
      mb_model="vit_b16", mb_image_size=224, mb_embedding_dim=512, mb_chunk=512, mb_steps=2,
      mb_remat="block",
      mb_batches=(4000, 16000, 65536), mb_cap=110, mb_plain_cap=60, mb_target_ips=2600.0,
      mb_target_small_gib=16.0, mb_target_large_gib=24.0, big_min_s=100, reserve_s=50,
      ev_num=60502, ev_k=1000, ev_cap=60, ev_target_s=2.0, faiss=False,
      dp_seconds=5, dp_cap=60, bk_model="resnet101_landmark", bk_image_size=1024,
      bk_batch=256, bk_chunk=16, bk_steps=3, bk_cap=200)
  if smoke:  # Every size shrunk: proves the plumbing on a CPU in a few minutes.
    cfg.update(
        loss_sizes="200,200+simix", loss_repeats=2, loss_blocks="none,64", loss_max_gib=4,
        loss_cap=120, loss_timed_rows=200,
        bb_models=["vit_tiny_test", "resnet_tiny_test"], bb_batch=4, bb_image_size=32,
        bb_steps=1, bb_cap=120, timm=False, vit="vit_tiny_test",
        mb_model="vit_tiny_test", mb_image_size=32, mb_embedding_dim=16, mb_chunk=16,
        mb_steps=1, mb_batches=(64, 128, 256), mb_cap=120, mb_plain_cap=120, big_min_s=30,
        reserve_s=30, ev_num=2000, ev_k=100, ev_cap=120, dp_seconds=1, dp_cap=120,
        bk_model="resnet_tiny_landmark_test", bk_image_size=64, bk_batch=32, bk_chunk=8,
        bk_steps=1, bk_cap=120)
  return cfg


def print_table(rows: list[dict]) -> None:
  widths = [max(len(str(r[c])) for r in rows + [dict(name="name", figure="figure",
                                                      target="target", status="status")])
            for c in ("name", "figure", "target", "status")]
  def line(r):
    return "  ".join(str(r[c]).ljust(w) for c, w in zip(("name", "figure", "target", "status"),
                                                         widths))
  print(line(dict(name="name", figure="figure", target="target", status="status")))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(line(r))


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="write the table and raw results to this JSON file")
  parser.add_argument("--budget-s", type=float, default=470.0, help="whole-suite time budget")
  parser.add_argument("--cpu-smoke", action="store_true",
                      help="tiny sizes on the CPU (JAX_PLATFORMS=cpu): checks the plumbing only")
  parser.add_argument("--skip", default="", help="comma list of stages to skip: loss, backbones, "
                      "megabatch, evaluation")
  parser.add_argument("--no-timm", action="store_true", help="skip the timm/PyTorch backbones")
  parser.add_argument("--no-65536", action="store_true", help="skip the B = 65,536 mega-batch")
  parser.add_argument("--mb-remat", default="block", choices=["none", "block", "dots"],
                      help="remat of the scanned encoder blocks in the mega-batch steps")
  parser.add_argument("--faiss", action="store_true", help="also time faiss in the evaluation")
  parser.add_argument("--bucketed", action="store_true",
                      help="also the aspect-bucket training benchmark (ResNet-101, 1024 px)")
  parser.add_argument("--data-pipeline", action="store_true",
                      help="finally, the data pipeline benchmark on the host CPU")
  parser.add_argument("--log-dir", help="per-case logs (default: a temporary folder)")
  args = parser.parse_args(argv)

  cfg = config(args.cpu_smoke)
  if args.no_timm:
    cfg["timm"] = False
  if args.no_65536:
    cfg["mb_batches"] = cfg["mb_batches"][:2] + (None,)
  cfg["faiss"] = args.faiss
  cfg["mb_remat"] = args.mb_remat
  env = dict(os.environ)
  # The scripts import recall_jax: from the checkout when it is not installed.
  root = os.path.dirname(HERE)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="gpu_suite_")
  os.makedirs(log_dir, exist_ok=True)
  gpu = "none found"
  if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    gpu = q.stdout.strip() or gpu
  print(f"[suite] GPU: {gpu}; host cores: {os.cpu_count()}; budget {args.budget_s:.0f} s; "
        f"logs in {log_dir}", flush=True)

  suite = Suite(args.budget_s, env, log_dir)
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  stages = [("loss", stage_loss), ("backbones", stage_backbones),
            ("megabatch", stage_megabatch), ("evaluation", stage_evaluation)]
  if args.bucketed:
    stages.append(("bucketed", stage_bucketed))
  if args.data_pipeline:
    stages.append(("data_pipeline", stage_data_pipeline))
  for name, fn in stages:
    if name in skip:
      continue
    try:
      fn(suite, cfg)
    except Exception as e:  # a parsing bug must not lose the other stages' rows
      suite.row(name, f"suite error: {type(e).__name__}: {e}"[:90], status="ERROR")

  total = time.perf_counter() - suite.start
  print(f"\n[suite] summary ({gpu}; {total:.0f} s in all"
        f"{'; CPU SMOKE MODE: tiny sizes, figures meaningless' if args.cpu_smoke else ''})")
  print_table(suite.rows)
  result = dict(gpu=gpu, cpu_smoke=args.cpu_smoke, total_s=total, rows=suite.rows,
                cases=[{k: v for k, v in c.items() if k != "stdout"} | dict(
                    stdout_tail=c.get("stdout", "")[-3000:]) for c in suite.cases])
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"[suite] written to {args.out}")
  return result


if __name__ == "__main__":
  main()
