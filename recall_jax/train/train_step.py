"""A jitted optimiser step on exact mega-batch gradients (`megabatch_value_and_grad` + optax)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

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
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
  """A step-0 `TrainState` for `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def make_train_step(
    embed_fn: megabatch.EmbedFn,
    loss_fn: megabatch.LossFn,
    optimizer: optax.GradientTransformation,
    *,
    chunk_size: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, images, labels, rng) -> (state, metrics)`, jitted, state donated.

  Args:
    embed_fn, loss_fn, chunk_size, loss_uses_rng: as in `megabatch.megabatch_value_and_grad`.
    optimizer: any optax transformation (e.g. `optax.adamw`, chained with clipping).

  Returns:
    `train_step(state: TrainState, images (B, ...), labels (B,), rng=None)`. `state` is donated:
    its buffers are reused for the new state, so do not touch the old one afterwards. `rng` is
    the step's key (dropout per chunk, SiMix); pass a fresh one each step, e.g.
    `jax.random.fold_in(base_key, step)`. Metrics are float32 scalars: 'loss', 'grad_norm' (global
    L2 norm of the gradients), 'update_norm' and 'param_norm' (after the update).
    Bad input (B not divisible by `chunk_size`, labels/images length mismatch) raises ValueError
    while tracing, before anything is compiled.
  """
  value_and_grad = megabatch.megabatch_value_and_grad(
      embed_fn, loss_fn, chunk_size=chunk_size, loss_uses_rng=loss_uses_rng,
      keep_activations=keep_activations)

  def train_step(state: TrainState, images: Any, labels: jax.Array,
                 rng: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    loss, grads = value_and_grad(state.params, images, labels, rng)
    return apply_gradients(state, loss, grads, optimizer)

  return jax.jit(train_step, donate_argnums=0)


def apply_gradients(state: TrainState, loss: jax.Array, grads: PyTree,
                    optimizer: optax.GradientTransformation
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of `state` with `grads`; returns the new state and float32 metrics
  'loss', 'grad_norm', 'update_norm' and 'param_norm' (after the update)."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm, update_norm, param_norm = _global_norms(grads, updates, params)
  metrics = {
      "loss": loss.astype(jnp.float32),
      "grad_norm": grad_norm.astype(jnp.float32),
      "update_norm": update_norm.astype(jnp.float32),
      "param_norm": param_norm.astype(jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


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
