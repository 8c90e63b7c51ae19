"""benchmarks/study_omniglot.py expresses the memory and proxy set-ups (checked, not run)."""

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
      "memory: recall_at_k|B=1024|simix=0|classes=1|seed=0: 6 steps of 1024, chunks of 256, "
      "memory 0",
      "memory: recall_at_k|B=128|M=1024|simix=0|classes=1|seed=0: 48 steps of 128, chunks of "
      "128, memory 1024",
      "memory: smooth_ap|B=1024|simix=0|classes=1|seed=0: 6 steps of 1024, chunks of 256, "
      "memory 0",
      "memory: smooth_ap|B=128|M=1024|simix=0|classes=1|seed=0: 48 steps of 128, chunks of 128, "
      "memory 1024"]  # same images seen: 6 x 1,024 = 48 x 128


def test_proxy_study_covers_every_batch_size(study):
  runs = study.plan(["proxies"], seeds=3)["proxies"]
  assert {(r.loss, r.batch_size) for r in runs} == {
      (loss, b) for loss in ("proxy_anchor", "normalized_softmax") for b in study.BATCH_SIZES}
  assert len(runs) == 2 * len(study.BATCH_SIZES) * 3
  c = study.make_config(runs[0], 6144, None, None)
  assert c.loss.name == "proxy_anchor" and c.loss.memory_size == 0


def test_a_run_the_trainer_would_refuse_is_refused_by_the_dry_run(study):
  bad = study.RunSpec("proxy_anchor", 128, False, 1.0, 0, memory_size=1024)
  with pytest.raises(errors.ConfigError, match="takes no cross-batch memory"):
    study.dry_run({"proxies": [bad]}, 6144, None)
