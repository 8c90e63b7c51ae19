"""Detecting a start that RS@k cannot learn from, and what to do about it.

RS@k relaxes the rank of a positive with sigmoids: `r = 1 + sum_j sigmoid((s_j - s_p) / tau2)`,
then recall at k with `sigmoid((k - r) / tau1)`. Once positives rank far beyond max(k) (a network
trained from scratch maps every image close to one common direction, so positives rank around
B / 2), the second sigmoid is flat: the gradient vanishes, the loss stays near 1 and training never
starts. The paper starts from pretrained weights, where positives already rank near the top.

`median_positive_rank` measures where the positives are; `diagnose_cold_start` adds RS@k's
gradient norm with respect to the embeddings and decides whether the run is stuck, with a message
naming the remedies. Both are pure; showing the message once is the caller's business.

Serves both tasks (any run trained with RS@k); the input layout says how a batch is embedded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from recall_jax.losses import _common
from recall_jax.losses import recall_at_k as rsk


@functools.partial(jax.jit, static_argnames="max_positives")
def _positive_ranks(embeddings: jax.Array, labels: jax.Array, max_positives: int) -> jax.Array:
  embeddings = embeddings.astype(jnp.float32)
  sims = jnp.matmul(embeddings, embeddings.T, precision=jax.lax.Precision.HIGHEST)
  rows = jnp.arange(sims.shape[0])
  positives, valid, _ = _common.positive_indices(labels, max_positives)  # (B, P)
  positive_sims = jnp.take_along_axis(sims, positives, axis=1)
  # Row j ranks before positive p when more similar, or equally similar with a lower index;
  # the query itself is not ranked. O(B * P * B) comparisons, no sort of the (B, B) matrix.
  above = sims[:, None, :] > positive_sims[:, :, None]
  tied_before = ((sims[:, None, :] == positive_sims[:, :, None])
                 & (rows[None, None, :] < positives[:, :, None]))
  others = rows[None, None, :] != rows[:, None, None]
  ranks = 1 + jnp.sum((above | tied_before) & others, axis=-1)
  return jnp.where(valid, ranks.astype(jnp.float32), jnp.nan)


def positive_ranks(embeddings: jax.Array, labels: jax.Array, *,
                   max_positives: int | None = None) -> jax.Array:
  """Rank of every positive among the rows other than its query.

  Similarities are float32 inner products at HIGHEST precision. Among equal similarities the lower
  index ranks first, as in `recall_jax.evaluation.knn`.

  Args:
    embeddings: (B, D) float embeddings.
    labels: (B,) integer labels.
    max_positives: P, static slots per query, at least the largest class size minus one;
      inferred from concrete labels, required under `jit` (where a query with more positives
      keeps its first P).

  Returns:
    (B, P) float32: `ranks[q, i]` is the 1-based rank, among the B - 1 rows other than q, of q's
    i-th positive (same label, other row, in row order); NaN on slots beyond q's positives.

  Raises:
    ValueError: on a shape mismatch, non-float embeddings, non-integer labels, or concrete labels
      with more positives than `max_positives`.
  """
  embeddings, labels = _common.check_batch(embeddings, labels)
  if _common.is_concrete(labels) and _common.largest_class(labels) == 1:
    max_positives = 1  # no positive pair: every slot is padding, every rank NaN
  else:
    max_positives = _common.positive_slots(labels, samples_per_class=None,
                                           max_positives=max_positives)
  chex.assert_rank(embeddings, 2)
  return _positive_ranks(jnp.asarray(embeddings), jnp.asarray(labels), max_positives)


def median_positive_rank(embeddings: jax.Array, labels: jax.Array, *,
                         max_positives: int | None = None) -> jax.Array:
  """Median over all (query, positive) pairs of the positive's rank (see `positive_ranks`).

  Args:
    embeddings: (B, D) float embeddings (a training batch, say).
    labels: (B,) integer labels.
    max_positives: see `positive_ranks`.

  Returns:
    float32 scalar, 1-based: 1 when every positive is its query's nearest neighbour, about B / 2
    for random embeddings; NaN when no row has a positive.

  Raises:
    ValueError: as `positive_ranks`.
  """
  return jnp.nanmedian(positive_ranks(embeddings, labels, max_positives=max_positives))


@dataclasses.dataclass(frozen=True)
class ColdStartDiagnosis:
  """What `diagnose_cold_start` found.

  Attributes:
    median_positive_rank: see `median_positive_rank`.
    gradient_norm: L2 norm of RS@k's gradient with respect to the (B, D) embeddings.
    max_k: the largest k of RS@k.
    cannot_learn: positives rank beyond max(k) and either far beyond it or with a vanishing
      gradient.
    message: what to tell the user when `cannot_learn`, else None.
  """

  median_positive_rank: float
  gradient_norm: float
  max_k: int
  cannot_learn: bool
  message: str | None


REMEDIES = (
    "start from pretrained weights (model.pretrained = '<weights>.npz' or '.safetensors'), "
    "centre the embedding head on the first batch (model.center_head_init = True), or warm up "
    "with a loss that learns from any start for the first steps, then switch to RS@k "
    "(loss.warmup_name = 'smooth_ap' or 'multi_similarity', loss.warmup_steps = e.g. 500)")


def diagnose_cold_start(embeddings: jax.Array, labels: jax.Array, *,
                        k_values: Sequence[int] = rsk.DEFAULT_K_VALUES, rank_factor: float = 4.0,
                        gradient_tol: float = 1e-4, **loss_kwargs: Any) -> ColdStartDiagnosis:
  """Decides whether RS@k can learn from a batch's embeddings.

  The run cannot learn when the median positive rank exceeds max(k) and either exceeds
  `rank_factor * max(k)` or RS@k's gradient norm is below `gradient_tol`. A batch whose positives
  already rank within max(k) is never flagged, however small its gradient (it is solved, not
  stuck).

  Args:
    embeddings: (B, D) float embeddings of a training batch, as the loss sees them.
    labels: (B,) concrete integer labels.
    k_values: RS@k's k values (`loss.k_values`).
    rank_factor: how many times max(k) counts as "far beyond".
    gradient_tol: gradient norms below this count as vanished (a healthy random start of 64
      rows in 16 dimensions has about 0.1; a collapsed one about 1e-9).
    **loss_kwargs: the other keyword arguments of `recall_at_k_surrogate` (tau1, tau2,
      count_query_in_rank, ...).

  Returns:
    A `ColdStartDiagnosis`.

  Raises:
    ValueError: on bad embeddings, labels, k values or loss arguments.
  """
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  k_values = _common.check_k_values(k_values, embeddings.shape[0], rsk.DEFAULT_K_VALUES)
  if not rank_factor >= 1:
    raise ValueError(f"rank_factor must be >= 1, got {rank_factor}")
  median = float(median_positive_rank(embeddings, labels,
                                      max_positives=loss_kwargs.get("max_positives")))
  gradient = jax.grad(lambda e: rsk.recall_at_k_surrogate(e, labels, k_values=k_values,
                                                          **loss_kwargs))(embeddings)
  gradient_norm = float(jnp.linalg.norm(gradient.astype(jnp.float32)))
  max_k = max(k_values)
  far = median > rank_factor * max_k
  vanished = not gradient_norm >= gradient_tol  # NaN counts as vanished
  cannot_learn = bool(median > max_k and (far or vanished))
  message = None
  if cannot_learn:
    message = (
        f"RS@k gets almost no signal from this start: the median positive ranks {median:.0f} "
        f"among {embeddings.shape[0] - 1} rows, beyond max(k) = {max_k}, where RS@k's sigmoid "
        f"on k - rank is flat (gradient norm {gradient_norm:.1e} with respect to the "
        f"embeddings), so the loss stays near 1 and recall barely moves. Remedies: {REMEDIES}.")
  return ColdStartDiagnosis(median_positive_rank=median, gradient_norm=gradient_norm,
                            max_k=max_k, cannot_learn=cannot_learn, message=message)


# Update indices (0-based, before the update) at which a run checks its start: cheap (one
# inference pass over one batch), early enough to stop a hopeless run, late enough to see
# whether Adam's first full-size steps collapsed the embeddings.
DEFAULT_CHECK_STEPS = (0, 10, 50, 100)


class ColdStartMonitor:
  """Checks a training run's batches at a few early steps and says once when RS@k cannot learn.

  Call it before each update with the current parameters and that step's batch; at the check
  steps it embeds the batch in inference mode and runs `diagnose_cold_start`.

  Args:
    embed_batch_for: params -> (a batch's images -> (b, D) embeddings in row order), inference
      mode (`layouts.SquareCrops.batch_embedder`: in chunks, whatever the input layout).
    k_values: RS@k's k values.
    steps: update indices at which to check.
    say: shows the message (once per run).
    **loss_kwargs: RS@k's other keywords (tau1, tau2, max_positives, ...).
  """

  def __init__(self, embed_batch_for, *, k_values: Sequence[int],
               steps: Sequence[int] = DEFAULT_CHECK_STEPS, say=print, **loss_kwargs: Any):
    self._embed_batch_for, self._k_values = embed_batch_for, tuple(k_values)
    self._steps = frozenset(steps)
    self._say, self._loss_kwargs = say, loss_kwargs
    self.warned = False

  def __call__(self, step: int, params: Any, images: Any,
               labels: Any) -> dict[str, float] | None:
    """Diagnoses batch `step` when it is a check step.

    Args:
      step: the update about to be made (0-based).
      params: the parameters before that update.
      images: the batch's images (this process's rows), as `embed_batch_for` takes them.
      labels: (B,) their labels.

    Returns:
      None off the check steps (or when the batch has no more than max(k) + 1 rows), else
      {'median_positive_rank', 'rsk_gradient_norm', 'cannot_learn'} to log.
    """
    # A process's slice of a batch may be too small for RS@k's k values (several hosts).
    if step not in self._steps or len(labels) - 1 <= max(self._k_values):
      return None
    embeddings = self._embed_batch_for(params)(images)
    diagnosis = diagnose_cold_start(embeddings, jnp.asarray(jax.device_get(labels)),
                                    k_values=self._k_values, **self._loss_kwargs)
    if diagnosis.cannot_learn and not self.warned:
      self.warned = True
      self._say(f"warning at step {step}: {diagnosis.message}")
    return {"median_positive_rank": diagnosis.median_positive_rank,
            "rsk_gradient_norm": diagnosis.gradient_norm,
            "cannot_learn": float(diagnosis.cannot_learn)}
