"""Where datasets and their prepared (tensorflow-datasets) copies live on disk.

Serves both tasks.
"""

from __future__ import annotations

import os
import pathlib

DATA_ENV_VAR = "RECALL_JAX_DATA"


def default_cache_dir() -> pathlib.Path:
  """The per-user cache folder: `$XDG_CACHE_HOME/recall_jax`, else `~/.cache/recall_jax`."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "recall_jax"


def data_root(configured: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The folder holding the raw datasets (e.g. `<root>/omniglot/images_background.zip`).

  Args:
    configured: an explicit path (a config value); wins when given and not empty.

  Returns:
    `configured`, else the environment variable `RECALL_JAX_DATA`, else `default_cache_dir()`,
    with `~` expanded. The folder need not exist yet.
  """
  if configured:
    return pathlib.Path(configured).expanduser()
  env = os.environ.get(DATA_ENV_VAR)
  if env:
    return pathlib.Path(env).expanduser()
  return default_cache_dir()


def prepared_root(root: pathlib.Path,
                  configured: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The folder holding prepared ArrayRecord splits.

  `<root>/prepared` when the data root is writable (or can be created); a read-only data root,
  such as a shared offline copy, falls back to `default_cache_dir()/prepared`, so the raw files
  never need to be copied. A folder without any write permission bit counts as read-only even
  for root, who could otherwise write into a copy that is meant to stay pristine.
  """
  if configured:
    return pathlib.Path(configured).expanduser()
  candidate = root / "prepared"
  probe = candidate if candidate.exists() else root
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  if os.access(probe, os.W_OK) and probe.stat().st_mode & 0o222:
    return candidate
  return default_cache_dir() / "prepared"
