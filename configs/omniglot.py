"""The default demo: RS@k on Omniglot from scratch, evaluated on the 20 held-out alphabets.

Trains a small CNN (its last feature map flattened, not averaged) on the 964 characters of the 30
background alphabets, each at 4 quarter-turns as 4 classes, with mega-batches of 1,000 images
(250 classes x m = 4) and evaluates Recall@1/2/4/8 (each of the 13,180 evaluation images querying
the others) on the 659 characters of the 20 evaluation alphabets. Expected result and timing:
the README; how the recipe was chosen: benchmarks/README.md.

  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot
  python -m recall_jax.main --config configs/omniglot.py:smoke --workdir /tmp/omniglot  # seconds
"""

from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.name = "omniglot"
  c.data.image_size = 28
  c.data.resize_size = 28
  c.data.channels = 1
  # Characters: a flipped character is another character, and so is a turned one: each of the 4
  # quarter-turns of a training character is a class of its own (3,856 classes, as Vinyals et al.
  # 2016 and Snell et al. 2017 train), so 3 epochs see each image 3 times per turn. Strokes fill
  # the frame, so crops are left off.
  c.data.crop_scale = (1.0, 1.0)
  c.data.flip = False
  c.data.rotated_classes = 4
  # The 16 MB of training PNGs are read many times: hold them decoded once (about 200 MB)
  # instead of re-reading and re-decoding the files.
  c.data.in_memory = True
  c.data.decode_once = True
  c.data.eval_batch_size = 1000

  # Flattening the final 2 x 2 map keeps the stroke layout that average pooling would discard.
  c.model.name = "small_cnn_flat"
  c.model.embedding_dim = 512
  c.model.dtype = "float32"
  # From scratch every image starts near one direction and RS@k's gradient is zero; centring
  # the head on the first batch fixes that (models.center_embedding_head).
  c.model.center_head_init = True

  c.batch_size = 1000
  c.samples_per_class = 4
  # Chunks of 125 (8 per batch) keep each chunk's activations in cache on a CPU (the trainer
  # keeps activations there, see megabatch_value_and_grad); the gradient does not depend on it.
  c.chunk_size = 125
  c.simix = False

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 4e-4
  # From scratch, Adam's first full-size steps undo the head centring; ramp the rate up.
  c.optimizer.warmup_steps = 20
  c.epochs = 3  # of the 77,120 turned images: 231 steps
  c.optimizer.milestones = (2,)
  c.eval_every_epochs = 3
  c.checkpoint_every_steps = 50
  c.best_metric = "test/recall@1"

  if "smoke" in config_lib.parse_arg(arg):
    c = config_lib.smoke(c)
  return c
