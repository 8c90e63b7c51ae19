"""recall_jax: the Recall@k surrogate loss (RS@k), SiMix and exact mega-batch training in JAX.

Patel, Tolias and Matas, "Recall@k Surrogate Loss with Large Batches and Similarity Mixup",
CVPR 2022. Subpackages: `losses` (RS@k and baselines), `simix`, `models` (backbones),
`data` (datasets, sampler, input pipeline), `train` (mega-batch step, loop, sharding),
`evaluation` (exact k-NN retrieval metrics).

Serves both tasks.
"""

__version__ = "0.1.0"
