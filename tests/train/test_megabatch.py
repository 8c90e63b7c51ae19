"""Exactness, memory and input checks of the chunked two-pass mega-batch gradient.

The models are defined here (not taken from recall_jax.models) so the tests pin down exactly the
properties that matter: dropout in a ViT, frozen BatchNorm in a CNN, and computation in the
dtype of the parameters (float64 under the x64 fixture).

XLA:CPU compilation dominates the runtime, so programs are compiled with LLVM's expensive passes
off (`_compile`); that changes code generation only, not the HLO or its buffer assignment.
"""

from __future__ import annotations

import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recall_jax.losses.contrastive import contrastive_database_loss
from recall_jax.losses.normalized_softmax import normalized_softmax_loss
from recall_jax.losses.proxy_anchor import init_proxies
from recall_jax.losses.proxy_anchor import proxy_anchor_loss
from recall_jax.losses.recall_at_k import recall_at_k_database_loss
from recall_jax.losses.recall_at_k import recall_at_k_surrogate
from recall_jax.losses.smooth_ap import smooth_ap_database_loss
from recall_jax.simix import num_simix_pairs
from recall_jax.simix import simix
from recall_jax.train import cross_batch_memory
from recall_jax.train.megabatch import BucketedBatch
from recall_jax.train.megabatch import bucketed_value_and_grad
from recall_jax.train.megabatch import from_chunks
from recall_jax.train.megabatch import megabatch_value_and_grad
from recall_jax.train.megabatch import to_chunks

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
K_VALUES = (1, 2, 4)


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)


def _to_unit_float(images):
  return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


def _l2_normalize(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class TinyViT(nn.Module):
  """Patch embedding, pre-LN attention + MLP blocks with dropout, mean pool, linear head."""

  patch: int = 4
  width: int = 16
  depth: int = 1
  heads: int = 2
  mlp: int = 32
  dim: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, images, train: bool = True):
    x = _to_unit_float(images)
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.width)(x.reshape(b, (h // p) * (w // p), p * p * c))
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    drop = nn.Dropout(self.dropout, deterministic=not train)
    head_dim = self.width // self.heads
    for _ in range(self.depth):
      y = nn.LayerNorm()(x)
      q, k, v = jnp.split(nn.Dense(3 * self.width)(y).reshape(b, -1, 3 * self.heads, head_dim),
                          3, axis=2)
      attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
      y = jnp.einsum("bhqk,bkhd->bqhd", drop(attn), v).reshape(b, -1, self.width)
      x = x + drop(nn.Dense(self.width)(y))
      y = nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
      x = x + drop(y)
    return _l2_normalize(nn.Dense(self.dim)(nn.LayerNorm()(x).mean(axis=1)))


class TinyCNN(nn.Module):
  """Two strided convolutions with BatchNorm, mean pool, dropout, linear head.

  `frozen=True` is the paper's setting: BatchNorm always normalises with its running statistics.
  """

  dim: int = 8
  dropout: float = 0.0
  frozen: bool = True

  @nn.compact
  def __call__(self, images, train: bool = True):
    x = _to_unit_float(images)
    for features in (8, 16):
      x = nn.Conv(features, (3, 3), strides=2)(x)
      x = nn.BatchNorm(use_running_average=self.frozen or not train)(x)
      x = nn.gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.mean(axis=(1, 2)))
    return _l2_normalize(nn.Dense(self.dim)(x))


def _setup(model_name: str, dropout: float, dtype, batch_size: int = 16, image_size: int = 16):
  """(embed_fn, params, images, labels): 4 rows per class, classes interleaved."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(batch_size, image_size, image_size, 3)), dtype)
  labels = jnp.asarray(rng.permutation(np.repeat(np.arange(batch_size // 4), 4)), jnp.int32)
  if model_name == "vit":
    model = TinyViT(dropout=dropout)
  else:
    model = TinyCNN(dropout=dropout)
  variables = model.init(jax.random.key(1), images[:1], train=False)
  variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  params = variables["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}
  if "batch_stats" in frozen:
    # Non-trivial running statistics, so that using them (and not chunk statistics) matters.
    stats = frozen["batch_stats"]
    frozen["batch_stats"] = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(-0.2, 0.2, v.shape), dtype), stats)
    for layer in frozen["batch_stats"].values():
      layer["var"] = jnp.asarray(rng.uniform(0.5, 1.5, layer["var"].shape), dtype)

  def embed_fn(p, x, key):
    rngs = {} if key is None else {"dropout": key}
    return model.apply({"params": p, **frozen}, x, train=True, rngs=rngs)

  return embed_fn, params, images, labels


def _make_loss(labels: jax.Array, with_simix: bool):
  """RS@k, optionally on the SiMix-augmented batch (then it takes the loss key)."""
  if not with_simix:
    return functools.partial(recall_at_k_surrogate, k_values=K_VALUES, max_positives=3)
  num_pairs = num_simix_pairs(labels)
  # A class of 4 real rows gains 6 virtual rows: every row has 9 positives.
  def loss_fn(embeddings, labels, rng):
    mixed, mixed_labels = simix(embeddings, labels, rng, num_pairs=num_pairs)
    return recall_at_k_surrogate(mixed, mixed_labels, k_values=K_VALUES, max_positives=9)
  return loss_fn


def _reference(embed_fn, loss_fn, params, images, labels, rng, chunk_size, loss_uses_rng):
  """Plain `value_and_grad` through one function that embeds each strided chunk with its key.

  The chunks are embedded under `vmap` (one copy of the model in the program, so it compiles
  faster than a Python loop); `vmap` over keys draws the same random numbers as separate calls.
  """
  batch_size = images.shape[0]
  n = batch_size // chunk_size
  embed_rng, loss_rng = jax.random.split(rng)
  keys = jnp.stack([jax.random.fold_in(embed_rng, c) for c in range(n)])
  chunks = jnp.stack([images[c::n] for c in range(n)])

  def total_loss(p):
    parts = jax.vmap(lambda x, key: embed_fn(p, x, key))(chunks, keys)  # (n, chunk, D)
    embeddings = jnp.swapaxes(parts, 0, 1).reshape(batch_size, -1)  # row i * n + c = parts[c, i]
    return loss_fn(embeddings, labels, loss_rng) if loss_uses_rng else loss_fn(embeddings, labels)

  return jax.value_and_grad(total_loss)(params)


def _assert_close(actual, expected, tol):
  loss, grads = actual
  ref_loss, ref_grads = expected
  np.testing.assert_allclose(loss, ref_loss, rtol=tol)
  assert 0.0 < float(ref_loss) < 1.0
  flat, tree = jax.tree.flatten(grads)
  ref_flat, ref_tree = jax.tree.flatten(ref_grads)
  assert tree == ref_tree
  for g, r in zip(flat, ref_flat):
    assert g.dtype == r.dtype
    scale = float(jnp.max(jnp.abs(r)))
    assert scale > 0.0
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol * scale)


def _check_exact(model_name, dropout, with_simix, dtype, tol):
  """Mega-batch step vs the full-batch reference, compiled as one program (compiles faster)."""
  embed_fn, params, images, labels = _setup(model_name, dropout, dtype)
  loss_fn = _make_loss(labels, with_simix)
  chunk_size = 4  # 4 chunks of 4 rows
  step = megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=chunk_size,
                                  loss_uses_rng=with_simix)
  uses_rng = dropout > 0 or with_simix
  if uses_rng:
    reference = functools.partial(_reference, embed_fn, loss_fn, chunk_size=chunk_size,
                                  loss_uses_rng=with_simix)
  else:
    # No randomness: chunking must be invisible, so compare with the literal definition.
    reference = jax.value_and_grad(
        lambda p, x, y, key: loss_fn(embed_fn(p, x, None), y))
  rng = jax.random.key(7) if uses_rng else None
  both = _compile(lambda *args: (step(*args), reference(*args)), params, images, labels, rng)
  actual, expected = both(params, images, labels, rng)
  assert actual[0].dtype == dtype
  _assert_close(actual, expected, tol)
  if uses_rng:
    # The keys reach dropout / SiMix: another key gives another loss, so the test above bites.
    other, _ = both(params, images, labels, jax.random.key(8))
    assert abs(float(other[0]) - float(actual[0])) > 1e-4


# (model, dropout, SiMix): each model and each option on and off, without the full product, to
# keep XLA:CPU compilation time down.
@pytest.mark.parametrize("model_name,dropout,with_simix",
                         [("vit", 0.2, True), ("cnn", 0.2, False), ("vit", 0.0, False)])
def test_equals_full_batch_value_and_grad_float32(model_name, dropout, with_simix):
  # Not 1e-5: chunked and whole-batch forwards round differently (~1e-7), and RS@k's
  # tau2 = 0.01 multiplies that by 100 inside the sigmoids, so float32 gradients that are equal
  # in exact arithmetic differ by ~1e-5 of their scale (measured 3e-6 to 1.1e-5 on jax 0.10.2
  # and 0.11.2). A wrong chunk, key or sum is off by O(1); exactness is the float64 test below.
  _check_exact(model_name, dropout, with_simix, jnp.float32, 1e-4)


@pytest.mark.parametrize("model_name,dropout,with_simix",
                         [("cnn", 0.2, True), ("vit", 0.0, False)])
def test_equals_full_batch_value_and_grad_float64(x64, model_name, dropout, with_simix):
  _check_exact(model_name, dropout, with_simix, jnp.float64, 1e-10)


def test_strided_chunk_layout():
  x = jnp.arange(24 * 2).reshape(24, 2)
  chunks = to_chunks(x, 4)
  assert chunks.shape == (4, 6, 2)
  for c in range(4):
    np.testing.assert_array_equal(chunks[c], x[c::4])
  np.testing.assert_array_equal(from_chunks(chunks), x)
  # With the batch split into 2 equal device shares along axis 0, every chunk holds 3 rows of
  # each share.
  for c in range(4):
    assert sorted(set(int(r) // 12 for r in chunks[c][:, 0] // 2)) == [0, 1]


# ---- Memory: flat in B apart from images, embeddings and the loss. ----


def _contrastive(embeddings, labels):
  """A cheap loss with (B, B) temporaries (fast to compile, unlike RS@k)."""
  sims = embeddings @ embeddings.T
  same = labels[:, None] == labels[None, :]
  return jnp.mean(jnp.where(same, 1.0 - sims, jax.nn.relu(sims - 0.5)))


def test_memory_is_flat_in_batch_size_while_plain_backprop_grows():
  model = TinyViT(patch=4, width=32, heads=2, mlp=64, dim=16)
  image_size, chunk_size, dim = 32, 64, 16
  params = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8))
  params = params["params"]
  embed_fn = lambda p, x, key: model.apply({"params": p}, x)
  step = megabatch_value_and_grad(embed_fn, _contrastive, chunk_size=chunk_size)
  plain = jax.value_and_grad(lambda p, x, y: _contrastive(embed_fn(p, x, None), y))
  loss_only = jax.value_and_grad(_contrastive)

  stats = {}
  for b in (256, 2048):
    images = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    embeddings = jax.ShapeDtypeStruct((b, dim), jnp.float32)
    stats[b] = dict(
        mega=_compile(step, params, images, labels).memory_analysis(),
        plain=_compile(plain, params, images, labels).memory_analysis(),
        loss=_compile(loss_only, embeddings, labels).memory_analysis().temp_size_in_bytes,
        images=b * image_size * image_size * 3, labels=4 * b, embeddings=4 * b * dim)
  small, big = stats[256], stats[2048]

  # Arguments grow by exactly the images and labels (uint8 images: no float copy of the batch).
  assert (big["mega"].argument_size_in_bytes - small["mega"].argument_size_in_bytes ==
          big["images"] - small["images"] + big["labels"] - small["labels"])

  # Temporaries: the peak is the larger of two phases. Chunk phase: one chunk's activations (as
  # at B = 256) plus the stored embeddings; loss phase: the loss's own temporaries plus the
  # embeddings and their cotangents. Nothing else may grow with B.
  chunk_phase = small["mega"].temp_size_in_bytes + 3 * (big["embeddings"] - small["embeddings"])
  loss_phase = big["loss"] + 2 * big["embeddings"]
  predicted = max(chunk_phase, loss_phase)
  measured = big["mega"].temp_size_in_bytes
  assert abs(measured - predicted) <= 0.10 * predicted, (measured, chunk_phase, loss_phase)

  # Plain backprop keeps every image's activations: its temporaries beyond the loss's grow in
  # proportion to B (8x here), and dwarf the mega-batch step's.
  activations = small["plain"].temp_size_in_bytes - small["loss"]
  assert activations > 5 * small["loss"]
  plain_growth = big["plain"].temp_size_in_bytes - small["plain"].temp_size_in_bytes
  assert plain_growth >= 0.9 * 7 * activations
  assert big["plain"].temp_size_in_bytes > 10 * measured


# ---- Bad input and refused models: errors before anything is compiled. ----


def _identity_setup():
  params = {"w": jnp.ones((3, 4))}
  embed_fn = lambda p, x, key: x @ p["w"]
  loss_fn = lambda e, y: jnp.mean(e**2)
  return params, embed_fn, loss_fn


def test_batch_not_divisible_by_chunk_size():
  params, embed_fn, loss_fn = _identity_setup()
  step = megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=8)
  with pytest.raises(ValueError, match=r"batch size 20 is not divisible by chunk_size 8"):
    step(params, jnp.ones((20, 3)), jnp.zeros((20,), jnp.int32))
  with pytest.raises(ValueError, match="not divisible"):
    jax.jit(step).lower(params, jnp.ones((20, 3)), jnp.zeros((20,), jnp.int32))


def test_labels_length_mismatch():
  params, embed_fn, loss_fn = _identity_setup()
  step = megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=4)
  with pytest.raises(ValueError, match="16 images but 12 labels"):
    step(params, jnp.ones((16, 3)), jnp.zeros((12,), jnp.int32))
  with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
    step(params, jnp.ones((16, 3)), jnp.zeros((16, 1), jnp.int32))


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_bad_chunk_size(chunk_size):
  params, embed_fn, loss_fn = _identity_setup()
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=chunk_size)


def test_embed_fn_with_wrong_output_shape():
  params, _, loss_fn = _identity_setup()
  step = megabatch_value_and_grad(lambda p, x, key: (x @ p["w"]).ravel(), loss_fn, chunk_size=4)
  with pytest.raises(ValueError, match=r"\(chunk, D\) = \(4, D\)"):
    jax.eval_shape(step, params, jnp.ones((16, 3)), jnp.zeros((16,), jnp.int32))


def test_refuses_batchnorm_in_training_mode():
  model = TinyCNN(frozen=False)
  images = jnp.zeros((16, 16, 16, 3))
  variables = model.init(jax.random.key(0), images[:1], train=False)

  def embed_fn(p, x, key):  # batch statistics, running averages updated
    return model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                       mutable=["batch_stats"])

  step = megabatch_value_and_grad(embed_fn, _contrastive, chunk_size=4)
  with pytest.raises(ValueError, match=r"(?s)'batch_stats'.*frozen BatchNorm"):
    jax.eval_shape(step, variables["params"], images, jnp.zeros((16,), jnp.int32))


class KeptActivationsTest(chex.TestCase):
  """`keep_activations=True` (the trainer's CPU setting) changes scheduling, not the maths, and
  both modes mean the same inside and outside `jit`."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(3, 12)
  def test_kept_activations_give_the_same_gradient(self, chunk_size):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      params = {"w": jnp.asarray(rng.normal(size=(6, 4))),
                "b": jnp.asarray(rng.normal(size=(4,)))}
      images = jnp.asarray(rng.normal(size=(12, 6)))
      labels = jnp.repeat(jnp.arange(3), 4)

      def embed(p, x, r):  # Dropout-like noise: each chunk must see the same key in both modes.
        keep = jax.random.bernoulli(r, 0.8, (x.shape[0], 4))
        return jnp.tanh(x @ p["w"] + p["b"]) * keep

      loss = lambda e, l: recall_at_k_surrogate(e, l, max_positives=3, tau2=0.1,
                                                k_values=(1, 2, 4))
      key = jax.random.key(3)
      two_pass = self.variant(megabatch_value_and_grad(embed, loss, chunk_size=chunk_size))(
          params, images, labels, key)
      kept = self.variant(megabatch_value_and_grad(embed, loss, chunk_size=chunk_size,
                                                   keep_activations=True))(
                                                       params, images, labels, key)
      # Both against the full batch embedded at once (what the chunks must add up to).
      full = jax.jit(jax.value_and_grad(lambda p: loss(_chunked_embed(embed, p, images, key,
                                                                      chunk_size), labels)))(params)
      chex.assert_trees_all_close(kept, two_pass, rtol=1e-10, atol=1e-14)
      chex.assert_trees_all_close(kept, full, rtol=1e-10, atol=1e-14)
      assert float(jnp.abs(kept[1]["w"]).sum()) > 0


def _chunked_embed(embed, params, images, key, chunk_size):
  """The embeddings the chunked step computes: chunk c (rows c::n) with its own key."""
  n = images.shape[0] // chunk_size
  keys = [jax.random.fold_in(jax.random.split(key)[0], c) for c in range(n)]
  out = jnp.zeros((images.shape[0], 4), images.dtype)
  for c in range(n):
    out = out.at[c::n].set(embed(params, images[c::n], keys[c]))
  return out


# ----------------------------------------------------------------------------------------------
# Several image shapes: aspect buckets.
# ----------------------------------------------------------------------------------------------

_SHAPES = ((4, 8), (8, 4), (8, 8))  # bucket (H, W); the last holds every image


def _masked_embed(params, images, key):
  """Pixels (channel 0) through a per-pixel feature map, mean-pooled over the mask (channel 1).

  Padding does not change an image's embedding, as with the ResNets' masked GeM.
  """
  del key
  pixels = images[..., 0].astype(params["a"].dtype) / 255.0
  mask = (images[..., 1] > 127).astype(pixels.dtype)
  features = jnp.tanh(pixels[..., None] * params["a"] + params["b"])  # (n, H, W, F)
  pooled = jnp.einsum("nhwf,nhw->nf", features, mask) / jnp.sum(mask, axis=(1, 2))[:, None]
  return pooled @ params["w"]


def _bucketed_problem(dtype, chunk_size=2, seed=0):
  """16 rows (4 classes x 4) of random sizes placed in buckets (some in larger ones), with empty
  slots holding finite junk; and each row's unpadded image."""
  rng = np.random.default_rng(seed)
  params = {"a": rng.standard_normal(12), "b": rng.standard_normal(12),
            "w": rng.standard_normal((12, 6)) / 3}
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  labels = np.repeat(np.arange(4), 4).astype(np.int32)
  own = rng.integers(0, len(_SHAPES), 16)
  # A third of the rows sit in the square bucket whatever their own shape.
  placed = np.where(rng.random(16) < 0.33, len(_SHAPES) - 1, own)
  counts = np.bincount(placed, minlength=len(_SHAPES))
  capacities = [-(-n // chunk_size) * chunk_size + chunk_size * (k == 0)
                for k, n in enumerate(counts)]
  buckets = [rng.integers(0, 256, (cap, h, w, 2)).astype(np.uint8)  # junk in empty slots
             for cap, (h, w) in zip(capacities, _SHAPES)]
  offsets = np.cumsum([0] + capacities[:-1])
  slots, rows = np.zeros(16, np.int32), []
  positions = [list(rng.permutation(cap)) for cap in capacities]
  for i in range(16):
    h, w = _SHAPES[own[i]]
    h, w = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
    image = np.zeros((h, w, 2), np.uint8)
    image[..., 0], image[..., 1] = rng.integers(0, 256, (h, w)), 255
    k = placed[i]
    position = positions[k].pop()
    buckets[k][position] = 0
    buckets[k][position, :h, :w] = image
    slots[i] = offsets[k] + position
    rows.append(image)
  return params, tuple(buckets), slots, labels, rows


def _bucketed_reference(params, rows, labels):
  def total_loss(p):
    embeddings = jnp.concatenate([_masked_embed(p, jnp.asarray(r)[None], None) for r in rows])
    return recall_at_k_surrogate(embeddings, labels, k_values=K_VALUES, max_positives=3)
  return jax.value_and_grad(total_loss)(params)


class BucketedStepTest(chex.TestCase):
  """`bucketed_value_and_grad` equals plain backprop through each row's unpadded image."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_equals_unpadded_rows(self, keep_activations):
    jax.config.update("jax_enable_x64", True)
    try:
      params, buckets, slots, labels, rows = _bucketed_problem(jnp.float64)
      expected = _bucketed_reference(params, rows, labels)
      loss_fn = functools.partial(recall_at_k_surrogate, k_values=K_VALUES, max_positives=3)
      step = bucketed_value_and_grad(_masked_embed, loss_fn, chunk_size=2,
                                     keep_activations=keep_activations)
      actual = self.variant(step)(params, BucketedBatch(buckets, slots), labels)
      _assert_close(actual, expected, 1e-10)
    finally:
      jax.config.update("jax_enable_x64", False)


def test_bucketed_one_bucket_equals_megabatch_with_keys():
  """With one bucket and slots in row order, chunk keys (dropout) match the one-shape step."""
  embed_fn, params, images, labels = _setup("vit", 0.2, jnp.float32)
  loss_fn = functools.partial(recall_at_k_surrogate, k_values=K_VALUES, max_positives=3)
  key = jax.random.key(3)
  want = _compile(megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=4),
                  params, images, labels, key)(params, images, labels, key)
  batch = BucketedBatch((images,), jnp.arange(len(labels)))
  got = _compile(bucketed_value_and_grad(embed_fn, loss_fn, chunk_size=4),
                 params, batch, labels, key)(params, batch, labels, key)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, message", [
    (lambda s, b, y: (s.at[1].set(s[0]), b, y), "distinct"),
    (lambda s, b, y: (s.at[0].set(10_000), b, y), "distinct"),
    (lambda s, b, y: (s, b, y[:-4]), "length mismatch"),
    (lambda s, b, y: (s, (np.concatenate([b[0], b[0][:1]]),) + b[1:], y),
     "not divisible by chunk_size"),
    (lambda s, b, y: (s, tuple(x[:0] for x in b), y), "no slots"),
])
def test_bucketed_bad_batches(change, message):
  params, buckets, slots, labels, _ = _bucketed_problem(jnp.float32)
  slots, buckets, labels = change(jnp.asarray(slots), buckets, jnp.asarray(labels))
  loss_fn = functools.partial(recall_at_k_surrogate, k_values=K_VALUES, max_positives=3)
  step = bucketed_value_and_grad(_masked_embed, loss_fn, chunk_size=2)
  with pytest.raises(ValueError, match=message):
    step(params, BucketedBatch(buckets, slots), labels)


# ---- Losses with parameters of their own, and a cross-batch memory in the database. ----


def _proxy_anchor(embeddings, labels, proxies):
  return proxy_anchor_loss(embeddings, labels, proxies)


def _recall_with_memory(embeddings, labels, memory):
  database, database_labels, valid = cross_batch_memory.database(memory, embeddings, labels)
  # 3 batch positives plus at most 8 stored rows of the class.
  return recall_at_k_database_loss(embeddings, labels, database, database_labels,
                                   database_valid=valid, k_values=K_VALUES, max_positives=11)


def _softmax_and_smooth_ap_with_memory(embeddings, labels, weights, memory):
  database, database_labels, valid = cross_batch_memory.database(memory, embeddings, labels)
  return (normalized_softmax_loss(embeddings, labels, weights)
          + smooth_ap_database_loss(embeddings, labels, database, database_labels,
                                    database_valid=valid, max_positives=11, temperature=0.05))


@pytest.mark.parametrize("case,keep_activations,chunk_size", [
    ("proxy_anchor", False, 4), ("proxy_anchor", True, 4), ("proxy_anchor", False, 16),
    ("softmax_smooth_ap_memory", False, 4), ("recall_memory", True, 4)])
def test_loss_parameters_and_memory_equal_full_batch_value_and_grad(x64, case, keep_activations,
                                                                    chunk_size):
  """Two-pass gradients for the model and the loss's own parameters equal plain backprop
  (4 chunks of 4 rows, or the whole batch as one chunk)."""
  embed_fn, params, images, labels = _setup("cnn", 0.0, jnp.float64)
  rng = np.random.default_rng(3)
  num_classes, dim = 6, 8  # classes 4 and 5 are absent from the batch
  memory = cross_batch_memory.init(12, dim, jnp.float64)
  stored = rng.normal(size=(8, dim))
  memory = cross_batch_memory.update(memory, stored / np.linalg.norm(stored, axis=1)[:, None],
                                     rng.integers(0, num_classes, 8).astype(np.int32))
  loss_fn, loss_params, loss_inputs = {
      "proxy_anchor": (_proxy_anchor, init_proxies(jax.random.key(2), num_classes, dim,
                                                   jnp.float64), ()),
      "recall_memory": (_recall_with_memory, None, (memory,)),
      "softmax_smooth_ap_memory": (_softmax_and_smooth_ap_with_memory,
                                   init_proxies(jax.random.key(3), num_classes, dim,
                                                jnp.float64), (memory,)),
  }[case]
  has_params = loss_params is not None
  step = megabatch_value_and_grad(embed_fn, loss_fn, chunk_size=chunk_size,
                                  keep_activations=keep_activations, loss_has_params=has_params)

  def both(params, loss_params, images, labels, loss_inputs):
    actual = step(params, images, labels, loss_params=loss_params, loss_inputs=loss_inputs)

    def whole_batch_loss(p, own):
      own = (own,) if has_params else ()
      return loss_fn(embed_fn(p, images, None), labels, *own, *loss_inputs)

    expected = jax.value_and_grad(whole_batch_loss, argnums=(0, 1) if has_params else 0)(
        params, loss_params)
    return actual, expected

  (loss, grads), (want_loss, want_grads) = _compile(both, params, loss_params, images, labels,
                                                    loss_inputs)(params, loss_params, images,
                                                                 labels, loss_inputs)
  assert loss.dtype == jnp.float64 and np.isfinite(float(want_loss))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-10)
  if has_params:
    assert len(grads) == 2  # (model, loss parameters)
    assert float(jnp.max(jnp.abs(want_grads[1]))) > 0.0
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    scale = float(jnp.max(jnp.abs(r)))
    assert scale > 0.0
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-9, atol=1e-9 * scale)


def test_loss_parameters_must_match_the_step():
  embed_fn, params, images, labels = _setup("cnn", 0.0, jnp.float32)
  with_params = megabatch_value_and_grad(embed_fn, _proxy_anchor, chunk_size=4,
                                         loss_has_params=True)
  with pytest.raises(ValueError, match="loss_params"):
    with_params(params, images, labels)
  without = megabatch_value_and_grad(embed_fn, _contrastive, chunk_size=4)
  with pytest.raises(ValueError, match="loss_params"):
    without(params, images, labels, loss_params=jnp.ones((4, 8)))


def test_bucketed_loss_parameters_and_memory_equal_plain_backprop(x64):
  """Aspect buckets with a loss that has proxies and reads a memory: row-by-row backprop."""
  params, buckets, slots, labels, rows = _bucketed_problem(jnp.float64)
  rng = np.random.default_rng(5)
  proxies = init_proxies(jax.random.key(4), 5, 6, jnp.float64)  # class 4 absent from the batch
  memory = cross_batch_memory.update(cross_batch_memory.init(8, 6, jnp.float64),
                                     rng.normal(size=(5, 6)), rng.integers(0, 5, 5))

  def loss_fn(embeddings, labels, proxies, memory):
    database, database_labels, valid = cross_batch_memory.database(memory, embeddings, labels)
    return (proxy_anchor_loss(embeddings, labels, proxies)
            + contrastive_database_loss(embeddings, labels, database, database_labels,
                                        database_valid=valid))

  step = jax.jit(bucketed_value_and_grad(_masked_embed, loss_fn, chunk_size=2,
                                         loss_has_params=True))
  loss, (grads, proxy_grads) = step(params, BucketedBatch(buckets, jnp.asarray(slots)), labels,
                                    loss_params=proxies, loss_inputs=(memory,))

  def whole_batch_loss(p, proxies):
    embeddings = jnp.concatenate([_masked_embed(p, jnp.asarray(row)[None], None)
                                  for row in rows])
    return loss_fn(embeddings, labels, proxies, memory)

  want_loss, (want_grads, want_proxy_grads) = jax.value_and_grad(
      whole_batch_loss, argnums=(0, 1))(params, proxies)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-10)
  assert float(jnp.max(jnp.abs(want_proxy_grads[4]))) > 0.0
  chex.assert_trees_all_close((grads, proxy_grads), (want_grads, want_proxy_grads), rtol=1e-9,
                              atol=1e-12)
