"""The data-parallel train step over every device of every host, with the single-device gradient.

Serves both tasks: one step builder whatever the input layout (square crops as one image array,
or whole images in aspect buckets as a `megabatch.BucketedBatch`).

The RS@k loss is a function of the whole (global) mega-batch, so N devices must give the same
gradient as one device holding the whole batch. The recipe, in JAX's global-array view:

* one mesh axis, `data`, over all devices of all processes (`recall_jax.parallel.data_mesh`,
  shared with evaluation);
* parameters and optimiser state replicated, and born that way (`make_sharded_state` runs
  `init_train_state` under `jit(out_shardings=...)`, so no host ever holds a full copy
  outside the devices); a cross-batch memory's rows are sharded along `data` like the batch
  (`state_shardings`), each device holding M / devices of them, and all-gathered inside the
  step for the loss, as the batch's embeddings are;
* the global batch sharded along its leading axis; each process feeds only its contiguous slice
  (the sampler's `local_slice`) and `batch_assembly` assembles the global arrays;
* `sharded_value_and_grad` runs the two-pass `megabatch.grouped_value_and_grad` per device under
  `shard_map`: pass 1 and pass 2 only ever see the device's own chunk rows (the strided chunk
  layout makes device d's chunk c its share of global chunk c, so all devices work in every
  chunk and forming chunks moves no data); the embeddings and labels are all-gathered so SiMix
  and RS@k see the global batch; every device computes the same loss and dL/dE and keeps its
  own rows of dL/dE; the parameter gradients are accumulated locally and summed by ONE
  all-reduce at the end of the step.

Communication per step: one all-gather of the B x D embeddings (float32), one all-reduce of the
parameter gradients (and, with a memory, one all-gather of its M x D rows), and nothing per
chunk. See launch/README.md for the numbers.

Chunk size semantics: `chunk_size_per_device` is the number of images ONE device embeds and
back-propagates at once (what bounds its memory, as `config.chunk_size`); a chunk of the global
batch holds `chunk_size_per_device * num_devices` images. The global batch (every bucket, for
whole images) must be divisible by that product (`check_batch_layout`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from recall_jax import parallel
from recall_jax.train import cross_batch_memory
from recall_jax.train import megabatch
from recall_jax.train import train_step as train_step_lib
from recall_jax.batch_layout import check_batch_layout

PyTree = Any


def make_sharded_state(params: PyTree, optimizer: optax.GradientTransformation,
                       mesh: Mesh, *, loss_params: PyTree = None,
                       loss_optimizer: optax.GradientTransformation | None = None,
                       memory: Any = None) -> train_step_lib.TrainState:
  """A step-0 `TrainState` laid out over `mesh` as `state_shardings` says.

  Built under `jit(out_shardings=...)`, so each device receives its part directly. `params`
  must be identical on every process (same seed / same pretrained file). The loss's parameters
  are replicated like the model's (every device computes the same loss on the gathered
  embeddings); the memory's rows are sharded (M must be divisible by the device count).
  """
  init = functools.partial(train_step_lib.init_train_state, optimizer=optimizer,
                           loss_optimizer=loss_optimizer)
  shape = jax.eval_shape(init, params, loss_params=loss_params, memory=memory)
  return jax.jit(init, out_shardings=state_shardings(mesh, shape))(
      params, loss_params=loss_params, memory=memory)


def memory_shardings(mesh: Mesh) -> cross_batch_memory.MemoryState:
  """A memory's layout: its (M, D) embeddings and (M,) labels sharded along `data` (M / devices
  rows per device), its position and count replicated."""
  rows, full = parallel.row_sharding(mesh), parallel.replicated(mesh)
  return cross_batch_memory.MemoryState(embeddings=rows, labels=rows, position=full, count=full)


def state_shardings(mesh: Mesh, state: train_step_lib.TrainState) -> train_step_lib.TrainState:
  """The shardings of a train state (arrays or shapes): everything replicated but the memory's
  rows (`memory_shardings`).

  Raises:
    ValueError: the memory's M rows do not divide over the devices.
  """
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  if state.memory is None:
    return shardings
  size = state.memory.labels.shape[0]
  if size % mesh.devices.size:
    raise ValueError(f"a cross-batch memory of {size} rows does not divide over "
                     f"{mesh.devices.size} devices")
  return shardings.replace(memory=memory_shardings(mesh))


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
      rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
    return embed_fn(params, images_chunk, rng)
  return local_embed_fn


def _is_memory(x: Any) -> bool:
  return isinstance(x, cross_batch_memory.MemoryState)


def _whole_memory(local: cross_batch_memory.MemoryState, axis_name: str
                  ) -> cross_batch_memory.MemoryState:
  """A memory whose rows are sharded along `axis_name`, whole on every device (rows in device
  order, which is slot order); inside `shard_map` only. Constant: nothing flows back."""
  gather = lambda x: jax.lax.all_gather(jax.lax.stop_gradient(x), axis_name, tiled=True)
  return local._replace(embeddings=gather(local.embeddings), labels=gather(local.labels))


def _image_groups(images: Any, labels: Any) -> tuple[tuple[Any, ...], jax.Array | None]:
  """The step's groups of equally shaped images, and the slots that put their rows in batch
  order (None: one group already in batch order)."""
  if isinstance(images, megabatch.BucketedBatch):
    return megabatch.check_bucketed_batch(images, labels), images.slots
  rows = megabatch.rows_of(images)
  if np.ndim(labels) != 1 or np.shape(labels)[0] != rows:
    raise ValueError(f"labels must have shape ({rows},), got {np.shape(labels)}")
  return (images,), None


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
  """The data-parallel, exact mega-batch `value_and_grad`, for square crops or aspect buckets.

  Each device runs `megabatch.grouped_value_and_grad` on its own rows (`shard_map`): pass 1
  embeds its chunks of every group (the one image array, or each aspect bucket), each group's
  embeddings are all-gathered (device order is row order) so the loss (and SiMix) see the global
  (B, D) batch (for buckets: concatenated and indexed by the gathered slots), every device
  computes the same loss and dL/dE and keeps its own rows of dL/dE, pass 2 accumulates its
  parameter gradients locally, and ONE all-reduce (`psum`) sums them over the devices at the
  end. The result equals `megabatch.megabatch_value_and_grad` (or `bucketed_value_and_grad`)
  with `chunk_size=chunk_size_per_device * devices` on one device, up to float rounding.

  Dropout: chunk c's key is folded with the device index, so devices draw independent masks for
  their rows (with one key per chunk they would repeat each other's masks). Models without
  dropout give the single-device result exactly; with dropout the masks (not their statistics)
  depend on the device count.

  Loss parameters (`loss_has_params`: proxies): every device computes the same loss on the
  gathered embeddings, so each already holds their whole gradient; it is taken as it is (a psum
  would multiply it by the device count). `loss_inputs` are replicated, except a memory
  (`cross_batch_memory.MemoryState`), whose rows are sharded along `data` and all-gathered
  before the loss (no gradient flows into them).

  Args:
    embed_fn, loss_fn, loss_uses_rng, keep_activations, loss_has_params: as in
      `megabatch.megabatch_value_and_grad`.
    mesh: the data mesh (`parallel.data_mesh()`).
    chunk_size_per_device: images one device embeds at once.

  Returns:
    `step_fn(params, images, labels, rng=None, *, loss_params=None, loss_inputs=()) ->
    (loss, grads)` to call under `jax.jit` (with `loss_has_params`, grads is the pair
    `(model grads, loss_params grads)`; `loss_params` and `loss_inputs` replicated):
    `images` a global (B, ...) array (or pytree) sharded along `data`, or a
    `megabatch.BucketedBatch` of such arrays (`batch_assembly.global_bucketed_batch`; it compiles
    once per set of bucket sizes); `labels` (B,); `params` replicated; loss and grads
    replicated. ConfigError (trace time) when B, or a bucket's slot count, is not divisible by
    `chunk_size_per_device` x devices.
  """
  num_devices = mesh.devices.size
  check_batch_layout(chunk_size_per_device * num_devices, chunk_size_per_device, num_devices)
  axis = parallel.DATA_AXIS

  def global_batch_loss(local_embeddings, own, local_labels, local_slots, *rest):
    gathered = [_gather_rows(e, axis) for e in local_embeddings]
    labels = jax.lax.all_gather(local_labels, axis, tiled=True)
    if local_slots is None:
      (embeddings,) = gathered
    else:
      embeddings = jnp.concatenate(gathered)[jax.lax.all_gather(local_slots, axis, tiled=True)]
    return loss_fn(embeddings, labels, *own, *rest)

  # The loss's own parameters, when it has some, come between the embeddings and the labels.
  global_loss_fn = (
      (lambda e, own, *args: global_batch_loss(e, (own,), *args)) if loss_has_params else
      (lambda e, *args: global_batch_loss(e, (), *args)))

  local_value_and_grad = megabatch.grouped_value_and_grad(
      _local_embed_fn(embed_fn), global_loss_fn, chunk_size=chunk_size_per_device,
      loss_uses_rng=loss_uses_rng, keep_activations=keep_activations,
      loss_has_params=loss_has_params)

  def per_device(params, groups, labels, slots, rng, loss_params, loss_inputs):
    loss_inputs = tuple(_whole_memory(x, axis) if _is_memory(x) else x for x in loss_inputs)
    loss, grads = local_value_and_grad(params, groups, (labels, slots, *loss_inputs), rng,
                                       loss_params)
    if not loss_has_params:
      return loss, jax.lax.psum(grads, axis)
    model_grads, loss_param_grads = grads  # the latter whole on every device already
    return loss, (jax.lax.psum(model_grads, axis), loss_param_grads)

  data, full = PartitionSpec(axis), PartitionSpec()
  memory_specs = jax.tree.map(lambda sharding: sharding.spec, memory_shardings(mesh))

  def step_fn(params, images, labels, rng=None, *, loss_params=None, loss_inputs=()):
    groups, slots = _image_groups(images, labels)
    for group in groups:
      check_batch_layout(megabatch.rows_of(group), chunk_size_per_device, num_devices)
    check_batch_layout(len(labels), 1, num_devices)
    loss_inputs = tuple(loss_inputs)
    input_specs = tuple(memory_specs if _is_memory(x) else full for x in loss_inputs)
    # check_vma=False: the loss is replicated by construction (same inputs on every device) and
    # the gradients by the psum; the vma type system cannot see the former.
    mapped = jax.shard_map(per_device, mesh=mesh,
                           in_specs=(full, data, data, data, full, full, input_specs),
                           out_specs=(full, full), check_vma=False)
    return mapped(params, groups, labels, slots, rng, loss_params, loss_inputs)

  return step_fn


def make_sharded_train_step(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    chunk_size_per_device: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
    loss_optimizer: optax.GradientTransformation | None = None,
    with_memory: bool = False,
    memory_start_step: int = 0,
) -> Callable[..., tuple[train_step_lib.TrainState, dict[str, jax.Array]]]:
  """Builds the data-parallel `train_step(state, images, labels, rng) -> (state, metrics)`.

  The contract of `train_step.make_train_step` (jitted, `state` donated, the same metrics) on a
  mesh: `state` replicated (`make_sharded_state`), `images` and `labels` global arrays sharded
  along their leading axis (`batch_assembly`), `rng` a key identical on every process. `images`
  may be a `megabatch.BucketedBatch` (whole images in aspect buckets). The new state and the
  metrics come back replicated (the memory's rows sharded, as `make_sharded_state` lays them
  out). Loss, gradients and update equal the single-device step on the
  whole batch, up to float rounding (see `sharded_value_and_grad`).

  Args:
    embed_fn, loss_fn, optimizer, loss_uses_rng: as in `train_step.make_train_step`.
    mesh: the data mesh (`parallel.data_mesh()`).
    chunk_size_per_device: images per device per chunk (bounds each device's activation
      memory); the global batch must be divisible by it x the number of devices.
    keep_activations: as in `megabatch.megabatch_value_and_grad`.
    loss_has_params, loss_optimizer, with_memory, memory_start_step: as in
      `train_step.make_train_step`; the loss's parameters are replicated and every device
      updates its copy identically from the replicated loss gradient; each device writes its
      own rows of the sharded memory from the gathered embeddings.

  Raises:
    ConfigError: at trace time, before compiling, for a batch that does not fit the layout.
  """
  stateful = loss_has_params or with_memory
  if stateful:
    loss_fn = train_step_lib.stateful_loss(loss_fn, has_params=loss_has_params,
                                           with_memory=with_memory)
  value_and_grad = sharded_value_and_grad(
      embed_fn, loss_fn, mesh, chunk_size_per_device=chunk_size_per_device,
      loss_uses_rng=loss_uses_rng, keep_activations=keep_activations, loss_has_params=stateful)
  train_step = train_step_lib.make_update(value_and_grad, optimizer, stateful=stateful,
                                          loss_optimizer=loss_optimizer,
                                          memory_start_step=memory_start_step)

  def laid_out_train_step(state, images, labels, rng=None):
    # The new state keeps the layout the state was born with (the memory's rows sharded).
    new_state, metrics = train_step(state, images, labels, rng)
    constrain = jax.lax.with_sharding_constraint
    return (constrain(new_state, state_shardings(mesh, new_state)),
            constrain(metrics, parallel.replicated(mesh)))

  return jax.jit(laid_out_train_step, donate_argnums=0)
