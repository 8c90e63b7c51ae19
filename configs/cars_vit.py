"""cars196 / vit_b16: the paper's row (official hyper-parameters).

B = 392 (m = 4), chunk 98 (the official code's; on a modern GPU pick the fastest that fits), AdamW
(decoupled weight decay), lr 1e-05, weight decay 4e-4 on all parameters, 50 epochs, lr x0.3 at
epochs 20, 30, 40. Paper: CARS196, ViT-B/16.

  python -m recall_jax.main --config configs/cars_vit.py --workdir runs/cars_vit
  python -m recall_jax.main --config configs/cars_vit.py:smoke --workdir /tmp/cars_vit

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "cars196", "vit_b16", batch_size=392, chunk_size=98, optimizer="adamw", learning_rate=1e-05,
      epochs=50, milestones=(20, 30, 40))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
