"""Shared pytest fixtures.

The demo dataset (Omniglot) is read from `../shared/data` beside the checkout when the user has
not set RECALL_JAX_DATA, so tests and CI run offline.
"""

import os
import pathlib

import jax
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if "RECALL_JAX_DATA" not in os.environ and SHARED_DATA.is_dir():
  os.environ["RECALL_JAX_DATA"] = str(SHARED_DATA)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled, restoring the previous setting afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def omniglot_root():
  """The data root holding omniglot/images_*.zip, or a skip with the reason."""
  root = pathlib.Path(os.environ.get("RECALL_JAX_DATA", SHARED_DATA))
  if not (root / "omniglot" / "images_background.zip").is_file():
    pytest.skip(f"Omniglot archives not found under {root}/omniglot (set RECALL_JAX_DATA)")
  return root
