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


def test_proxy_study_covers_every_batch_size(study):
  runs = study.plan(["proxies"], seeds=3)["proxies"]
  assert {(r.loss, r.batch_size) for r in runs} == {
      (loss, b) for loss in ("proxy_anchor", "normalized_softmax") for b in study.BATCH_SIZES}
  assert len(runs) == 2 * len(study.BATCH_SIZES) * 3
  assert {r.split for r in runs} == {"validation"}
  sweep = study.plan(["proxies"], seeds=3, sweep_seeds=1)["proxies"]
  assert len(sweep) == 2 * len(study.BATCH_SIZES) and {r.seed for r in sweep} == {0}
  c = study.make_config(runs[0], 6144, None, None)
  assert c.loss.name == "proxy_anchor" and c.loss.memory_size == 0


def test_a_run_the_trainer_would_refuse_is_refused_by_the_dry_run(study):
  bad = study.RunSpec("proxy_anchor", 128, False, 1.0, 0, memory_size=1024)
  with pytest.raises(errors.ConfigError, match="takes no cross-batch memory"):
    study.dry_run({"proxies": [bad]}, 6144, None)


def _records(study, runs, val_r1):
  return {r.key: {"key": r.key, "metrics": {"val/recall@1": val_r1(r)}} for r in runs}


def test_the_batch_size_chosen_on_validation_is_completed_and_alone_meets_the_test(study):
  runs = study.plan(["memory", "proxies"], seeds=3, sweep_seeds=1)
  # Proxy-Anchor best at 256, normalized softmax tied between 64 and 1,024 (the smaller wins).
  scores = {("proxy_anchor", 256): 0.7, ("normalized_softmax", 64): 0.6,
            ("normalized_softmax", 1024): 0.6}
  records = _records(study, [r for v in runs.values() for r in v],
                     lambda r: scores.get((r.loss, r.batch_size), 0.5 - r.batch_size / 1e5))
  chosen = study.best_batch_sizes(runs["proxies"], records)
  assert chosen == {"proxy_anchor": 256, "normalized_softmax": 64}
  completion = study.proxy_completion(chosen, seeds=3)
  assert sorted((r.loss, r.batch_size, r.seed) for r in completion) == sorted(
      (loss, b, s) for loss, b in chosen.items() for s in range(3))
  runs["proxies"] = list(dict.fromkeys(runs["proxies"] + completion))
  records |= _records(study, completion, lambda r: scores[(r.loss, r.batch_size)])
  tested = study.tested_runs(runs, records)
  assert set(tested) == set(runs["memory"]) | set(completion)  # no other proxy batch size


def test_validated_and_test_studies_are_run_apart(study, capsys):
  with pytest.raises(SystemExit):
    study.parse_args(["--only", "batch,memory"])
  assert "run them apart" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    study.parse_args(["--only", "memory,nope"])
  assert study.parse_args(["--only", "memory,proxies"]).stem == "study_omniglot_validated"
  assert study.parse_args([]).stem == "study_omniglot"
