"""Config defaults, smoke shrinking and validation (recall_jax.config)."""

import importlib.util
import inspect
import json
import pathlib
import subprocess
import sys

import pytest

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax import losses

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name="omniglot", arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


_HEAVY = ("jax", "flax", "optax", "tensorflow", "tensorflow_datasets", "grain", "torch")


def test_the_config_and_every_config_file_load_without_jax():
  # A fresh interpreter: what `import recall_jax.config` and loading each configs/*.py (as
  # main.py's config flag does, with and without `smoke`) bring into sys.modules.
  files = sorted(str(p) for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")
  code = f"""
import importlib.util, json, sys
heavy = {_HEAVY!r}
import recall_jax.config
found = {{"recall_jax.config": [m for m in heavy if m in sys.modules]}}
for path in {files!r}:
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.get_config(None)
  module.get_config("smoke")
  found[path] = [m for m in heavy if m in sys.modules]
print(json.dumps(found))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=120)
  found = json.loads(out.stdout)
  assert len(found) == len(files) + 1 and len(files) > 10
  assert found == {name: [] for name in found}


def test_validation_names_every_problem():
  c = load_config()
  c.batch_size = 30
  c.chunk_size = 7
  c.loss.name = "triplet"
  c.model.pretrained = "/nonexistent/weights.npz"
  c.data.rotated_classes = 5
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(c)
  message = str(info.value)
  for fragment in ("not divisible by samples_per_class", "not divisible by chunk_size",
                   "loss.name 'triplet'", "weights file /nonexistent/weights.npz does not exist",
                   "data.rotated_classes must be one of 1, 2, 3, 4, got 5"):
    assert fragment in message
  c = load_config()
  with pytest.raises(errors.ConfigError,
                     match=r"global batch 32 is not divisible by chunk_size_per_device 16 x 4 dev"):
    config_lib.validate(c, num_devices=4)
  with pytest.raises(errors.ConfigError, match="each of 16 processes gets 2 images"):
    c.chunk_size = 1
    config_lib.validate(c, num_devices=16, num_processes=16)
  with pytest.raises(errors.ConfigError, match="unknown config argument"):
    load_config(arg="smok")


def test_evaluation_keys_are_checked():
  c = load_config()
  c.data.query_split = "query"
  c.eval.k_values = (1, 0)
  c.eval.reid = True
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(c)
  message = str(info.value)
  for fragment in ("data.query_split and data.gallery_split must be set together",
                   "eval.k_values must be a non-empty sequence of positive integers",
                   "eval.reid: dataset 'omniglot'"):
    assert fragment in message
  c = load_config()
  c.data.query_split, c.data.gallery_split = "query", "gallery"
  with pytest.raises(errors.ConfigError, match="best_metric 'test/recall@1' names no evaluated"):
    config_lib.validate(c)
  c.best_metric = "query/recall@1"
  config_lib.validate(c)
  assert config_lib.evaluated_sets(c) == ("query",)
  vehicleid = load_config("vehicleid_resnet")
  vehicleid.eval.reid = True
  config_lib.validate(vehicleid)


def test_eval_k_values_default_to_the_protocol_else_1_2_4_8():
  c = load_config()
  assert config_lib.eval_k_values(c) == (1, 2, 4, 8)
  c.data.name = "folder"
  assert config_lib.eval_k_values(c) == (1, 2, 4, 8)
  assert config_lib.eval_k_values(load_config("sop_vit")) == (1, 10, 100, 1000)
  c.eval.k_values = (1, 5)
  assert config_lib.eval_k_values(c) == (1, 5)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_each_loss_section_holds_its_keywords_and_defaults(name):
  # Every keyword the loss takes, with its default, except the sizes the trainer derives from
  # the batch layout (samples_per_class, max_positives).
  section = config_lib.base_config().loss[name]
  derived = ("max_positives", "samples_per_class")
  parameters = {p.name: p.default for p in inspect.signature(losses.get_loss(name)).parameters
                .values() if p.kind == p.KEYWORD_ONLY and p.name not in derived}
  assert dict(section) == parameters


@pytest.mark.parametrize("name, model, image_size, resize_size", [
    ("omniglot", "small_cnn_flat", 28, 28), ("sop_vit", "vit_tiny_test", 32, 36),
    ("cub_resnet", "resnet_tiny_test", 32, 36), ("default", "vit_tiny_test", 32, 36),
])
def test_smoke_shrinks_only_what_is_large(name, model, image_size, resize_size):
  c = load_config(name)
  assert (c.model.name, c.data.image_size, c.data.resize_size) == (model, image_size, resize_size)
  assert c.max_steps == 3 and c.batch_size == 32 and c.model.pretrained is None
  config_lib.validate(c)


def test_recall_at_k_cut_offs_must_stay_below_the_batch():
  c = load_config()
  c.batch_size, c.chunk_size = 16, 8
  with pytest.raises(errors.ConfigError, match=r"k_values \[16\] are not below batch_size - 1"):
    config_lib.validate(c)
  c.loss.recall_at_k.k_values = (1, 2, 4, 8)
  config_lib.validate(c)


@pytest.mark.parametrize("name, steps, message", [
    ("smooth_ap", 0, "loss.warmup_name 'smooth_ap' needs loss.warmup_steps > 0"),
    (None, 10, "loss.warmup_steps = 10 needs loss.warmup_name"),
    ("no_such_loss", 10, "loss.warmup_name 'no_such_loss' is not one of"),
    ("smooth_ap", -1, "loss.warmup_steps must be >= 0"),
])
def test_warmup_loss_keys_are_checked(name, steps, message):
  c = load_config()
  c.loss.warmup_name, c.loss.warmup_steps = name, steps
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(c)
  c.loss.warmup_name, c.loss.warmup_steps = "multi_similarity", 5
  config_lib.validate(c)
