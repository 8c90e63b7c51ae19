"""inat2018 / resnet50: the paper's row (official hyper-parameters).

B = 4000 (m = 4), chunk 200 (the official code's; on a modern GPU pick the fastest that fits), Adam
(L2 added to the gradient before Adam), lr 0.0001, weight decay 4e-4 on all parameters, 90 epochs,
lr x0.3 at epochs 40, 70. Paper: iNaturalist-2018, ResNet-50.

  python -m recall_jax.main --config configs/inat_resnet.py --workdir runs/inat_resnet
  python -m recall_jax.main --config configs/inat_resnet.py:smoke --workdir /tmp/inat_resnet

The `:smoke` variant runs the same code paths in seconds.
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "inat2018", "resnet50", batch_size=4000, chunk_size=200, optimizer="adam",
      learning_rate=0.0001, epochs=90, milestones=(40, 70))
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
