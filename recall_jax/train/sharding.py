"""Data-parallel training over every device of every host, with exactly the single-device gradient.

The RS@k loss is a function of the whole (global) mega-batch, so N devices must give the same
gradient as one device holding the whole batch. The recipe, in JAX's global-array view:

* one mesh axis, `data`, over all devices of all processes (`recall_jax.parallel.data_mesh`,
  shared with evaluation);
* parameters and optimiser state replicated, and born that way (`make_sharded_state` runs
  `init_train_state` under `jit(out_shardings=replicated)`, so no host ever holds a full copy
  outside the devices);
* the global batch sharded along its leading axis; each process feeds only its contiguous slice
  (the sampler's `local_slice`) and `global_batch` assembles the global array with
  `jax.make_array_from_process_local_data`;
* `make_sharded_train_step` runs the two-pass `megabatch_value_and_grad` per device under
  `shard_map`: pass 1 and pass 2 only ever see the device's own chunk rows (the strided chunk
  layout makes device d's chunk c its share of global chunk c, so all devices work in every
  chunk and forming chunks moves no data); the (b, D) embeddings and labels are all-gathered
  so SiMix and RS@k see the global batch; every device computes the same loss and dL/dE and
  keeps its own rows of dL/dE; the parameter gradients are accumulated locally and summed by ONE
  all-reduce at the end of the step.

Communication per step: one all-gather of the B x D embeddings (float32), one all-reduce of the
parameter gradients, and nothing per chunk. See launch/README.md for the numbers.

Chunk size semantics: `chunk_size_per_device` is the number of images ONE device embeds and
back-propagates at once (what bounds its memory, as `config.chunk_size`); a chunk of the global
batch holds `chunk_size_per_device * num_devices` images. The global batch must be divisible by
that product (`check_batch_layout`).

Multi-host: `initialize_distributed()` starts `jax.distributed` when launched by SLURM with
several tasks, by Open MPI with several ranks, or with explicit `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; a single process is left alone.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from recall_jax import errors
from recall_jax.batch_layout import batch_layout_problems
from recall_jax.batch_layout import check_batch_layout
from recall_jax.data import bucket_plan
from recall_jax.parallel import DATA_AXIS
from recall_jax.parallel import data_mesh
from recall_jax.parallel import replicated
from recall_jax.parallel import row_sharding
from recall_jax.train import megabatch
from recall_jax.train import train_step as train_step_lib

__all__ = [
    "DATA_AXIS", "data_mesh", "replicated", "batch_sharding", "initialize_distributed",
    "distributed_environment", "batch_layout_problems", "check_batch_layout",
    "make_sharded_state", "global_batch", "global_bucketed_batch",
    "sharded_value_and_grad", "sharded_bucketed_value_and_grad", "make_sharded_train_step",
]

PyTree = Any
_log = logging.getLogger(__name__)

batch_sharding = row_sharding  # The leading (batch) axis split over `data`; the same object.


# ----------------------------------------------------------------------------------------------
# Multi-process start-up.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# State and batches (the layout rules live in recall_jax.batch_layout).
# ----------------------------------------------------------------------------------------------


def make_sharded_state(params: PyTree, optimizer: optax.GradientTransformation,
                       mesh: Mesh, *, loss_params: PyTree = None,
                       loss_optimizer: optax.GradientTransformation | None = None,
                       memory: Any = None) -> train_step_lib.TrainState:
  """A step-0 `TrainState` whose parameters and optimiser state are replicated over `mesh`.

  Built under `jit(out_shardings=replicated)`, so each device receives its copy directly.
  `params` must be identical on every process (same seed / same pretrained file). The loss's
  parameters and the cross-batch memory (`train_step.init_train_state`) are replicated too:
  every device computes the same loss on the gathered embeddings.
  """
  init = jax.jit(train_step_lib.init_train_state, static_argnums=(1, 3),
                 out_shardings=replicated(mesh))
  return init(params, optimizer, loss_params, loss_optimizer, memory)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's contiguous slice of every array into global arrays.

  Args:
    local_batch: name -> (b, ...) NumPy arrays, rows `[p * b, (p + 1) * b)` of the global batch
      for process p (`MPerClassSampler.local_slice`), e.g. {'image': uint8, 'label': int32}.
    mesh: the data mesh; its devices on this process receive the slice, split evenly.

  Returns:
    name -> global (b * process_count, ...) `jax.Array` sharded along the leading axis.

  Raises:
    ValueError: arrays of different lengths, or a length that does not split over this
      process's devices.
  """
  sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local_batch.items()}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(f"every batch array needs the same leading axis, got lengths {sizes}")
  (local_size,) = set(sizes.values())
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if local_size % local_devices:
    raise ValueError(f"local batch of {local_size} rows does not split over this process's "
                     f"{local_devices} devices")
  sharding = batch_sharding(mesh)
  global_size = local_size * (mesh.devices.size // local_devices)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (global_size,) + np.shape(v)[1:]) for k, v in local_batch.items()}


def global_bucketed_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """`global_batch` for whole images in aspect buckets (`data.make_bucketed_train_loader`).

  On several processes, the processes first agree on each bucket's slot count (the largest any
  of them needs this step; usually all equal the plan), and pad theirs with empty slots, so the
  global bucket arrays have one shape. Each row's (bucket, position) then becomes its index in
  the concatenation of the global bucket arrays (`data.flat_slots`).

  Args:
    local_batch: {'image': `data.BucketedImages` of this process's rows, 'label': int32 (b,)}.
    mesh: the data mesh.

  Returns:
    {'image': `megabatch.BucketedBatch` of global arrays (buckets sharded along their slots,
    slots along the rows), 'label': global (B,) labels}.
  """
  images = local_batch["image"]
  capacities = tuple(len(b) for b in images.buckets)
  if jax.process_count() > 1:
    agreed = multihost_utils.process_allgather(np.asarray(capacities, np.int64))
    capacities = tuple(int(c) for c in np.max(np.asarray(agreed).reshape(-1, len(capacities)),
                                              axis=0))
    images = bucket_plan.pad_buckets(images, capacities)
  slots = bucket_plan.flat_slots(images.bucket, images.position, capacities,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  rows = global_batch({"slots": slots, "label": local_batch["label"]}, mesh)
  buckets = tuple(global_batch({"bucket": b}, mesh)["bucket"] for b in images.buckets)
  return {"image": megabatch.BucketedBatch(buckets, rows["slots"]), "label": rows["label"]}


# ----------------------------------------------------------------------------------------------
# The sharded step.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_rows(local: jax.Array, axis_name: str) -> jax.Array:
  """(b, D) per device -> (b * devices, D), rows in device order; inside `shard_map` only."""
  return jax.lax.all_gather(local, axis_name, tiled=True)


def _gather_rows_fwd(local, axis_name):
  return _gather_rows(local, axis_name), local.shape[0]


def _gather_rows_bwd(axis_name, rows, cotangent):
  # Every device computes the same loss from the same gathered embeddings, so the full (B, D)
  # cotangent is identical everywhere: each device keeps its own rows. (The default transpose,
  # a reduce-scatter, would sum the devices' identical copies: devices x the true gradient.)
  start = jax.lax.axis_index(axis_name) * rows
  return (jax.lax.dynamic_slice_in_dim(cotangent, start, rows, axis=0),)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _local_embed_fn(embed_fn: megabatch.EmbedFn) -> megabatch.EmbedFn:
  """`embed_fn` with each chunk's key folded with the device index (independent dropout masks)."""
  def local_embed_fn(params, images_chunk, rng):
    if rng is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
    return embed_fn(params, images_chunk, rng)
  return local_embed_fn


def sharded_value_and_grad(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    mesh: Mesh,
    *,
    chunk_size_per_device: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
) -> megabatch.StepFn:
  """The data-parallel, exact mega-batch `value_and_grad`.

  Each device runs `megabatch_value_and_grad` on its own rows (`shard_map`): pass 1 embeds its
  chunks, the (b, D) embeddings are all-gathered so the loss (and SiMix) see the global (B, D)
  batch, every device computes the same loss and dL/dE and keeps its own rows of dL/dE, pass 2
  accumulates its parameter gradients locally, and ONE all-reduce (`psum`) sums them over the
  devices at the end. With the strided chunk layout, device d's chunk c is its share of global
  chunk c, so the result equals `megabatch_value_and_grad(..., chunk_size=chunk_size_per_device
  * devices)` on one device, i.e. the full-batch gradient, up to float rounding.

  Dropout: chunk c's key is folded with the device index, so devices draw independent masks for
  their rows (with one key per chunk they would repeat each other's masks). Models without
  dropout give the single-device result exactly; with dropout the masks (not their statistics)
  depend on the device count.

  Loss parameters (`loss_has_params`): every device computes the same loss on the gathered
  embeddings, so each holds the whole gradient of the loss's parameters; it is taken as is (a
  psum would multiply it by the device count). `loss_inputs` (a memory) are replicated.

  Args:
    embed_fn, loss_fn, loss_uses_rng, loss_has_params: as in
      `megabatch.megabatch_value_and_grad`.
    mesh: the data mesh (`data_mesh()`).
    chunk_size_per_device: images one device embeds at once.

  Returns:
    `step_fn(params, images, labels, rng=None, *, loss_params=None, loss_inputs=()) ->
    (loss, grads)` to call under `jax.jit` on the global batch (B, ...) sharded along `data`,
    `params`, `loss_params` and `loss_inputs` replicated; loss and grads replicated (with
    `loss_has_params`, grads is `(model grads, loss_params grads)`).
    ConfigError (trace time) when B is not divisible by `chunk_size_per_device` x devices.
  """
  num_devices = mesh.devices.size
  check_batch_layout(chunk_size_per_device * num_devices, chunk_size_per_device, num_devices)

  def global_loss_fn(local_embeddings, local_labels, *rest):
    embeddings = _gather_rows(local_embeddings, DATA_AXIS)
    labels = jax.lax.all_gather(local_labels, DATA_AXIS, tiled=True)
    return loss_fn(embeddings, labels, *rest)

  local_value_and_grad = megabatch.megabatch_value_and_grad(
      _local_embed_fn(embed_fn), global_loss_fn, chunk_size=chunk_size_per_device,
      loss_uses_rng=loss_uses_rng, keep_activations=keep_activations,
      loss_has_params=loss_has_params)

  def per_device(params, images, labels, rng, loss_params, loss_inputs):
    loss, grads = local_value_and_grad(params, images, labels, rng, loss_params=loss_params,
                                       loss_inputs=loss_inputs)
    return loss, _sum_model_grads(grads, loss_has_params)

  data, full = PartitionSpec(DATA_AXIS), PartitionSpec()
  # check_vma=False: the loss is replicated by construction (same inputs on every device) and
  # the gradients by the psum; the vma type system cannot see the former.
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(full, data, data, full, full, full),
                         out_specs=(full, full), check_vma=False)

  def step_fn(params, images, labels, rng=None, *, loss_params=None, loss_inputs=()):
    batch_size = _batch_size_of(images)
    if batch_size is None:
      raise ValueError("images must be an array (or pytree of arrays) with a leading batch axis")
    check_batch_layout(batch_size, chunk_size_per_device, num_devices)
    if np.shape(labels)[:1] != (batch_size,) or np.ndim(labels) != 1:
      raise ValueError(f"labels must have shape ({batch_size},), got {np.shape(labels)}")
    return mapped(params, images, labels, rng, loss_params, tuple(loss_inputs))

  return step_fn


def sharded_bucketed_value_and_grad(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    mesh: Mesh,
    *,
    chunk_size_per_device: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
) -> megabatch.StepFn:
  """`sharded_value_and_grad` for a batch held in aspect buckets (`megabatch.BucketedBatch`).

  Every bucket array is sharded along its slots, the slots and labels along the batch rows.
  Each device embeds its chunks of every bucket; each bucket's (S_k, D) embeddings are
  all-gathered (device order is slot order), concatenated and indexed by the gathered slots,
  so the loss sees the global batch in row order; dL/dE flows back to each device's own slots
  and ONE all-reduce sums the parameter gradients. The result equals
  `megabatch.bucketed_value_and_grad` on one device, up to float rounding.

  Args:
    As `sharded_value_and_grad`; every bucket's slot count must be divisible by
    `chunk_size_per_device` x devices.

  Returns:
    `step_fn(params, batch: BucketedBatch, labels (B,), rng=None, *, loss_params=None,
    loss_inputs=()) -> (loss, grads)`, to call under `jax.jit` on global arrays
    (`global_batch`); loss parameters and inputs as in `sharded_value_and_grad`.
  """
  num_devices = mesh.devices.size
  check_batch_layout(chunk_size_per_device * num_devices, chunk_size_per_device, num_devices)

  def global_embeddings(local_embeddings, local_slots, local_labels):
    embeddings = jax.numpy.concatenate([_gather_rows(e, DATA_AXIS) for e in local_embeddings])
    slots = jax.lax.all_gather(local_slots, DATA_AXIS, tiled=True)
    labels = jax.lax.all_gather(local_labels, DATA_AXIS, tiled=True)
    return embeddings[slots], labels

  if loss_has_params:
    def global_loss_fn(local_embeddings, own, local_slots, local_labels, *rest):
      return loss_fn(*global_embeddings(local_embeddings, local_slots, local_labels), own,
                     *rest)
  else:
    def global_loss_fn(local_embeddings, local_slots, local_labels, *rest):
      return loss_fn(*global_embeddings(local_embeddings, local_slots, local_labels), *rest)

  local_value_and_grad = megabatch.grouped_value_and_grad(
      _local_embed_fn(embed_fn), global_loss_fn, chunk_size=chunk_size_per_device,
      loss_uses_rng=loss_uses_rng, keep_activations=keep_activations,
      loss_has_params=loss_has_params)

  def per_device(params, buckets, slots, labels, rng, loss_params, loss_inputs):
    loss, grads = local_value_and_grad(params, buckets, (slots, labels, *loss_inputs), rng,
                                       loss_params)
    return loss, _sum_model_grads(grads, loss_has_params)

  data, full = PartitionSpec(DATA_AXIS), PartitionSpec()
  mapped = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(full, data, data, data, full, full, full),
                         out_specs=(full, full), check_vma=False)

  def step_fn(params, batch: megabatch.BucketedBatch, labels, rng=None, *, loss_params=None,
              loss_inputs=()):
    buckets = megabatch.check_bucketed_batch(batch, labels)
    for bucket in buckets:
      check_batch_layout(_batch_size_of(bucket), chunk_size_per_device, num_devices)
    check_batch_layout(len(labels), 1, num_devices)
    return mapped(params, buckets, batch.slots, labels, rng, loss_params, tuple(loss_inputs))

  return step_fn


def _sum_model_grads(grads: PyTree, loss_has_params: bool) -> PyTree:
  """The model's gradients summed over the devices (each holds its rows' share); the loss's
  parameters' gradients, already whole on every device, as they are."""
  if not loss_has_params:
    return jax.lax.psum(grads, DATA_AXIS)
  model_grads, loss_param_grads = grads
  return jax.lax.psum(model_grads, DATA_AXIS), loss_param_grads


def _batch_size_of(images: Any) -> int | None:
  leaves = jax.tree.leaves(images)
  return np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else None


def make_sharded_train_step(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    chunk_size_per_device: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    bucketed: bool = False,
    loss_has_params: bool = False,
    loss_optimizer: optax.GradientTransformation | None = None,
    with_memory: bool = False,
    memory_start_step: int = 0,
) -> Callable[..., tuple[train_step_lib.TrainState, dict[str, jax.Array]]]:
  """Builds the data-parallel `train_step(state, images, labels, rng) -> (state, metrics)`.

  The contract of `train_step.make_train_step` (jitted, `state` donated, the same metrics) on a
  mesh: `state` replicated (`make_sharded_state`), `images` and `labels` global arrays sharded
  along their leading axis (`global_batch`), `rng` a key identical on every process. The new
  state and the metrics come back replicated. Loss, gradients and update equal the
  single-device step on the whole batch, up to float rounding (see `sharded_value_and_grad`).

  Args:
    embed_fn, loss_fn, optimizer, loss_uses_rng: as in `train_step.make_train_step`.
    mesh: the data mesh (`data_mesh()`).
    chunk_size_per_device: images per device per chunk (bounds each device's activation
      memory); the global batch must be divisible by it x the number of devices.
    bucketed: `images` is a `megabatch.BucketedBatch` (whole images in aspect buckets;
      `sharded_bucketed_value_and_grad`); it compiles once per set of bucket sizes.
    loss_has_params, loss_optimizer, with_memory, memory_start_step: as in
      `train_step.make_train_step`; the loss's parameters and the memory are replicated, and
      every device updates its copy identically from the replicated loss gradient and the
      gathered embeddings.

  Raises:
    ConfigError: at trace time, before compiling, for a batch that does not fit the layout.
  """
  stateful = loss_has_params or with_memory
  if stateful:
    loss_fn = train_step_lib.stateful_loss(loss_fn, has_params=loss_has_params,
                                           with_memory=with_memory)
  make = sharded_bucketed_value_and_grad if bucketed else sharded_value_and_grad
  value_and_grad = make(embed_fn, loss_fn, mesh, chunk_size_per_device=chunk_size_per_device,
                        loss_uses_rng=loss_uses_rng, keep_activations=keep_activations,
                        loss_has_params=stateful)
  train_step = train_step_lib.make_update(value_and_grad, optimizer, stateful=stateful,
                                          loss_optimizer=loss_optimizer,
                                          memory_start_step=memory_start_step)
  return jax.jit(train_step, donate_argnums=0, out_shardings=replicated(mesh))
