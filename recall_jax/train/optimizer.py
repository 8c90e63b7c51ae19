"""The optimizer and learning-rate schedule of a config, as in the official code.

Serves both tasks. A loss with learned parameters (proxies) gets its own optimizer of the same
kind, schedule shape and weight decay, at its own learning rate (`loss_param_optimizer`).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


# The Proxy-Anchor paper trains its proxies 100 times faster than the network.
DEFAULT_PARAM_LEARNING_RATE_RATIO = 100.0


def learning_rate_schedule(c: ml_collections.ConfigDict, steps_per_epoch: int, *,
                           learning_rate: float | None = None) -> optax.Schedule:
  """Step decay per epoch: the rate is multiplied by `decay` at each milestone epoch.

  Args:
    c: the experiment config (`optimizer.learning_rate`, `.milestones` in epochs, `.decay`).
    steps_per_epoch: optimizer steps per epoch.
    learning_rate: the peak rate; default `optimizer.learning_rate`.

  Returns:
    step -> learning rate; constant within an epoch, as PyTorch's MultiStepLR stepped per epoch,
    after an optional linear warm-up over `optimizer.warmup_steps` steps (0 in the paper).
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  steps = optax.piecewise_constant_schedule(
      c.optimizer.learning_rate if learning_rate is None else learning_rate,
      {int(m) * steps_per_epoch: c.optimizer.decay for m in c.optimizer.milestones})
  warmup = int(c.optimizer.get("warmup_steps", 0))
  if warmup <= 0:
    return steps
  # Linear warm-up from 0: Adam's first steps move every weight by about the full rate, which
  # from scratch throws the embeddings back into one direction (see configs/omniglot.py).
  return lambda step: steps(step) * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(c: ml_collections.ConfigDict, steps_per_epoch: int, *,
                   learning_rate: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The config's optimizer, with one learning rate and weight decay for every parameter.

  * `adam`: L2 regularisation as PyTorch's `Adam(weight_decay=...)`: `weight_decay * param` is
    added to the gradient before the Adam moments.
  * `adamw`: decoupled weight decay (`optax.adamw`, PyTorch's `AdamW`).
  * `sgd`: momentum 0.9 with L2 added to the gradient.

  Args:
    c: the experiment config (`optimizer.*`).
    steps_per_epoch: optimizer steps per epoch.
    learning_rate: the peak rate; default `optimizer.learning_rate`.

  Returns:
    (optimizer, schedule).
  """
  schedule = learning_rate_schedule(c, steps_per_epoch, learning_rate=learning_rate)
  name, wd = c.optimizer.name, c.optimizer.weight_decay
  if name == "adam":
    tx = optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, adamw, sgd")
  return tx, schedule


def loss_param_learning_rate(c: ml_collections.ConfigDict) -> float:
  """The peak learning rate of a loss's own parameters: `loss.param_learning_rate`, else
  `DEFAULT_PARAM_LEARNING_RATE_RATIO` x `optimizer.learning_rate`."""
  rate = c.loss.get("param_learning_rate")
  if rate is None:
    return DEFAULT_PARAM_LEARNING_RATE_RATIO * c.optimizer.learning_rate
  return float(rate)


def loss_param_optimizer(c: ml_collections.ConfigDict,
                         steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer of a loss's learned parameters (proxies, class weights): the config's kind,
  milestones, warm-up and weight decay at `loss_param_learning_rate(c)`."""
  optimizer, _ = make_optimizer(c, steps_per_epoch, learning_rate=loss_param_learning_rate(c))
  return optimizer
