"""Tests for the config range checks and the resume-compatibility comparison."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import ml_collections
import pytest

from recall_jax import config as config_lib
from recall_jax import config_checks
from recall_jax import errors

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _set(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  node = c
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[last] = value


def _per_loss_layout() -> ml_collections.ConfigDict:
  """The base config with loss options in per-loss sections (`loss.recall_at_k.tau1`)."""
  c = config_lib.base_config()
  flat = {k: c.loss[k] for k in c.loss if k != "name"}
  c.loss = ml_collections.ConfigDict({"name": "recall_at_k"})
  c.loss.recall_at_k = ml_collections.ConfigDict(flat)
  c.loss.smooth_ap = ml_collections.ConfigDict({"temperature": 0.01, "include_query": False,
                                                "query_block": None})
  c.loss.contrastive = ml_collections.ConfigDict({"pos_margin": 0.0, "neg_margin": 0.5})
  c.loss.multi_similarity = ml_collections.ConfigDict(
      {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1})
  c.eval = ml_collections.ConfigDict({"k_values": None, "reid": False})
  return c


def _config_files() -> list[pathlib.Path]:
  return sorted(p for p in (REPO_ROOT / "configs").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_configs_are_in_range(path, arg):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert config_checks.config_problems(module.get_config(arg)) == []


def test_base_configs_in_both_loss_layouts_are_in_range():
  assert config_checks.config_problems(config_lib.base_config()) == []
  assert config_checks.config_problems(_per_loss_layout()) == []
  assert config_checks.config_problems(json.loads(
      config_lib.base_config().to_json_best_effort())) == []


_BAD = [
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be an integer >= 1, got 0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1 (0 would delete"),
    ("keep_checkpoints", -1, "keep_checkpoints must be"),
    ("samples_per_class", 1, "samples_per_class must be an integer >= 2 (with one image"),
    ("max_steps", 0, "max_steps must be None (train for `epochs`) or an integer >= 1, got 0"),
    ("max_steps", -5, "got -5"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("chunk_size", -16, "chunk_size must"),
    ("epochs", 0, "epochs must"),
    ("eval_every_epochs", 0, "eval_every_epochs must"),
    ("log_every_steps", 0, "log_every_steps must"),
    ("num_grid_queries", -1, "num_grid_queries must be an integer >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("data.image_size", 0, "data.image_size must"),
    ("data.resize_size", -3, "data.resize_size must"),
    ("data.eval_batch_size", 0, "data.eval_batch_size must"),
    ("data.worker_count", -1, "data.worker_count must be an integer >= 0"),
    ("data.max_eval_images", 0, "data.max_eval_images must be None (every image)"),
    ("data.channels", 2, "data.channels must be one of 1, 3, got 2"),
    ("data.rotated_classes", 0, "data.rotated_classes must be one of 1, 2, 3, 4"),
    ("data.crop_scale", (0.5, 0.2), "data.crop_scale must be (low, high)"),
    ("data.crop_scale", (0.0, 1.0), "data.crop_scale must"),
    ("data.crop_scale", (0.5, 1.5), "data.crop_scale must"),
    ("model.embedding_dim", 0, "model.embedding_dim must"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate must be a finite number > 0"),
    ("optimizer.learning_rate", -1e-4, "optimizer.learning_rate must"),
    ("optimizer.learning_rate", math.nan, "got nan"),
    ("optimizer.learning_rate", math.inf, "got inf"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay must be a finite number >= 0"),
    ("optimizer.weight_decay", math.nan, "optimizer.weight_decay must"),
    ("optimizer.decay", 0.0, "optimizer.decay must be a finite number > 0 and <= 1"),
    ("optimizer.decay", 1.5, "optimizer.decay must"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps must be an integer >= 0"),
    ("optimizer.milestones", (50, 25), "optimizer.milestones must be a strictly increasing"),
    ("optimizer.milestones", (25, 25), "optimizer.milestones must"),
    ("optimizer.milestones", (0, 25), "optimizer.milestones must"),
    ("optimizer.milestones", (2.5,), "optimizer.milestones must"),
    ("loss.tau1", math.inf, "loss.tau1 must be a finite number > 0, got inf"),
    ("loss.tau2", 0.0, "loss.tau2 must"),
    ("loss.tau2", -0.01, "loss.tau2 must"),
    ("loss.k_values", (), "loss.k_values must be a non-empty sequence of positive integers"),
    ("loss.k_values", (0, 1), "loss.k_values must"),
    ("loss.k_values", (1.5, 2), "loss.k_values must"),
    ("loss.query_block", 0, "loss.query_block must be None (all queries at once)"),
    ("data.aspect_buckets", -1, "data.aspect_buckets must be an integer >= 0"),
    ("eval.qe_k", -1, "eval.qe_k must be an integer >= 0"),
    ("eval.dba_k", 1.5, "eval.dba_k must"),
    ("eval.qe_alpha", -1.0, "eval.qe_alpha must be a finite number >= 0"),
    ("eval.dba_alpha", math.nan, "eval.dba_alpha must"),
]


@pytest.mark.parametrize("key,value,message", _BAD, ids=[f"{k}={v}" for k, v, _ in _BAD])
def test_out_of_range_value_is_named(key, value, message):
  c = config_lib.base_config()
  _set(c, key, value)
  problems = config_checks.config_problems(c)
  assert len(problems) == 1, problems
  assert message in problems[0]


_BAD_PER_LOSS = [
    ("loss.recall_at_k.tau1", math.nan, "loss.recall_at_k.tau1 must be a finite number > 0"),
    ("loss.recall_at_k.k_values", (4, -1), "loss.recall_at_k.k_values must"),
    ("loss.smooth_ap.temperature", 0.0, "loss.smooth_ap.temperature must"),
    ("loss.smooth_ap.query_block", -2, "loss.smooth_ap.query_block must"),
    ("loss.contrastive.neg_margin", math.inf, "loss.contrastive.neg_margin must be a finite"),
    ("loss.multi_similarity.alpha", 0.0, "loss.multi_similarity.alpha must"),
    ("loss.multi_similarity.epsilon", -0.1,
     "loss.multi_similarity.epsilon must be a finite number >= 0"),
    ("eval.k_values", (1, 0), "eval.k_values must"),
]


@pytest.mark.parametrize("key,value,message", _BAD_PER_LOSS,
                         ids=[f"{k}={v}" for k, v, _ in _BAD_PER_LOSS])
def test_per_loss_sections_are_checked(key, value, message):
  c = _per_loss_layout()
  _set(c, key, value)
  problems = config_checks.config_problems(c)
  assert len(problems) == 1, problems
  assert message in problems[0]


@pytest.mark.parametrize("key,value", [
    ("max_steps", None), ("max_steps", 1), ("optimizer.decay", 1.0), ("optimizer.milestones", ()),
    ("num_grid_queries", 0), ("optimizer.learning_rate", 1), ("optimizer.weight_decay", 0.0),
    ("data.max_eval_images", None), ("data.crop_scale", (1.0, 1.0)), ("samples_per_class", 2),
    ("keep_checkpoints", 1), ("loss.query_block", 64), ("seed", 0)])
def test_boundary_values_are_accepted(key, value):
  c = config_lib.base_config()
  _set(c, key, value)
  assert config_checks.config_problems(c) == []


def test_every_problem_is_listed_at_once():
  c = config_lib.base_config()
  c.keep_checkpoints = 0
  c.checkpoint_every_steps = 0
  c.optimizer.learning_rate = math.nan
  problems = config_checks.config_problems(c)
  assert [p.split(" ")[0] for p in problems] == [
      "checkpoint_every_steps", "keep_checkpoints", "optimizer.learning_rate"]


def test_absent_keys_are_not_checked():
  assert config_checks.config_problems({}) == []
  assert config_checks.config_problems({"loss": "recall_at_k", "optimizer": {"decay": 2}}) == [
      "optimizer.decay must be a finite number > 0 and <= 1, got 2"]


def _stored(c: ml_collections.ConfigDict) -> dict:
  """A config as the run folder's config.json holds it."""
  return json.loads(c.to_json_best_effort(indent=2))


def test_same_config_resumes():
  c = config_lib.base_config()
  assert config_checks.config_differences(_stored(c), c) == []
  config_checks.check_resume_compatible(_stored(c), c, source="runs/x/config.json")
  config_checks.check_resume_compatible(None, c, source="runs/x/config.json")


def test_training_length_and_memory_keys_may_change_on_resume():
  stored = _stored(config_lib.base_config())
  c = config_lib.base_config()
  c.epochs, c.max_steps, c.chunk_size = 80, 1000, 50
  c.optimizer.learning_rate, c.optimizer.milestones = 1e-5, (60,)
  c.checkpoint_every_steps, c.keep_checkpoints, c.data.eval_batch_size = 100, 5, 64
  assert config_checks.config_differences(stored, c) == []


@pytest.mark.parametrize("key,value", [
    ("model.name", "resnet50"), ("model.embedding_dim", 128), ("model.dtype", "bfloat16"),
    ("data.image_size", 256), ("data.channels", 1), ("optimizer.name", "sgd"),
    ("data.name", "cub200"), ("data.rotated_classes", 4), ("batch_size", 2000),
    ("samples_per_class", 2), ("seed", 1)])
def test_incompatible_key_is_named(key, value):
  stored = _stored(config_lib.base_config())
  c = config_lib.base_config()
  _set(c, key, value)
  (line,) = config_checks.config_differences(stored, c)
  assert line.startswith(f"{key}: ") and json.dumps(value) in line


@pytest.mark.parametrize("before,now,refused", [
    ("recall_at_k", "smooth_ap", False),  # neither has parameters: a warm-up switches freely
    ("recall_at_k", "proxy_anchor", True),  # the checkpoints hold no proxies
    ("proxy_anchor", "recall_at_k", True),  # they hold proxies nothing would use
    ("proxy_anchor", "normalized_softmax", True),  # same shape, another meaning
    ("normalized_softmax", "normalized_softmax", False)])
def test_a_change_of_loss_is_refused_when_either_has_learned_parameters(before, now, refused):
  c = config_lib.base_config()
  c.loss.name = before
  stored = _stored(c)
  c.loss.name = now
  lines = config_checks.config_differences(stored, c)
  if not refused:
    assert lines == []
    return
  (line,) = lines
  assert line.startswith(f'loss.name: "{before}" (') and f'"{now}" (' in line
  with_params = [n for n in (before, now) if n != "recall_at_k"]
  assert line.count("(learned parameters in the checkpoints)") == len(with_params)


def test_resume_refusal_names_every_key_and_the_file():
  stored = _stored(config_lib.base_config())
  c = config_lib.base_config()
  c.model.embedding_dim = 128
  c.optimizer.name = "sgd"
  with pytest.raises(errors.ConfigError,
                     match=r"differs from runs/x/config.json(.|\n)*model.embedding_dim: 512 when "
                           r"the run started, 128 now(.|\n)*optimizer.name: \"adamw\"") as info:
    config_checks.check_resume_compatible(stored, c, source="runs/x/config.json")
  assert "seed" not in str(info.value)


def test_keys_missing_from_an_older_config_file_are_not_compared():
  stored = _stored(config_lib.base_config())
  del stored["model"]["dtype"]
  c = config_lib.base_config()
  c.model.dtype = "bfloat16"
  assert config_checks.config_differences(stored, c) == []
