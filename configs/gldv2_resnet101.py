"""gldv2_clean / resnet101: the landmark-retrieval recipe on Google Landmarks v2 (clean).

The GLDv1 recipe (configs/gldv1_resnet101.py) unchanged, trained on GLDv2-clean: ResNet-101 ->
GeM -> L2 -> 2048 x 2048 whitening FC -> L2, 1024 px aspect buckets, 4,096 = 1,024 landmarks x 4
images, Adam lr 1e-4, 500 steps; ROxford5k and RParis6k (Medium and Hard), multi-scale. Published
for comparison (AP-GeM ResNet-101, single-scale): ROxford M/H 67.1 / 42.3, RParis M/H
80.3 / 60.9 mAP; not reproduced here. See docs/landmarks_model.md.

  python -m recall_jax.main --config configs/gldv2_resnet101.py --workdir runs/gldv2_resnet101 \
      --config.model.pretrained=resnet101.safetensors --mode whiten --output whiten.npz
  python -m recall_jax.main --config configs/gldv2_resnet101.py --workdir runs/gldv2_resnet101 \
      --config.model.pretrained=resnet101.safetensors --config.model.whitening_init=whiten.npz
  python -m recall_jax.main --config configs/gldv2_resnet101.py:smoke --workdir /tmp/gldv2
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.paper_config(
      "gldv2_clean", "resnet101_landmark", batch_size=4096, chunk_size=16, optimizer="adam",
      learning_rate=1e-4, epochs=1000, milestones=())
  c.max_steps = 500  # The recipe counts steps, not epochs.
  c.model.embedding_dim = 2048  # D x D whitening FC.
  # .npz from `--mode whiten` (learned or PCA) written into the FC before training.
  c.model.whitening_init = None
  c.data.image_size = 1024  # longer side; no crop
  c.data.resize_size = 1024
  c.data.aspect_buckets = 4  # short-side steps per orientation (data.aspect_buckets.bucket_shapes)
  c.data.test_splits = ()
  c.data.distractors = None  # "revisitop1m": the 1M distractors added to each database
  c.eval.datasets = ("roxford5k", "rparis6k")
  c.eval.protocols = ("medium", "hard")
  c.eval.scales = (1.0, 2**-0.5, 2**0.5)
  c.eval.whitening = None  # test-time .npz
  c.eval.qe_k, c.eval.qe_alpha = 0, 3.0  # alpha query expansion (0: off)
  c.eval.dba_k, c.eval.dba_alpha = 0, 3.0  # database-side augmentation (0: off)
  c.eval_every_epochs = 1000  # evaluate at the end
  c.best_metric = "roxford5k/medium/map"
  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
    c.model.name = "resnet_tiny_landmark_test"
    c.data.image_size = c.data.resize_size = 64
    c.batch_size, c.chunk_size = 16, 8  # 4 landmarks x 4 images
    c.loss.recall_at_k.k_values = (1, 2, 4, 8)  # k < B - 1
    c.epochs = c.max_steps = c.eval_every_epochs = 2  # 2 steps, then the evaluation
    c.num_grid_queries = 0  # the revisited evaluation draws no retrieval grid
  return c
