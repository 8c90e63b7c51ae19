"""Training: exact mega-batch gradients, the optimizer step, sharding, and the training loop.

Serves both tasks.
"""

from recall_jax.train.megabatch import megabatch_value_and_grad
from recall_jax.train.train_step import TrainState
from recall_jax.train.train_step import init_train_state
from recall_jax.train.train_step import make_train_step
