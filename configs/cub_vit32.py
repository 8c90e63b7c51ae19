"""cub200 / vit_b32: the paper's row (official hyper-parameters).

B = 400 (m = 4), chunk 100 (the official code's; on a modern GPU pick the fastest that fits), AdamW
(decoupled weight decay), lr 3e-05, weight decay 4e-4 on all parameters, 40 epochs, lr x0.3 at
epochs 10, 20, 30. Paper: CUB-200, ViT-B/32.

  python -m recall_jax.main --config configs/cub_vit32.py --workdir runs/cub_vit32
  python -m recall_jax.main --config configs/cub_vit32.py:smoke --workdir /tmp/cub_vit32

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "cub200", "vit_b32", batch_size=400, chunk_size=100, optimizer="adamw", learning_rate=3e-05,
      epochs=40, milestones=(10, 20, 30))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
