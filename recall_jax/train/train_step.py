"""A jitted optimiser step on exact mega-batch gradients (`megabatch_value_and_grad` + optax).

Serves both tasks. Besides the model, the state may carry what a loss keeps from step to step:
learned parameters of the loss (ProxyAnchor's proxies, normalized softmax's class weights), with
their own optimizer, and a cross-batch memory (`cross_batch_memory`) for the pair-based losses.

The memory is filled with the batch's embeddings from the first pass of the step. The mega-batch
core returns gradients only, so the step reads them as one: the loss is given a zero (B, D)
"probe" and adds `sum(stop_gradient(E) * probe)`, which is 0 (the loss's value is unchanged) and
whose gradient with respect to the probe is E itself, exactly, at no extra pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from recall_jax.train import cross_batch_memory
from recall_jax.train import megabatch

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """What changes from step to step.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: the trainable parameters (only these are differentiated; frozen collections such as
      BatchNorm running statistics belong in `embed_fn`'s closure).
    opt_state: the optax optimiser state of `params`.
    loss_params: the loss's own learned parameters (e.g. (C, D) proxies); None for a loss
      without.
    loss_opt_state: the optax state of `loss_params` (their own optimizer); None without.
    memory: the cross-batch memory (`cross_batch_memory.MemoryState`); None when off.
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  loss_params: PyTree = None
  loss_opt_state: optax.OptState = None
  memory: cross_batch_memory.MemoryState | None = None


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                     loss_params: PyTree = None,
                     loss_optimizer: optax.GradientTransformation | None = None,
                     memory: cross_batch_memory.MemoryState | None = None) -> TrainState:
  """A step-0 `TrainState` for `params` (and the loss's parameters and memory, when given).

  Raises:
    ValueError: `loss_params` without `loss_optimizer`.
  """
  if loss_params is not None and loss_optimizer is None:
    raise ValueError("loss_params need their own optimizer (loss_optimizer)")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), loss_params=loss_params,
                    loss_opt_state=(None if loss_params is None
                                    else loss_optimizer.init(loss_params)),
                    memory=memory)


def stateful_loss(loss_fn: megabatch.LossFn, *, has_params: bool,
                  with_memory: bool) -> megabatch.LossFn:
  """`loss_fn` in the form the mega-batch step takes with `loss_has_params=True`.

  Args:
    loss_fn: with `has_params`, `loss_fn(embeddings, labels, loss_params, ...)`; with
      `with_memory`, the query/database form `loss_fn(embeddings, labels, [loss_params,]
      database, database_labels, [rng,] *, database_valid)`; the step's key (SiMix) last.
    has_params: the loss has learned parameters of its own.
    with_memory: the loss ranks the batch against the batch plus a cross-batch memory.

  Returns:
    `fn(embeddings (B, D), labels (B,), (loss_params, probe), [memory,] [rng])`: `loss_params`
    None without parameters, `probe` a (B, D) zero array with a memory (None without), whose
    gradient is the batch's embeddings (module docstring).
  """
  def fn(embeddings, labels, differentiated, *rest):
    own, probe = differentiated
    args, keywords = ((own,) if has_params else ()), {}
    if with_memory:
      memory, *rest = rest
      database, database_labels, database_valid = cross_batch_memory.database(
          memory, embeddings, labels)
      args += (database, database_labels)
      keywords["database_valid"] = database_valid
    loss = loss_fn(embeddings, labels, *args, *rest, **keywords)
    if with_memory:
      read_out = jnp.sum(jax.lax.stop_gradient(embeddings).astype(probe.dtype) * probe)
      loss = loss + read_out.astype(loss.dtype)
    return loss

  return fn


def make_update(value_and_grad: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                stateful: bool, loss_optimizer: optax.GradientTransformation | None = None,
                memory_start_step: int = 0) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step(state, images, labels, rng=None) -> (state, metrics)` around a value-and-grad.

  Args:
    value_and_grad: a mega-batch `step_fn` (single-device or sharded); built with
      `loss_has_params=True` around `stateful_loss` exactly when `stateful`.
    optimizer: the model's optimizer.
    stateful: the loss has parameters or a memory (then read from `state`).
    loss_optimizer: the optimizer of `state.loss_params` (when the state holds any).
    memory_start_step: the memory is written from this step on (before it, it stays empty, so
      the loss meets only the batch); the loss meets a step's rows from the next step.

  Returns:
    The step, not jitted (callers jit it with their shardings).
  """
  def train_step(state: TrainState, images: Any, labels: jax.Array, rng: jax.Array | None = None):
    if not stateful:
      loss, grads = value_and_grad(state.params, images, labels, rng)
      return apply_gradients(state, loss, grads, optimizer)
    memory = state.memory
    probe = (None if memory is None else
             jnp.zeros((labels.shape[0], memory.embeddings.shape[1]), memory.embeddings.dtype))
    loss, (grads, (loss_grads, embeddings)) = value_and_grad(
        state.params, images, labels, rng, loss_params=(state.loss_params, probe),
        loss_inputs=() if memory is None else (memory,))
    new_state, metrics = apply_gradients(state, loss, grads, optimizer)
    if state.loss_params is not None:
      updates, loss_opt_state = loss_optimizer.update(loss_grads, state.loss_opt_state,
                                                      state.loss_params)
      new_state = new_state.replace(loss_params=optax.apply_updates(state.loss_params, updates),
                                    loss_opt_state=loss_opt_state)
      metrics["loss_param_grad_norm"] = optax.tree.norm(loss_grads).astype(jnp.float32)
    if memory is not None:
      written = cross_batch_memory.update(memory, embeddings, labels)
      started = state.step >= memory_start_step
      new_state = new_state.replace(memory=jax.tree.map(
          lambda new, old: jnp.where(started, new, old), written, memory))
    return new_state, metrics

  return train_step


def make_train_step(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    optimizer: optax.GradientTransformation,
    *,
    chunk_size: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
    loss_optimizer: optax.GradientTransformation | None = None,
    with_memory: bool = False,
    memory_start_step: int = 0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, images, labels, rng) -> (state, metrics)`, jitted, state donated.

  Args:
    embed_fn, loss_fn, chunk_size, loss_uses_rng: as in `megabatch.megabatch_value_and_grad`;
      with parameters or a memory, `loss_fn` as `stateful_loss` takes it.
    optimizer: any optax transformation (e.g. `optax.adamw`, chained with clipping).
    loss_has_params: the loss has learned parameters (`state.loss_params`), updated by
      `loss_optimizer`.
    with_memory: the loss ranks the batch against batch + `state.memory`, which the step then
      fills (`make_update`, `memory_start_step`).

  Returns:
    `train_step(state: TrainState, images (B, ...), labels (B,), rng=None)`. `state` is donated:
    its buffers are reused for the new state, so do not touch the old one afterwards. `rng` is
    the step's key (dropout per chunk, SiMix); pass a fresh one each step, e.g.
    `jax.random.fold_in(base_key, step)`. Metrics are float32 scalars: 'loss', 'grad_norm' (global
    L2 norm of the gradients), 'update_norm' and 'param_norm' (after the update), and
    'loss_param_grad_norm' for a loss with parameters.
    Bad input (B not divisible by `chunk_size`, labels/images length mismatch) raises ValueError
    while tracing, before anything is compiled.
  """
  stateful = loss_has_params or with_memory
  if stateful:
    loss_fn = stateful_loss(loss_fn, has_params=loss_has_params, with_memory=with_memory)
  value_and_grad = megabatch.megabatch_value_and_grad(
      embed_fn, loss_fn, chunk_size=chunk_size, loss_uses_rng=loss_uses_rng,
      keep_activations=keep_activations, loss_has_params=stateful)
  train_step = make_update(value_and_grad, optimizer, stateful=stateful,
                           loss_optimizer=loss_optimizer, memory_start_step=memory_start_step)
  return jax.jit(train_step, donate_argnums=0)


def apply_gradients(state: TrainState, loss: jax.Array, grads: PyTree,
                    optimizer: optax.GradientTransformation
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of `state.params` with `grads`; returns the new state (the loss's
  parameters and memory as they were) and float32 metrics 'loss', 'grad_norm', 'update_norm'
  and 'param_norm' (after the update)."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm, update_norm, param_norm = _global_norms(grads, updates, params)
  metrics = {
      "loss": loss.astype(jnp.float32),
      "grad_norm": grad_norm.astype(jnp.float32),
      "update_norm": update_norm.astype(jnp.float32),
      "param_norm": param_norm.astype(jnp.float32),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _global_norms(*trees: PyTree) -> tuple[jax.Array, ...]:
  """`optax.tree.norm` of each of several trees of one structure, summed in each leaf's dtype.

  One variadic reduction per leaf instead of one per leaf and tree: XLA then emits a third of the
  reduction kernels, which is most of the metrics' share of the step's compile time.
  """
  sums = []
  for leaves in zip(*(jax.tree.leaves(tree) for tree in trees)):
    squares = tuple(jnp.square(x) for x in leaves)
    sums.append(jax.lax.reduce(squares, tuple(jnp.zeros((), x.dtype) for x in squares),
                               lambda a, b: tuple(x + y for x, y in zip(a, b)),
                               tuple(range(squares[0].ndim))))
  return tuple(jnp.sqrt(sum(leaf_sums)) for leaf_sums in zip(*sums))
