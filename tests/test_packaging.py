"""What pyproject.toml promises users: the GPU extra resolves to CUDA jax."""

import importlib.metadata
import pathlib
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
