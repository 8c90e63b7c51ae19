"""Exact mega-batch gradients: a chunked two-pass step whose memory is flat in the batch size.

Serves both tasks (one image array, or whole images in aspect buckets as several groups).

Recall is a metric over the whole database, so RS@k wants batches of thousands of images, far more
than backprop through a ViT can hold at once. The loss couples the images only through their
embeddings, so the exact gradient splits by the chain rule:

    dL/dθ = sum_c (dE_c/dθ)^T · dL/dE_c,

where E_c are the embeddings of chunk c. `megabatch_value_and_grad` computes it in two passes:

  1. embed every chunk (forward only, `lax.map`, no activations kept) into the full (B, D) matrix E;
  2. take the loss and dL/dE on the whole E (the only place the full batch meets);
  3. re-run each chunk under `jax.vjp` with its slice of dL/dE as cotangent, summing the parameter
     gradients in a `lax.scan`.

Peak memory is the images, E, dL/dE, the loss's own temporaries and the activations of ONE chunk;
the price is one extra forward pass (about 4/3 of the plain fwd+bwd cost). On CPU, where memory is
plentiful and XLA runs convolution gradients in while loops slowly, `keep_activations=True` runs
the chunks as straight-line code that keeps their activations instead (one forward, same gradient).

Chunk layout (strided): chunk c holds rows c, c + n, c + 2n, ... for n = B / chunk_size chunks,
i.e. `x.reshape(chunk_size, n, ...).swapaxes(0, 1)`, as `optax.microbatching` does. When the batch
is sharded over devices along its leading axis, every chunk then holds an equal, contiguous share
of every device's rows, so all devices work in every chunk and no data moves to form chunks.

Losses with parameters of their own (ProxyAnchor's proxies, normalized softmax's class weights):
step 2 differentiates the loss with respect to E and those parameters θ_loss together; θ_loss
never meets the model, so its gradient is exact after the first pass and only dL/dE goes on to
step 3. Inputs the loss reads but does not differentiate (a cross-batch memory) travel as
`loss_inputs`.

Randomness: `rng` is split once into an embedding key and a loss key,
`embed_rng, loss_rng = jax.random.split(rng)`; chunk c is embedded with
`jax.random.fold_in(embed_rng, c)` in both passes (otherwise dropout masks differ between the
passes and the gradient is wrong), and `loss_fn` receives `loss_rng` (e.g. for SiMix's mixing
weights) when built with `loss_uses_rng=True`. `chunk_rngs` returns these keys.

Batch statistics: BatchNorm in training mode normalises with statistics of the rows it sees, so a
chunk's embeddings would depend on which chunk a row lands in and chunking would change the loss.
Models must use frozen BatchNorm (running statistics in both training and evaluation), as the paper
does. An `embed_fn` that returns updated collections (`mutable=['batch_stats']`) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from recall_jax import numerics

PyTree = Any
EmbedFn = Callable[[PyTree, jax.Array, jax.Array | None], jax.Array]
LossFn = Callable[..., jax.Array]
StepFn = Callable[..., tuple[jax.Array, PyTree]]


def num_chunks_of(batch_size: int, chunk_size: int) -> int:
  """B / chunk_size, or ValueError when the batch does not split into equal chunks."""
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
  if batch_size < 1:
    raise ValueError("empty batch: images has no rows")
  if batch_size % chunk_size:
    raise ValueError(
        f"batch size {batch_size} is not divisible by chunk_size {chunk_size}; pick a chunk size "
        f"that divides the batch (e.g. {_largest_divisor_at_most(batch_size, chunk_size)})")
  return batch_size // chunk_size


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def to_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
  """(B, ...) -> (num_chunks, B / num_chunks, ...), chunk c = rows c, c + n, c + 2n, ... ."""
  chunk_size = x.shape[0] // num_chunks
  return jnp.swapaxes(x.reshape(chunk_size, num_chunks, *x.shape[1:]), 0, 1)


def _strided_view(x: jax.Array, num_chunks: int) -> jax.Array:
  """(B, ...) -> (B / num_chunks, num_chunks, ...): row i * n + c lands at [i, c]."""
  return x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:])


def from_chunks(x: jax.Array) -> jax.Array:
  """Inverse of `to_chunks`: (num_chunks, chunk_size, ...) -> (B, ...) in the original row order."""
  num_chunks, chunk_size = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape(num_chunks * chunk_size, *x.shape[2:])


def chunk_rngs(rng: jax.Array | None, num_chunks: int) -> tuple[jax.Array | None, jax.Array | None]:
  """The keys one mega-batch step uses.

  Args:
    rng: the step's PRNG key (typed or raw uint32), or None.
    num_chunks: n.

  Returns:
    chunk_keys: n keys stacked along axis 0, `fold_in(embed_rng, c)` for chunk c; None if rng is.
    loss_rng: the key given to `loss_fn` (when it uses one); None if rng is.
  """
  if rng is None:
    return None, None
  embed_rng, loss_rng = jax.random.split(rng)
  chunk_keys = jax.vmap(lambda c: jax.random.fold_in(embed_rng, c))(jnp.arange(num_chunks))
  return chunk_keys, loss_rng


def _checked_embeddings(out: Any, chunk_size: int) -> jax.Array:
  """Validates one chunk's `embed_fn` output at trace time."""
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
    collections = ", ".join(repr(k) for k in out[1])
    raise ValueError(
        f"embed_fn returned updated variable collections ({collections}), e.g. BatchNorm in "
        "training mode with mutable=['batch_stats']. Batch statistics make each embedding depend "
        "on the other rows of its chunk, so a chunked gradient cannot equal the full-batch one. "
        "Use frozen BatchNorm (running statistics always: use_running_average=True, as the paper "
        "does) and return only the (chunk, D) embeddings.")
  if not isinstance(out, jax.Array) or out.ndim != 2 or out.shape[0] != chunk_size:
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(
        f"embed_fn must return a (chunk, D) = ({chunk_size}, D) array of embeddings, got {shape}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"embed_fn must return floating-point embeddings, got dtype {out.dtype}")
  return out


def _accumulation_dtype(param: jax.Array) -> jnp.dtype:
  """Chunk gradients are summed in at least float32, so bf16 parameters keep small chunks."""
  return jnp.promote_types(param.dtype, jnp.float32)


def _check_batch(images: Any, labels: Any) -> int:
  """Shape checks that need no tracing; returns B."""
  batch_size = rows_of(images)
  if np.ndim(labels) != 1:
    raise ValueError(f"labels must have shape (B,), got shape {np.shape(labels)}")
  if np.shape(labels)[0] != batch_size:
    raise ValueError(
        f"length mismatch: {batch_size} images but {np.shape(labels)[0]} labels")
  return batch_size


def grouped_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
) -> Callable[..., tuple[jax.Array, PyTree]]:
  """The two-pass `value_and_grad` over several groups of images, each with its own shape.

  The core of `megabatch_value_and_grad` (one group) and `bucketed_value_and_grad` (one group per
  aspect bucket): every group is cut into strided chunks of `chunk_size` rows, so each chunk has
  one fixed shape; the loss sees the embeddings of all groups at once.

  Args:
    embed_fn, chunk_size, loss_uses_rng, keep_activations: as in `megabatch_value_and_grad`.
    loss_fn: `loss_fn(embeddings, *loss_args)` (with `loss_uses_rng`, then the loss key), where
      `embeddings` is a tuple holding each group's (S_g, D) embeddings in row order; with
      `loss_has_params`, `loss_fn(embeddings, loss_params, *loss_args)`.
    loss_has_params: the loss has parameters of its own (e.g. proxies), differentiated in the
      first pass together with the embeddings.

  Returns:
    `step_fn(params, groups, loss_args=(), rng=None, loss_params=None) -> (loss, grads)`:
    `groups` a non-empty tuple of image arrays (or pytrees), each with a leading axis S_g
    divisible by `chunk_size`; `loss_args` passed to `loss_fn` after the embeddings (and the
    loss's parameters). Chunks are numbered group by group (group g's chunk c is
    `sum(n_h for h < g) + c`), which fixes their keys (`chunk_rngs`). With `loss_has_params`,
    `grads` is the pair `(model grads, loss_params grads)`.
  """
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
  chunk_size = int(chunk_size)

  def compute_loss(embeddings, loss_params, loss_args, loss_rng):
    extra = (loss_rng,) if loss_uses_rng else ()
    own = (loss_params,) if loss_has_params else ()
    loss = jnp.asarray(loss_fn(embeddings, *own, *loss_args, *extra))
    if loss.shape != ():
      raise ValueError(f"loss_fn must return a scalar, got shape {loss.shape}")
    return loss

  def embed_chunk(params, images_chunk, key):
    return _checked_embeddings(embed_fn(params, images_chunk, key), chunk_size)

  # With loss parameters the first pass differentiates them too: (d/dE, d/dθ_loss).
  argnums = (0, 1) if loss_has_params else 0

  def step_fn(params: PyTree, groups: tuple[Any, ...], loss_args: tuple[Any, ...] = (),
              rng: jax.Array | None = None, loss_params: PyTree = None):
    if not groups:
      raise ValueError("groups is empty: no images")
    if loss_has_params != (loss_params is not None):
      raise ValueError("loss_params must be given exactly when the loss has parameters "
                       f"(loss_has_params={loss_has_params})")
    counts = [num_chunks_of(rows_of(group), chunk_size) for group in groups]
    offsets = np.cumsum([0] + counts[:-1]).tolist()
    chunk_keys, loss_rng = chunk_rngs(rng, sum(counts))
    key_of = (lambda c: None) if rng is None else (lambda c: chunk_keys[c])
    loss_of = lambda embeddings, own: compute_loss(embeddings, own, loss_args, loss_rng)
    # (loss, grads) as the caller gets them: the loss's parameters' gradient rides along.
    result = lambda loss, grads, own_grads: (
        (loss, (grads, own_grads)) if loss_has_params else (loss, grads))

    if all(n == 1 for n in counts):
      # One chunk per group: plain backprop holds the same activations as pass 2 and skips a
      # forward.
      def full_loss(p, own):
        return loss_of(tuple(embed_chunk(p, group, key_of(offset))
                             for group, offset in zip(groups, offsets)), own)
      return jax.value_and_grad(full_loss, argnums)(params, loss_params)

    # (S, ...) -> (chunk_size, n, ...) is free (a bitcast); chunk c is then index c of axis 1, a
    # strided read of one chunk, so the batch is never copied into chunk order (at B = 65,536 of
    # 224 px uint8 a copy would be another 9.9 GB), and a batch sharded along axis 0 stays sharded
    # along axis 0 of every chunk.
    strided = [jax.tree.map(lambda x, n=n: _strided_view(x, n), group)
               for group, n in zip(groups, counts)]
    chunk_of = lambda tree, c: jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, c, axis=1, keepdims=False), tree)

    if keep_activations:
      # Straight-line chunks whose pullbacks keep their activations: one forward per chunk.
      embeddings, pullbacks = [], []
      for view, n, offset in zip(strided, counts, offsets):
        outputs, group_pullbacks = zip(*(
            jax.vjp(lambda p, c=c, view=view, offset=offset: embed_chunk(
                p, chunk_of(view, c), key_of(offset + c)), params)
            for c in range(n)))
        embeddings.append(from_chunks(jnp.stack(outputs)))
        pullbacks.append(group_pullbacks)
      loss, cotangents = jax.value_and_grad(loss_of, argnums)(tuple(embeddings), loss_params)
      cotangents, own_grads = cotangents if loss_has_params else (cotangents, None)
      grads = [pullback(chunk_of(_strided_view(cotangent, n), c))[0]
               for cotangent, n, group_pullbacks in zip(cotangents, counts, pullbacks)
               for c, pullback in enumerate(group_pullbacks)]
      total = jax.tree.map(
          lambda p, *g: sum(x.astype(_accumulation_dtype(p)) for x in g).astype(p.dtype),
          params, *grads)
      return result(loss, total, own_grads)

    # Pass 1: forward only; nothing is differentiated here, so no activations are stored.
    embeddings = tuple(
        from_chunks(jax.lax.map(  # (S_g, D), original row order
            lambda c, view=view, offset=offset: embed_chunk(params, chunk_of(view, c),
                                                            key_of(offset + c)),
            jnp.arange(n)))
        for view, n, offset in zip(strided, counts, offsets))

    loss, cotangents = jax.value_and_grad(loss_of, argnums)(embeddings, loss_params)
    cotangents, own_grads = cotangents if loss_has_params else (cotangents, None)
    chex.assert_trees_all_equal_shapes(cotangents, embeddings)

    # Pass 2: re-run each chunk and pull its slice of dL/dE back to the parameters. Accumulate in
    # at least float32 so bf16 parameters do not lose the small chunk contributions.
    grads = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulation_dtype(p)), params)
    for view, cotangent, n, offset in zip(strided, cotangents, counts, offsets):
      cotangent = _strided_view(cotangent, n)

      def backward_chunk(acc, c, view=view, cotangent=cotangent, offset=offset):
        images_chunk = chunk_of(view, c)
        _, pullback = jax.vjp(lambda p: embed_chunk(p, images_chunk, key_of(offset + c)), params)
        (chunk_grads,) = pullback(chunk_of(cotangent, c))
        return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, chunk_grads), None

      grads, _ = jax.lax.scan(backward_chunk, grads, jnp.arange(n))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return result(loss, grads, own_grads)

  return step_fn


def rows_of(images: Any) -> int:
  """The common leading axis of an images array or pytree (ValueError when there is none)."""
  leaves = jax.tree.leaves(images)
  if not leaves:
    raise ValueError("images is empty (no arrays)")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"every images array needs the same leading batch axis, got shapes "
        f"{[np.shape(leaf) for leaf in leaves]}")
  (rows,) = sizes
  return rows


def megabatch_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
) -> StepFn:
  """Builds an exact, memory-flat `value_and_grad` of `loss_fn(embed_fn(params, images), labels)`.

  Args:
    embed_fn: `embed_fn(params, images_chunk, rng) -> (chunk, D)` float embeddings; `rng` is the
      chunk's key (None when the step gets none). Must treat rows independently (no batch
      statistics), e.g. `lambda p, x, r: model.apply({'params': p, **frozen}, x, train=True,
      rngs={'dropout': r})`.
    loss_fn: `loss_fn(embeddings (B, D), labels (B,)) -> scalar`, or with `loss_uses_rng=True`
      `loss_fn(embeddings, labels, rng)` (rng: the step's loss key, for SiMix). Runs under jit, so
      static sizes must be bound in (RS@k's `max_positives`, SiMix's `num_pairs`). With
      `loss_has_params`, `loss_fn(embeddings, labels, loss_params, ...)`; the step's
      `loss_inputs` (e.g. a cross-batch memory) follow, then the key.
    chunk_size: rows per chunk; must divide B. Memory grows with it, the gradient does not change.
    loss_uses_rng: pass a PRNG key to `loss_fn` as third argument.
    keep_activations: run the chunks as straight-line code that keeps each chunk's forward
      activations for its backward pass: no second forward and no while loop, so memory grows
      with B like plain backprop (the chunks only bound the size of each operation). XLA:CPU runs
      convolution gradients inside a while loop far slower than straight-line code, and skipping
      the recomputation saves more there (figures: benchmarks/README.md). The trainer turns it on
      for the CPU backend only; on accelerators the memory-flat two-pass form is the point.
    loss_has_params: the loss has learned parameters of its own (ProxyAnchor's proxies): the
      first pass differentiates the loss with respect to them as well as the embeddings.

  Returns:
    `step_fn(params, images, labels, rng=None, *, loss_params=None, loss_inputs=()) ->
    (loss, grads)`, a pure function to `jax.jit`; with `loss_has_params`, `loss_params` is
    required and `grads` is the pair `(model grads, loss_params grads)`. `loss_inputs` is a
    tuple of pytrees passed to `loss_fn` and not differentiated.
    `images` is an array (or a pytree of arrays) with leading axis B, any dtype `embed_fn`
    accepts (uint8 keeps a 16,000-image 224 px batch at 2.4 GB); `labels` is (B,). The loss is
    `loss_fn`'s scalar; `grads` has the structure and dtypes of `params` and equals
    `jax.value_and_grad(lambda p: loss_fn(E(p), labels))(params)` up to float rounding, where E(p)
    concatenates the chunks' embeddings (each with its key from `chunk_rngs`) in row order.

  Raises (at call/trace time, before compiling):
    ValueError: B not divisible by `chunk_size`; labels not (B,); images arrays of unequal length;
      `embed_fn` returning anything but a (chunk, D) float array, in particular updated
      BatchNorm statistics.
  """
  if loss_has_params:
    grouped_loss = lambda embeddings, own, labels, *args: loss_fn(embeddings[0], labels, own,
                                                                   *args)
  else:
    grouped_loss = lambda embeddings, *args: loss_fn(embeddings[0], *args)
  grouped = grouped_value_and_grad(
      embed_fn, grouped_loss, chunk_size=chunk_size, loss_uses_rng=loss_uses_rng,
      keep_activations=keep_activations, loss_has_params=loss_has_params)

  def step_fn(params: PyTree, images: Any, labels: jax.Array, rng: jax.Array | None = None, *,
              loss_params: PyTree = None, loss_inputs: tuple[Any, ...] = ()):
    _check_batch(images, labels)
    return grouped(params, (images,), (labels, *loss_inputs), rng, loss_params)

  return step_fn


class BucketedBatch(NamedTuple):
  """A mega-batch whose images come in several shapes (aspect buckets), as the step takes it.

  Attributes:
    buckets: one image array (or pytree) per shape, bucket k with S_k rows (its slots), S_k a
      multiple of the chunk size; slots no row uses hold any image the model embeds finitely.
    slots: int32 (B,): row i of the batch is slot `slots[i]` of the buckets' concatenation
      (row order is the loss's: classes of `samples_per_class` consecutive rows). Slots are
      distinct.
  """

  buckets: tuple[Any, ...]
  slots: jax.Array


def bucketed_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    loss_uses_rng: bool = False,
    keep_activations: bool = False,
    loss_has_params: bool = False,
) -> StepFn:
  """`megabatch_value_and_grad` for a batch held in several fixed shapes (`BucketedBatch`).

  Every chunk is cut within one bucket, so each of the step's operations has a fixed shape and
  the step compiles once per set of bucket sizes. The loss sees E = concat(E_k)[slots], the
  batch's embeddings in row order; unused slots are embedded (they fill their chunks) but get
  no cotangent, so the gradient is exactly that of the B real rows.

  Args:
    embed_fn, loss_fn, chunk_size, loss_uses_rng, keep_activations, loss_has_params: as in
      `megabatch_value_and_grad`; `chunk_size` must divide every bucket's slot count.

  Returns:
    `step_fn(params, batch: BucketedBatch, labels (B,), rng=None, *, loss_params=None,
    loss_inputs=()) -> (loss, grads)`, equal to
    `megabatch_value_and_grad`'s on the rows' images in row order, up to float rounding (the
    embeddings do not depend on the bucket a row sits in: the model masks the padding).

  Raises (at call/trace time): as `megabatch_value_and_grad`, and ValueError when `slots` and
    `labels` differ in length, or (concrete slots) a slot repeats or lies outside the buckets.
  """
  if loss_has_params:
    grouped_loss = lambda embeddings, own, slots, labels, *args: loss_fn(
        jnp.concatenate(embeddings)[slots], labels, own, *args)
  else:
    grouped_loss = lambda embeddings, slots, *args: loss_fn(
        jnp.concatenate(embeddings)[slots], *args)
  grouped = grouped_value_and_grad(
      embed_fn, grouped_loss, chunk_size=chunk_size, loss_uses_rng=loss_uses_rng,
      keep_activations=keep_activations, loss_has_params=loss_has_params)

  def step_fn(params: PyTree, batch: BucketedBatch, labels: jax.Array,
              rng: jax.Array | None = None, *, loss_params: PyTree = None,
              loss_inputs: tuple[Any, ...] = ()):
    buckets = check_bucketed_batch(batch, labels)
    return grouped(params, buckets, (batch.slots, labels, *loss_inputs), rng, loss_params)

  return step_fn


def check_bucketed_batch(batch: BucketedBatch, labels: Any) -> tuple[Any, ...]:
  """Validates a `BucketedBatch` against its labels; returns the non-empty buckets.

  Buckets without slots are dropped: they add no rows to the concatenation, so `slots` is
  unchanged.

  Raises:
    ValueError: no slots at all, slots/labels not (B,) of one length, or (when the slots are
      concrete) a repeated slot or one outside the buckets.
  """
  buckets = tuple(b for b in batch.buckets if rows_of(b))
  if not buckets:
    raise ValueError("the bucketed batch has no slots")
  _check_batch(batch.slots, labels)
  total = sum(rows_of(b) for b in buckets)
  if numerics.is_concrete(batch.slots):
    slots = np.asarray(batch.slots)
    if slots.min() < 0 or slots.max() >= total or len(np.unique(slots)) != len(slots):
      raise ValueError(f"slots must be distinct indices into the {total} slots of the buckets")
  return buckets
