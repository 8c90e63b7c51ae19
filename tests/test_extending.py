"""docs/architecture.md's examples, run as written: a new loss and a new dataset, 2 steps."""

import math
import pathlib
import re
import sys
import types

import numpy as np
import PIL.Image
import pytest

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax import ranges
from recall_jax.data import parsing
from recall_jax.data import registry as data_registry
from recall_jax.data.registry import DatasetSpec
from recall_jax.losses import registry as loss_registry
from recall_jax.losses.registry import LossSpec, Option
from recall_jax.train import reporting
from recall_jax.train import trainer

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _code_blocks() -> list[str]:
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) == 4, "the page shows: loss module, loss entry, parser, dataset entry"
  return blocks


def _entry(block: str, **names) -> tuple[str, object]:
  """The (name, spec) of a registry entry as the page writes it (a `Spec(...),` line)."""
  (spec,) = eval("(" + block + ")", dict(names))  # noqa: S307 (the page's own code)
  return spec.name, spec


@pytest.fixture
def registered(monkeypatch):
  """The page's loss and dataset, registered for this test only: {'loss': spec, 'dataset': spec}."""
  loss_module, loss_entry, parser_code, dataset_entry = _code_blocks()
  module = types.ModuleType("recall_jax.losses.centroid")
  exec(compile(loss_module, f"{DOC}:centroid", "exec"), module.__dict__)  # noqa: S102
  monkeypatch.setitem(sys.modules, module.__name__, module)
  name, loss_spec = _entry(loss_entry, LossSpec=LossSpec, Option=Option, ranges=ranges)
  monkeypatch.setitem(loss_registry.LOSSES, name, loss_spec)
  parser_namespace = {}
  exec(compile(parser_code, f"{DOC}:parse_tsv", "exec"), parser_namespace)  # noqa: S102
  monkeypatch.setattr(parsing, "parse_tsv", parser_namespace["parse_tsv"], raising=False)
  name, dataset_spec = _entry(dataset_entry, DatasetSpec=DatasetSpec)
  monkeypatch.setitem(data_registry.DATASETS, name, dataset_spec)
  return {"loss": loss_spec, "dataset": dataset_spec}


def _write_tsv_dataset(folder: pathlib.Path, classes: dict[str, int], per_class: int) -> None:
  """`labels.tsv` over random 40 x 40 RGB PNGs: `per_class` images of each class of each split."""
  rng = np.random.default_rng(0)
  lines = []
  for split, count in classes.items():
    for c in range(count):
      for i in range(per_class):
        path = f"images/{split}_{c}_{i}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(folder / path)
        lines.append(f"{split}\t{split}_class{c}\t{path}")
  (folder / "labels.tsv").write_text("\n".join(lines) + "\n")


def _config(tmp_path: pathlib.Path):
  c = config_lib.base_config()
  c.data.name, c.data.root = "tsv", str(tmp_path)
  c.data.image_size = c.data.resize_size = 32
  c.data.eval_batch_size = 16
  c.model.name, c.model.embedding_dim = "small_cnn", 16
  c.loss.name = "centroid"
  c.batch_size, c.samples_per_class, c.chunk_size = 16, 4, 8
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.milestones = "adam", 1e-3, ()
  c.epochs, c.max_steps, c.eval_every_epochs = 1, 2, 1
  c.checkpoint_every_steps, c.log_every_steps, c.num_grid_queries = 2, 1, 0
  return c


def test_the_pages_loss_and_dataset_are_checked_and_train(registered, tmp_path):
  folder = tmp_path / registered["dataset"].folder
  _write_tsv_dataset(folder, {"train": 8, "test": 4}, per_class=4)
  plans = parsing.parse_tsv(folder)
  assert sorted(plans) == ["test", "train"]
  assert plans["train"].class_names == [f"train_class{c}" for c in range(8)]
  np.testing.assert_array_equal([r.label for r in plans["test"].records], np.repeat(range(4), 4))

  c = _config(tmp_path)
  assert dict(c.loss.centroid) == {"scale": 10.0}  # base_config's section, from the spec.
  assert config_lib.eval_k_values(c) == (1, 2, 4)
  c.loss.centroid.scale = 0.0
  with pytest.raises(errors.ConfigError, match="loss.centroid.scale must be a finite number > 0"):
    config_lib.validate(c)
  c.loss.centroid.scale = 10.0
  config_lib.validate(c)

  results = trainer.train_and_evaluate(c, tmp_path / "run")
  rows = [r for r in reporting.read_metrics(tmp_path / "run" / "metrics.jsonl")
          if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
  assert 0.0 <= results["test/recall@1"] <= results["test/recall@4"] <= 1.0
  assert "test/recall@8" not in results


def test_the_pages_parser_reports_a_malformed_line(registered, tmp_path):
  del registered
  (tmp_path / "labels.tsv").write_text("train\tonly two fields\n")
  with pytest.raises(errors.DataError, match=r"labels.tsv:1: expected `split<TAB>class<TAB>path`"):
    parsing.parse_tsv(tmp_path)
