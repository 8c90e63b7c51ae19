"""sop / vit_b32: the paper's row (official hyper-parameters).

B = 4000 (m = 4), chunk 200 (the official code's; on a modern GPU pick the fastest that fits), AdamW
(decoupled weight decay), lr 5e-05, weight decay 4e-4 on all parameters, 55 epochs, lr x0.3 at
epochs 25, 50. Paper: SOP R@1 85.1 (ViT-B/32).

  python -m recall_jax.main --config configs/sop_vit32.py --workdir runs/sop_vit32
  python -m recall_jax.main --config configs/sop_vit32.py:smoke --workdir /tmp/sop_vit32

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "sop", "vit_b32", batch_size=4000, chunk_size=200, optimizer="adamw", learning_rate=5e-05,
      epochs=55, milestones=(25, 50))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
