"""The loss registry (recall_jax.losses.registry): what follows from each loss's spec."""

import inspect
import subprocess
import sys

import jax
import numpy as np
import pytest

from recall_jax import config as config_lib
from recall_jax import config_checks
from recall_jax import errors
from recall_jax import losses
from recall_jax.losses import registry
from recall_jax.train import experiment

NAMES = registry.loss_names()


def test_importing_the_losses_imports_no_jax():
  code = ("import sys, recall_jax.losses, recall_jax.losses.registry; "
          "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_public_names_load_their_modules_on_first_use():
  from recall_jax.losses import recall_at_k as module  # noqa: PLC0415 (the module itself)
  assert losses.recall_at_k_loss is module.recall_at_k_loss
  assert losses.get_loss("recall_at_k") is module.recall_at_k_loss
  with pytest.raises(AttributeError):
    losses.no_such_loss  # noqa: B018
  with pytest.raises(ValueError, match="unknown loss 'triplet'"):
    losses.get_loss("triplet")


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_its_function(name):
  spec = registry.loss_spec(name)
  parameters = inspect.signature(spec.load()).parameters
  # Options are keyword-only keywords of the function, with its defaults.
  for keyword, option in spec.options.items():
    assert parameters[keyword].kind == inspect.Parameter.KEYWORD_ONLY
    assert parameters[keyword].default == option.default, keyword
    assert option.comment and "\n" not in option.comment
  assert ("samples_per_class" in parameters) == spec.takes_layout
  assert not spec.simix or spec.takes_layout  # SiMix changes the layout the loss is given.


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_has_its_config_section(name):
  section = config_lib.base_config().loss[name]
  assert dict(section) == {k: o.default for k, o in registry.loss_spec(name).options.items()}


@pytest.mark.parametrize("name", NAMES)
def test_every_ranged_keyword_is_checked_under_its_loss(name):
  spec = registry.loss_spec(name)
  ranged = [k for k, o in spec.options.items() if o.rule is not None]
  assert ranged, f"{name} has no range-checked keyword"
  for keyword in ranged:
    c = config_lib.base_config()
    c.loss.name = name
    with c.loss[name].ignore_type():
      c.loss[name][keyword] = "not a value"
    problems = config_checks.config_problems(c)
    assert len(problems) == 1 and problems[0].startswith(f"loss.{name}.{keyword} must"), problems
    with pytest.raises(errors.ConfigError, match=f"loss.{name}.{keyword} must"):
      config_lib.validate(c)


def test_a_keyword_is_checked_by_its_own_losss_rule(monkeypatch):
  # The same keyword may have a different range in each loss: checks follow the section's spec.
  strict = registry.LossSpec(
      "strict_contrastive", "recall_jax.losses.contrastive:contrastive_loss", "test loss",
      {"pos_margin": registry.Option(0.0, "as contrastive", config_checks.ranges.finite(
          at_least=0)), "neg_margin": registry.Option(0.5, "as contrastive")})
  monkeypatch.setitem(registry.LOSSES, strict.name, strict)
  c = config_lib.base_config()
  c.loss.contrastive.pos_margin = -0.5
  assert config_checks.config_problems(c) == []
  c.loss.strict_contrastive = config_lib.loss_section(strict)
  c.loss.strict_contrastive.pos_margin = -0.5
  assert config_checks.config_problems(c) == [
      "loss.strict_contrastive.pos_margin must be a finite number >= 0, got -0.5"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("simix", [False, True])
def test_every_loss_is_built_by_make_loss_fn_and_called(name, simix):
  spec = registry.loss_spec(name)
  c = config_lib.base_config()
  c.loss.name, c.simix = name, simix
  c.batch_size, c.samples_per_class, c.chunk_size = 32, 4, 8
  if simix and not spec.simix:
    with pytest.raises(errors.ConfigError, match="simix is implemented for the"):
      config_lib.validate(c)
    return
  config_lib.validate(c)
  loss_fn, uses_rng = experiment.make_loss_fn(c)
  assert uses_rng == simix
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(32, 8)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  labels = np.repeat(np.arange(8), 4)
  args = (embeddings, labels, jax.random.key(0)) if uses_rng else (embeddings, labels)
  value = jax.jit(loss_fn)(*args)
  assert value.shape == () and np.isfinite(value)


def test_cold_start_check_and_simix_are_recall_at_k_facts():
  assert [n for n in NAMES if registry.loss_spec(n).cold_start_check] == ["recall_at_k"]
  assert [n for n in NAMES if registry.loss_spec(n).simix] == ["recall_at_k"]
  assert [n for n in NAMES if registry.loss_spec(n).takes_layout] == ["recall_at_k", "smooth_ap"]
