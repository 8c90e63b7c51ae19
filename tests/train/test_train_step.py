"""`make_train_step`: mega-batch gradients + optax, jitted with the state donated.

Serves both tasks.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recall_jax.losses.recall_at_k import recall_at_k_surrogate
from recall_jax.train.train_step import TrainState
from recall_jax.train.train_step import apply_gradients
from recall_jax.train.train_step import init_train_state
from recall_jax.train.train_step import make_train_step

# XLA:CPU compiles several times faster with LLVM's expensive passes off; results are unchanged.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
NUM_CLASSES, PER_CLASS, SIZE, DIM = 4, 4, 8, 8


def _problem():
  """A linear embedding of 8x8 grey uint8 images, 4 noisy prototypes per batch of 16."""
  rng = np.random.default_rng(0)
  prototypes = rng.uniform(0, 255, size=(NUM_CLASSES, SIZE, SIZE, 1))
  labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
  noise = rng.normal(0, 60, size=(len(labels), SIZE, SIZE, 1))
  images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
  params = {"w": jnp.asarray(rng.normal(0, 0.05, size=(SIZE * SIZE, DIM)), jnp.float32),
            "b": jnp.zeros((DIM,), jnp.float32)}

  def embed_fn(p, x, key):
    e = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0 @ p["w"] + p["b"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  loss_fn = functools.partial(recall_at_k_surrogate, k_values=(1, 2, 4),
                              max_positives=PER_CLASS - 1, tau2=0.05)
  return embed_fn, loss_fn, params, jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def test_train_step_matches_manual_update_and_reduces_loss():
  embed_fn, loss_fn, params, images, labels = _problem()
  optimizer = optax.adam(0.05)
  train_step = make_train_step(embed_fn, loss_fn, optimizer, chunk_size=4)
  state = init_train_state(params, optimizer)
  assert isinstance(state, TrainState) and int(state.step) == 0
  compiled = train_step.lower(state, images, labels, None).compile(
      compiler_options=_FAST_COMPILE)

  # One step by hand: plain full-batch gradient, then the optimiser.
  def manual(p, opt_state):
    loss, grads = jax.value_and_grad(lambda q: loss_fn(embed_fn(q, images, None), labels))(p)
    updates, _ = optimizer.update(grads, opt_state, p)
    return loss, optax.tree.norm(grads), optax.apply_updates(p, updates)

  ref_loss, ref_grad_norm, ref_params = jax.jit(manual)(params, state.opt_state)

  old = state
  state, metrics = compiled(state, images, labels, None)
  # The old state was donated: its buffers now belong to the new state.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
  assert int(state.step) == 1
  assert set(metrics) == {"loss", "grad_norm", "update_norm", "param_norm"}
  chex.assert_trees_all_close((metrics["loss"], metrics["grad_norm"]), (ref_loss, ref_grad_norm),
                              rtol=1e-5)
  chex.assert_trees_all_close(state.params, ref_params, rtol=1e-5, atol=1e-6)

  losses = [float(metrics["loss"])]
  for _ in range(7):
    state, metrics = compiled(state, images, labels, None)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 8
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.05, losses


def test_train_step_rejects_bad_batches_while_tracing():
  embed_fn, loss_fn, params, images, labels = _problem()
  optimizer = optax.sgd(0.1)
  train_step = make_train_step(embed_fn, loss_fn, optimizer, chunk_size=5)
  state = init_train_state(params, optimizer)
  with pytest.raises(ValueError, match="batch size 16 is not divisible by chunk_size 5"):
    train_step.lower(state, images, labels, None)
  train_step = make_train_step(embed_fn, loss_fn, optimizer, chunk_size=4)
  with pytest.raises(ValueError, match="16 images but 15 labels"):
    train_step.lower(state, images, labels[:15], None)


class ApplyGradientsTest(chex.TestCase):
  """`apply_gradients` is optax's update with metrics, the same inside and outside `jit`."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_optax_update(self):
    _, _, params, _, _ = _problem()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    optimizer = optax.adamw(0.01, weight_decay=0.1)
    state = init_train_state(params, optimizer)
    new_state, metrics = self.variant(apply_gradients, static_argnums=3)(
        state, jnp.float32(0.5), grads, optimizer)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    expected = optax.apply_updates(params, updates)
    # jit fuses the update (float32 rounding ~1e-9 absolute on parameters ~1e-4).
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(new_state.opt_state, opt_state, rtol=1e-6)
    chex.assert_trees_all_close(
        metrics, {"loss": 0.5, "grad_norm": optax.tree.norm(grads),
                  "update_norm": optax.tree.norm(updates), "param_norm": optax.tree.norm(expected)},
        rtol=1e-6)
    assert int(new_state.step) == 1
