"""Multi-process start-up: joining `jax.distributed` when launched as one of several processes.

Serves both tasks. `initialize_distributed()` starts `jax.distributed` when launched by SLURM with
several tasks, by Open MPI with several ranks, or with explicit `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; a single process is left alone. It must run before any
other JAX call (`recall_jax.main` calls it first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from recall_jax import errors

_log = logging.getLogger(__name__)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_environment(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """How this process was launched: the `jax.distributed.initialize` arguments, or None.

  Args:
    env: the environment (default `os.environ`).

  Returns:
    None for a single process. Otherwise a dict with 'launcher' ('explicit', 'slurm' or 'mpi')
    and the keyword arguments for `jax.distributed.initialize`: explicit variables give
    coordinator_address / num_processes / process_id; for SLURM and Open MPI JAX's own cluster
    detection reads the scheduler's variables, so only `launcher` is set.

  Raises:
    ConfigError: explicit variables given only in part, or not integers.
  """
  env = os.environ if env is None else env
  explicit = {k: env.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                      "JAX_PROCESS_ID")}
  if any(explicit.values()):
    missing = [k for k, v in explicit.items() if not v]
    if missing:
      raise errors.ConfigError(
          f"multi-process launch needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
          f"JAX_PROCESS_ID together; missing {', '.join(missing)}")
    num_processes = _int_env(env, "JAX_NUM_PROCESSES")
    process_id = _int_env(env, "JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise errors.ConfigError(
          f"JAX_PROCESS_ID={process_id} not in [0, JAX_NUM_PROCESSES={num_processes})")
    if num_processes == 1:
      return None
    return {"launcher": "explicit", "coordinator_address": explicit["JAX_COORDINATOR_ADDRESS"],
            "num_processes": num_processes, "process_id": process_id}
  if env.get("SLURM_JOB_ID") and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
    return {"launcher": "slurm"}
  if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return {"launcher": "mpi"}
  return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> tuple[int, int]:
  """Starts `jax.distributed` when this is one of several processes; a no-op for one process.

  Call it first thing, before any other JAX call (JAX refuses to initialise once a backend
  exists). Calling it again after a successful start is harmless.

  Args:
    env: the environment to read (default `os.environ`); see `distributed_environment`.

  Returns:
    (process_index, process_count) after start-up.
  """
  launch = distributed_environment(env)
  if launch is not None and not jax.distributed.is_initialized():
    kwargs = {k: v for k, v in launch.items() if k != "launcher"}
    _log.info("jax.distributed.initialize via %s %s", launch["launcher"], kwargs)
    jax.distributed.initialize(**kwargs)
  return jax.process_index(), jax.process_count()
