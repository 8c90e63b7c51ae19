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
  if spec.parameters:  # the learned parameters come third, positionally
    assert list(parameters)[2] in ("proxies", "weights")
  if spec.database_function:  # the query/database form takes the same options
    database_parameters = inspect.signature(spec.load_database_form()).parameters
    assert "database_valid" in database_parameters
    for keyword, option in spec.options.items():
      assert database_parameters[keyword].default == option.default, keyword
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
  args = (embeddings, labels)
  if spec.parameters:
    args += (spec.load_parameters_init()(jax.random.key(1), 8, 8),)
  args += (jax.random.key(0),) if uses_rng else ()
  value = jax.jit(loss_fn)(*args)
  assert value.shape == () and np.isfinite(value)


@pytest.mark.usefixtures("x64")  # float64 comparison (conftest)
@pytest.mark.parametrize("name", NAMES)
def test_database_form_with_a_memory_equals_the_batch_loss_before_the_memory_fills(name):
  # make_loss_fn with loss.memory_size gives the query/database form, sized for m + M - 1
  # positives; with the memory's rows all invalid it is the batch loss.
  spec = registry.loss_spec(name)
  c = config_lib.base_config()
  c.loss.name, c.loss.memory_size = name, 64
  c.batch_size, c.samples_per_class, c.chunk_size = 32, 4, 8
  if spec.database_function is None:
    with pytest.raises(errors.ConfigError, match=f"loss {name!r} takes no cross-batch memory"):
      config_lib.validate(c)
    return
  config_lib.validate(c)
  database_loss, uses_rng = experiment.make_loss_fn(c)
  assert not uses_rng
  c.loss.memory_size = 0
  batch_loss, _ = experiment.make_loss_fn(c)
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(32, 8))
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  labels = np.repeat(np.arange(8), 4)
  database = np.concatenate([embeddings, rng.normal(size=(64, 8))])
  database_labels = np.concatenate([labels, rng.integers(0, 8, 64)])
  valid = np.arange(96) < 32
  got = database_loss(embeddings, labels, database, database_labels, database_valid=valid)
  np.testing.assert_allclose(got, batch_loss(embeddings, labels), rtol=1e-12, atol=1e-12)


def test_loss_parameters_are_proxy_facts():
  assert [n for n in NAMES if registry.loss_spec(n).parameters] == [
      "proxy_anchor", "normalized_softmax"]
  assert [n for n in NAMES if registry.loss_spec(n).database_function] == [
      "recall_at_k", "smooth_ap", "contrastive", "multi_similarity"]
  assert losses.proxy_anchor_loss is losses.get_loss("proxy_anchor")
  assert losses.normalized_softmax_loss is losses.get_loss("normalized_softmax")
  with pytest.raises(ValueError, match="has no learned parameters"):
    registry.loss_spec("recall_at_k").load_parameters_init()
  with pytest.raises(ValueError, match="has no query/database form"):
    registry.loss_spec("proxy_anchor").load_database_form()


@pytest.mark.parametrize("key, value, message", [
    ("memory_size", -1, "loss.memory_size must be an integer >= 0"),
    ("memory_start_step", -2, "loss.memory_start_step must be an integer >= 0"),
    ("param_learning_rate", 0.0, "loss.param_learning_rate must be a finite number > 0"),
])
def test_memory_and_parameter_keys_are_range_checked(key, value, message):
  c = config_lib.base_config()
  c.loss[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(c)


def test_a_memory_refuses_simix_and_a_warmup_loss_has_no_parameters():
  c = config_lib.base_config()
  c.simix, c.loss.memory_size = True, 100
  with pytest.raises(errors.ConfigError, match="does not combine with simix"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.loss.warmup_name, c.loss.warmup_steps = "proxy_anchor", 5
  with pytest.raises(errors.ConfigError, match="a warm-up loss must have none"):
    config_lib.validate(c)


def test_cold_start_check_and_simix_are_recall_at_k_facts():
  assert [n for n in NAMES if registry.loss_spec(n).cold_start_check] == ["recall_at_k"]
  assert [n for n in NAMES if registry.loss_spec(n).simix] == ["recall_at_k"]
  assert [n for n in NAMES if registry.loss_spec(n).takes_layout] == ["recall_at_k", "smooth_ap"]
