"""cub200 / vit_b16: the paper's row (official hyper-parameters).

B = 400 (m = 4), chunk 100 (the official code's; on a modern GPU pick the fastest that fits), AdamW
(decoupled weight decay), lr 1e-05, weight decay 4e-4 on all parameters, 40 epochs, lr x0.3 at
epochs 10, 20, 30. Paper: CUB-200, ViT-B/16.

  python -m recall_jax.main --config configs/cub_vit.py --workdir runs/cub_vit
  python -m recall_jax.main --config configs/cub_vit.py:smoke --workdir /tmp/cub_vit

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "cub200", "vit_b16", batch_size=400, chunk_size=100, optimizer="adamw", learning_rate=1e-05,
      epochs=40, milestones=(10, 20, 30))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
