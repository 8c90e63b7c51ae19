"""cub200 / resnet50: the paper's row (official hyper-parameters).

B = 400 (m = 4), chunk 100 (the official code's; on a modern GPU pick the fastest that fits), Adam
(L2 added to the gradient before Adam), lr 0.0001, weight decay 4e-4 on all parameters, 40 epochs,
lr x0.3 at epochs 10, 20, 30. Paper: CUB-200, ResNet-50.

  python -m recall_jax.main --config configs/cub_resnet.py --workdir runs/cub_resnet
  python -m recall_jax.main --config configs/cub_resnet.py:smoke --workdir /tmp/cub_resnet

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "cub200", "resnet50", batch_size=400, chunk_size=100, optimizer="adam", learning_rate=0.0001,
      epochs=40, milestones=(10, 20, 30))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
