"""cars196 / resnet50: the paper's row (official hyper-parameters).

B = 392 (m = 4), chunk 98 (the official code's; on a modern GPU pick the fastest that fits), Adam
(L2 added to the gradient before Adam), lr 0.0001, weight decay 4e-4 on all parameters, 170 epochs,
lr x0.3 at epochs 80, 140. Paper: CARS196 R@1/2/4/8 80.7 / 88.3 / 92.8 / 95.7 (ResNet-50, no SiMix).

  python -m recall_jax.main --config configs/cars_resnet.py --workdir runs/cars_resnet
  python -m recall_jax.main --config configs/cars_resnet.py:smoke --workdir /tmp/cars_resnet

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "cars196", "resnet50", batch_size=392, chunk_size=98, optimizer="adam", learning_rate=0.0001,
      epochs=170, milestones=(80, 140))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
