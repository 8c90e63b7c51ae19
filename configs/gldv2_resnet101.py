"""gldv2_clean / resnet101: the landmark-retrieval recipe on Google Landmarks v2 (clean).

The GLDv1 recipe (configs/gldv1_resnet101.py) unchanged, trained on GLDv2-clean: ResNet-101 ->
GeM -> L2 -> 2048 x 2048 whitening FC -> L2, 1024 px aspect buckets, 4,096 = 1,024 landmarks x 4
images, Adam lr 1e-4, 500 steps; ROxford5k and RParis6k (Medium and Hard), multi-scale. Published
for comparison (AP-GeM ResNet-101 on Landmarks-clean, single-scale, PCA whitening of power 0.25):
ROxford M/H 67.1 / 42.3, RParis M/H 80.3 / 60.9 mAP; not reproduced here. The argument
`apgem_eval` evaluates that way. See docs/landmarks_model.md.

  python -m recall_jax.main --config configs/gldv2_resnet101.py --workdir runs/gldv2_resnet101 \
      --config.model.pretrained=resnet101.safetensors --mode whiten --output whiten.npz \
      --config.eval.whitening_target=fc_init
  python -m recall_jax.main --config configs/gldv2_resnet101.py --workdir runs/gldv2_resnet101 \
      --config.model.pretrained=resnet101.safetensors --config.model.whitening_init=whiten.npz
  python -m recall_jax.main --config configs/gldv2_resnet101.py:apgem_eval \
      --workdir runs/gldv2_resnet101 --mode whiten --output runs/gldv2_resnet101/pca.npz
  python -m recall_jax.main --config configs/gldv2_resnet101.py:apgem_eval \
      --workdir runs/gldv2_resnet101 --mode eval \
      --config.eval.whitening=runs/gldv2_resnet101/pca.npz
  python -m recall_jax.main --config configs/gldv2_resnet101.py:smoke --workdir /tmp/gldv2
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  return config_lib.landmark_config("gldv2_clean", arg)
