"""benchmarks/study_omniglot.py: the memory and proxy set-ups (checked, not run) and how the
validated studies choose what meets the test alphabets."""

import importlib.util
import pathlib
import sys

import pytest

from recall_jax import errors

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "study_omniglot.py"


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location("study_omniglot", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up while being built
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_memory_study_is_the_mega_batch_against_an_eighth_plus_a_memory(study, capsys):
  study.main(["--dry-run", "--quick", "--only", "memory"])
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
      "memory: recall_at_k|B=1024|simix=0|classes=1|seed=0|val: 6 steps of 1024, chunks of 256, "
      "memory 0",
      "memory: recall_at_k|B=128|M=1024|simix=0|classes=1|seed=0|val: 48 steps of 128, chunks of "
      "128, memory 1024",
      "memory: smooth_ap|B=1024|simix=0|classes=1|seed=0|val: 6 steps of 1024, chunks of 256, "
      "memory 0",
      "memory: smooth_ap|B=128|M=1024|simix=0|classes=1|seed=0|val: 48 steps of 128, chunks of "
      "128, memory 1024"]  # same images seen: 6 x 1,024 = 48 x 128


def test_proxy_study_probes_the_rate_then_sweeps_every_batch_size(study):
  runs = study.plan(["proxies"], seeds=3)["proxies"]
  probe = study.proxy_lr_probe()
  assert runs[:len(probe)] == probe
  assert {(r.loss, r.learning_rate, r.param_lr_factor, r.batch_size, r.seed) for r in probe} == {
      (loss, lr, f, study.PROXY_PROBE_BATCH, 0) for loss in study.PROXY_LOSSES
      for lr in study.PROXY_LEARNING_RATES for f in study.PROXY_LR_FACTORS}
  assert {r.split for r in runs} == {"validation"}
  rates = {"proxy_anchor": (3e-4, 10.0), "normalized_softmax": (1e-3, 100.0)}
  sweep = study.proxy_sweep(rates, sweep_seeds=1)
  assert {(r.loss, r.batch_size, r.learning_rate, r.param_lr_factor) for r in sweep} == {
      (loss, b, *rates[loss]) for loss in study.PROXY_LOSSES for b in study.BATCH_SIZES}
  assert len(sweep) == 2 * len(study.BATCH_SIZES) and {r.seed for r in sweep} == {0}
  c = study.make_config(sweep[0], 6144, None, None)
  assert c.loss.name == "proxy_anchor" and c.loss.memory_size == 0
  assert c.optimizer.learning_rate == 3e-4
  assert c.loss.param_learning_rate == pytest.approx(10 * 3e-4)
  default = study.make_config(runs[-1], 6144, None, None)
  assert default.loss.param_learning_rate is None and default.optimizer.learning_rate == 3e-3


def test_a_run_the_trainer_would_refuse_is_refused_by_the_dry_run(study):
  bad = study.RunSpec("proxy_anchor", 128, False, 1.0, 0, memory_size=1024)
  with pytest.raises(errors.ConfigError, match="takes no cross-batch memory"):
    study.dry_run({"proxies": [bad]}, 6144, None)


def _records(study, runs, val_r1):
  return {r.key: {"key": r.key, "metrics": {"val/recall@1": val_r1(r)}} for r in runs}


def test_the_rate_and_batch_size_chosen_on_validation_alone_meet_the_test(study):
  runs = study.plan(["memory"], seeds=3)
  probe = study.proxy_lr_probe()
  # Proxy-Anchor best at 3e-4 with proxies at 10 x, normalized softmax at 1e-4 and 100 x.
  best = {("proxy_anchor", 3e-4, 10.0): 0.6, ("normalized_softmax", 1e-4, 100.0): 0.5}
  records = _records(study, runs["memory"] + probe,
                     lambda r: best.get((r.loss, r.learning_rate, r.param_lr_factor), 0.3))
  rates = study.best_rates(probe, records)
  assert rates == {"proxy_anchor": (3e-4, 10.0), "normalized_softmax": (1e-4, 100.0)}
  sweep = study.proxy_sweep(rates, sweep_seeds=1)
  # Proxy-Anchor best at 256, normalized softmax tied between 64 and 1,024 (the smaller wins).
  scores = {("proxy_anchor", 256): 0.7, ("normalized_softmax", 64): 0.6,
            ("normalized_softmax", 1024): 0.6}
  score = lambda r: scores.get((r.loss, r.batch_size), 0.5 - r.batch_size / 1e5)
  records |= _records(study, [r for r in sweep if r.key not in records], score)
  chosen = study.best_batch_sizes(sweep, records)
  assert chosen == {"proxy_anchor": 256, "normalized_softmax": 64}
  completion = study.proxy_completion(chosen, seeds=3, rates=rates)
  assert sorted((r.loss, r.batch_size, r.seed, r.learning_rate, r.param_lr_factor)
                for r in completion) == sorted(
      (loss, b, s, *rates[loss]) for loss, b in chosen.items() for s in range(3))
  records |= _records(study, [r for r in completion if r.key not in records], score)
  runs["proxies"] = list(dict.fromkeys(probe + sweep + completion))
  tested = study.tested_runs(runs, records)
  # No other rates, no other batch size.
  assert set(tested) == set(runs["memory"]) | set(completion)


def test_validated_and_test_studies_are_run_apart(study, capsys):
  with pytest.raises(SystemExit):
    study.parse_args(["--only", "batch,memory"])
  assert "run them apart" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    study.parse_args(["--only", "memory,nope"])
  assert study.parse_args(["--only", "memory,proxies"]).stem == "study_omniglot_validated"
  assert study.parse_args([]).stem == "study_omniglot"
