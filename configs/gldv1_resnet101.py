"""gldv1 / resnet101: the landmark-retrieval recipe (RS@k on Google Landmarks v1).

ResNet-101 (ImageNet weights, frozen BatchNorm) -> GeM (p = 3, learnable) -> L2 -> 2048 x 2048
whitening FC (initialised from a whitening learned on the pretrained descriptors) -> L2. Images
at 1024 px (longer side, aspect ratio kept, padded into aspect buckets); mega-batches of 4,096 =
1,024 landmarks x 4 images (landmarks with fewer than 4 images are skipped), Adam lr 1e-4,
500 steps. Evaluated on ROxford5k and RParis6k (Medium and Hard), multi-scale (1, 1/sqrt(2),
sqrt(2)). Published for comparison (average-precision training with the same backbone, AP-GeM
ResNet-101 trained on Landmarks-clean, single-scale, PCA whitening of power 0.25 learned on its
training set): ROxford M/H 67.1 / 42.3, RParis M/H 80.3 / 60.9 mAP; not reproduced here. The
argument `apgem_eval` evaluates that way (one scale; `--mode whiten` then learns that PCA
whitening on the training set, for `eval.whitening`). See docs/landmarks_model.md.

  python -m recall_jax.main --config configs/gldv1_resnet101.py --workdir runs/gldv1_resnet101 \
      --config.model.pretrained=resnet101.safetensors --mode whiten --output whiten.npz \
      --config.eval.whitening_target=fc_init
  python -m recall_jax.main --config configs/gldv1_resnet101.py --workdir runs/gldv1_resnet101 \
      --config.model.pretrained=resnet101.safetensors --config.model.whitening_init=whiten.npz
  python -m recall_jax.main --config configs/gldv1_resnet101.py:apgem_eval \
      --workdir runs/gldv1_resnet101 --mode whiten --output runs/gldv1_resnet101/pca.npz
  python -m recall_jax.main --config configs/gldv1_resnet101.py:apgem_eval \
      --workdir runs/gldv1_resnet101 --mode eval \
      --config.eval.whitening=runs/gldv1_resnet101/pca.npz
  python -m recall_jax.main --config configs/gldv1_resnet101.py:smoke --workdir /tmp/gldv1
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  return config_lib.landmark_config("gldv1", arg)
