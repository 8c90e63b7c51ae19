"""The dataset registry (recall_jax.data.registry): one spec per dataset, and what follows."""

import dataclasses
import inspect
import pathlib
import subprocess
import sys

import pytest

from recall_jax import config as config_lib
from recall_jax.data import parsing
from recall_jax.data import registry
from recall_jax.evaluation import protocols

NAMES = tuple(registry.DATASETS)


def test_importing_the_registry_imports_no_data_library_or_jax():
  code = ("import sys, recall_jax.data.registry, recall_jax.data; print(sorted(m for m in "
          "('jax', 'tensorflow_datasets', 'grain', 'PIL') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", NAMES)
def test_every_spec_names_a_parser_and_a_protocol(name):
  spec = registry.dataset_spec(name)
  assert spec.name == name and spec.channels in (1, 3)
  parser = registry.load_function(spec.parser)
  assert parser.__module__ == parsing.__name__
  assert list(inspect.signature(parser).parameters)[:1] == ["folder"]
  assert spec.k_values and all(k >= 1 for k in spec.k_values)
  assert list(spec.k_values) == sorted(set(spec.k_values))
  assert protocols.protocol_for(name) == {"name": name, "k_values": spec.k_values,
                                          "reid_k_values": spec.reid_k_values}
  c = config_lib.base_config()
  c.data.name = name
  assert config_lib.eval_k_values(c) == spec.k_values
  # Only a user's data lists its inputs itself; every other dataset names its annotation files.
  assert bool(spec.annotations) != spec.user_splits
  folder = pathlib.Path("/data") / spec.folder
  if not spec.user_splits:
    assert spec.fingerprint_files(folder, ()) == [folder / a for a in spec.annotations]


def test_folders_are_distinct_and_specs_frozen():
  folders = [s.folder for s in registry.DATASETS.values()]
  assert len(set(folders)) == len(folders)
  with pytest.raises(dataclasses.FrozenInstanceError):
    registry.DATASETS["sop"].folder = "elsewhere"


def test_an_unregistered_dataset_gets_the_default_protocol():
  assert registry.dataset_spec("imagenet") is None
  assert protocols.protocol_for("imagenet")["k_values"] == registry.DEFAULT_K_VALUES
