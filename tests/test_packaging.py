"""What pyproject.toml promises users: every imported package declared, the core libraries with
lower bounds that the tested versions meet, the GPU extra resolving to CUDA jax."""

import ast
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cuda12_extra_brings_cuda_jax_that_jax_provides():
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  (requirement,) = [Requirement(r) for r in extras["cuda12"]]
  assert requirement.name == "jax" and requirement.extras == {"cuda12"}
  # The installed jax (same release line as a GPU install) must declare that extra, or pip would
  # silently install CPU-only jax.
  assert "cuda12" in importlib.metadata.metadata("jax").get_all("Provides-Extra")


def _declared() -> dict[str, Requirement]:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  return {(r := Requirement(line)).name.lower(): r for line in project["dependencies"]}


# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {"PIL": "pillow", "absl": "absl-py", "ml_collections": "ml-collections",
                  "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-datasets"}
# Imported only inside `try: ... except ImportError` (TensorBoard events when installed).
_OPTIONAL = {"tensorboardX"}


def test_every_imported_package_is_declared():
  imported = set()
  for path in (REPO / "recall_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported |= {alias.name.split(".")[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        imported.add(node.module.split(".")[0])
  third_party = imported - set(sys.stdlib_module_names) - {"recall_jax"} - _OPTIONAL
  missing = {_DISTRIBUTIONS.get(m, m).lower() for m in third_party} - set(_declared())
  assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_core_libraries_have_lower_bounds_that_the_tested_versions_meet():
  declared = _declared()
  for name in ("jax", "flax", "optax", "orbax-checkpoint", "grain"):
    specifier = declared[name].specifier
    assert any(s.operator == ">=" for s in specifier), f"{name} has no lower bound"
    assert specifier.contains(importlib.metadata.version(name)), name
