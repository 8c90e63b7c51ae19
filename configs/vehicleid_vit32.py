"""vehicleid / vit_b32: the paper's row (official hyper-parameters).

B = 4000 (m = 4), chunk 200 (the official code's; on a modern GPU pick the fastest that fits), AdamW
(decoupled weight decay), lr 0.0001, weight decay 4e-4 on all parameters, 90 epochs, lr x0.3 at
epochs 40, 70. Paper: VehicleID, ViT-B/32.

  python -m recall_jax.main --config configs/vehicleid_vit32.py --workdir runs/vehicleid_vit32
  python -m recall_jax.main --config configs/vehicleid_vit32.py:smoke --workdir /tmp/vehicleid_vit32

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "vehicleid", "vit_b32", batch_size=4000, chunk_size=200, optimizer="adamw",
      learning_rate=0.0001, epochs=90, milestones=(40, 70))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
