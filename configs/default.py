"""The defaults, unchanged: every key, with a one-line comment, is listed in
`recall_jax.config.base_config` (the paper's shared hyper-parameters, SOP with ViT-B/16).

The paper rows (`sop_vit.py`, `cars_resnet.py`, ...) and the demo (`omniglot.py`) start from the
same defaults and change a few keys. Any key can be overridden on the command line, e.g.
`--config.batch_size=2000 --config.loss.smooth_ap.temperature=0.05`.

  python -m recall_jax.main --config configs/default.py --workdir runs/default
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
