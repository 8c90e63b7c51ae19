"""Worker for tests/train/test_sharding.py: runs in its own process with forced host devices.

Serves both tasks (square batches and whole images in aspect buckets).

Usage (the test sets JAX_* before starting it; the worker asks chex for its CPU devices):
  python sharding_worker.py eight                 # 8 devices vs the single-device step
  python sharding_worker.py loss_state            # the same with proxies / a memory
  python sharding_worker.py process OUT_DIR       # one of 2 processes x 4 devices (JAX_* set)

The test also imports this file (for the shared toy problem and the single-device reference), so
nothing here touches JAX at import time.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import sys

import numpy as np

NUM_IMAGES, IMAGE_SHAPE, M = 96, (6, 6, 1), 4
GLOBAL_BATCH, STEPS = 32, 3


# ----------------------------------------------------------------------------------------------
# The toy problem: a 2-layer MLP embedding of 6 x 6 images, RS@k with or without SiMix.
# ----------------------------------------------------------------------------------------------


def dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (NUM_IMAGES,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = np.repeat(np.arange(NUM_IMAGES // 6), 6).astype(np.int32)
  return images, labels


def init_params(seed: int = 0):
  rng = np.random.default_rng(seed + 1)
  d_in = int(np.prod(IMAGE_SHAPE))
  return {"w1": (rng.standard_normal((d_in, 24)) / np.sqrt(d_in)).astype(np.float32),
          "b1": (0.1 * rng.standard_normal(24)).astype(np.float32),
          "w2": (rng.standard_normal((24, 8)) / np.sqrt(24)).astype(np.float32)}


def embed_fn(params, images, rng):
  import jax.numpy as jnp
  del rng
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  e = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  return e / jnp.linalg.norm(e, axis=1, keepdims=True)


def loss_fn_for(batch_size: int, m: int, use_simix: bool):
  """(loss_fn, uses_rng) with the static sizes bound, as the trainer builds it."""
  from recall_jax import simix
  from recall_jax.losses import recall_at_k
  # RS@k's cut-offs must stay below the batch (k < B - 1).
  k_values = tuple(k for k in recall_at_k.DEFAULT_K_VALUES if k < batch_size - 1)
  if not use_simix:
    return functools.partial(recall_at_k.recall_at_k_surrogate, max_positives=m - 1,
                             k_values=k_values), False
  pairs = m * (m - 1) // 2

  def loss(embeddings, labels, rng):
    mixed, mixed_labels = simix.simix(embeddings, labels, rng, num_pairs=(batch_size // m) * pairs)
    return recall_at_k.recall_at_k_surrogate(mixed, mixed_labels, max_positives=m - 1 + pairs,
                                             k_values=k_values)

  return loss, True


LR = 0.5


def optimizer():
  import optax
  return optax.sgd(LR, momentum=0.9)


def reference_steps(steps: int, use_simix: bool = True):
  """The single-device run: `steps` train steps on whole global batches.

  Returns (losses, states).
  """
  import jax
  from recall_jax.data import sampler as sampler_lib
  from recall_jax.train import train_step as train_step_lib
  images, labels = dataset()
  sampler = sampler_lib.MPerClassSampler(labels, GLOBAL_BATCH, M, seed=0)
  loss_fn, uses_rng = loss_fn_for(GLOBAL_BATCH, M, use_simix)
  step_fn = train_step_lib.make_train_step(embed_fn, loss_fn, optimizer(), chunk_size=8,
                                           loss_uses_rng=uses_rng)
  state = train_step_lib.init_train_state(jax.tree.map(jax.numpy.asarray, init_params()),
                                          optimizer())
  losses, states = [], []
  for step in range(steps):
    idx = sampler.batch_indices(step)
    state, metrics = step_fn(state, images[idx], labels[idx], jax.random.fold_in(jax.random.key(0),
                                                                                  step))
    losses.append(float(metrics["loss"]))
    states.append(jax.tree.map(np.asarray, state))
  return losses, states


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_trees_close(got, want, rtol: float = 1e-5, what: str = "") -> None:
  import jax
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):
    err = relative_error(a, b)
    assert err <= rtol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------
# Whole images in aspect buckets: rows of 3 shapes, a masked mean-pool embedding.
# ----------------------------------------------------------------------------------------------

BUCKET_SHAPES = ((4, 8), (8, 4), (8, 8))  # (H, W); the last holds every image
BUCKETED_BATCH = 32


def bucketed_rows(seed: int = 0):
  """(images, own bucket, labels) of a 32-row batch, 8 classes x 4: each image uint8 (h, w, 2),
  channel 1 its validity mask (255), smaller than or equal to its bucket."""
  rng = np.random.default_rng(seed)
  own = rng.integers(0, len(BUCKET_SHAPES), BUCKETED_BATCH)
  own[:BUCKETED_BATCH // 2] = np.minimum(own[:BUCKETED_BATCH // 2], 1)  # process 0: no square
  images = []
  for k in own:
    h, w = BUCKET_SHAPES[k]
    h, w = rng.integers(h // 2 + 1, h + 1), rng.integers(w // 2 + 1, w + 1)
    image = np.full((h, w, 2), 255, np.uint8)
    image[..., 0] = rng.integers(0, 256, (h, w))
    images.append(image)
  labels = np.repeat(np.arange(BUCKETED_BATCH // M), M).astype(np.int32)
  return images, own, labels


def local_bucketed_images(images, own, rows, chunk_rows: int):
  """`data.BucketedImages` of `rows`, each in its own bucket, capacities rounded up to
  `chunk_rows` (so processes with other rows need other capacities); empty slots are zero
  pixels with mask 255, as the loader writes them."""
  from recall_jax import data
  counts = np.bincount(own[rows], minlength=len(BUCKET_SHAPES))
  buckets = [np.zeros((-(-n // chunk_rows) * chunk_rows, h, w, 2), np.uint8)
             for n, (h, w) in zip(counts, BUCKET_SHAPES)]
  for bucket in buckets:
    bucket[..., 1] = 255
  filled = [0] * len(BUCKET_SHAPES)
  bucket_of, position = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    k = own[row]
    h, w = images[row].shape[:2]
    buckets[k][filled[k]] = 0
    buckets[k][filled[k], :h, :w] = images[row]
    bucket_of[i], position[i] = k, filled[k]
    filled[k] += 1
  return data.BucketedImages(tuple(buckets), bucket_of, position)


def init_bucketed_params(seed: int = 0):
  rng = np.random.default_rng(seed + 2)
  return {"a": rng.standard_normal(12).astype(np.float32),
          "b": rng.standard_normal(12).astype(np.float32),
          "w": (rng.standard_normal((12, 8)) / 3).astype(np.float32)}


def masked_embed_fn(params, images, rng):
  """Per-pixel features mean-pooled over the mask: padding leaves the embedding unchanged."""
  import jax.numpy as jnp
  del rng
  pixels = images[..., 0].astype(jnp.float32) / 255.0
  mask = (images[..., 1] > 127).astype(jnp.float32)
  features = jnp.tanh(pixels[..., None] * params["a"] + params["b"])
  pooled = jnp.einsum("nhwf,nhw->nf", features, mask) / jnp.sum(mask, axis=(1, 2))[:, None]
  return pooled @ params["w"]


def bucketed_reference():
  """Loss and gradient of plain backprop through each row's unpadded image, one device."""
  import jax
  import jax.numpy as jnp
  images, _, labels = bucketed_rows()
  loss_fn, _ = loss_fn_for(BUCKETED_BATCH, M, False)

  def total_loss(p):
    embeddings = jnp.concatenate([masked_embed_fn(p, jnp.asarray(x)[None], None)
                                  for x in images])
    return loss_fn(embeddings, jnp.asarray(labels))

  with jax.default_device(jax.devices()[0]):
    return jax.value_and_grad(total_loss)(jax.tree.map(jnp.asarray, init_bucketed_params()))


def _bucketed_case() -> None:
  """8 devices, chunks of 1 image per device within each bucket == unpadded backprop."""
  import jax
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import sharded_step
  mesh = parallel.data_mesh()
  images, own, labels = bucketed_rows()
  local = local_bucketed_images(images, own, np.arange(BUCKETED_BATCH), chunk_rows=8)
  batch = batch_assembly.global_bucketed_batch({"image": local, "label": labels}, mesh)
  loss_fn, _ = loss_fn_for(BUCKETED_BATCH, M, False)
  want_loss, want_grads = bucketed_reference()
  params = init_bucketed_params()
  vg = jax.jit(sharded_step.sharded_value_and_grad(masked_embed_fn, loss_fn, mesh,
                                                   chunk_size_per_device=1))
  loss, grads = vg(params, batch["image"], batch["label"])
  # Pooling over a padded image sums in another order than over the unpadded one: float32
  # rounding, amplified by RS@k's tau2, hence 1e-4 (the float64 check in test_megabatch is exact).
  assert relative_error(loss, want_loss) <= 1e-5, (float(loss), float(want_loss))
  assert_trees_close(grads, want_grads, rtol=1e-4, what="bucketed grad ")
  step = sharded_step.make_sharded_train_step(masked_embed_fn, loss_fn, optimizer(), mesh,
                                              chunk_size_per_device=1)
  state = sharded_step.make_sharded_state(params, optimizer(), mesh)
  state, metrics = step(state, batch["image"], batch["label"], None)
  assert relative_error(metrics["loss"], want_loss) <= 1e-5
  want_params = jax.tree.map(
      lambda p, g: np.asarray(p, np.float64) - LR * np.asarray(g, np.float64), params, want_grads)
  assert_trees_close(state.params, want_params, rtol=1e-4, what="bucketed params ")
  print("bucketed ok")


# ----------------------------------------------------------------------------------------------
# Mode 'eight': 8 devices, one process.
# ----------------------------------------------------------------------------------------------


def _case(batch_size: int, chunk_per_device: int, use_simix: bool, shuffle: bool) -> None:
  import jax
  import jax.numpy as jnp
  from recall_jax.train import megabatch
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import sharded_step

  mesh = parallel.data_mesh()
  ndev = mesh.devices.size
  rng = np.random.default_rng(batch_size + chunk_per_device)
  images = rng.integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = np.repeat(np.arange(batch_size // M), M).astype(np.int32)
  if shuffle:  # classes scattered over devices and chunks
    labels = labels[rng.permutation(batch_size)]
  rows = batch_size // ndev
  per_device = [set(labels[d * rows:(d + 1) * rows]) for d in range(ndev)]
  straddles = any(per_device[d] & per_device[d + 1] for d in range(ndev - 1))
  several = all(len(s) >= 2 for s in per_device)
  loss_fn, uses_rng = loss_fn_for(batch_size, M, use_simix)
  params = jax.tree.map(jnp.asarray, init_params())
  key = jax.random.key(7)
  name = f"B={batch_size} chunk/device={chunk_per_device} simix={use_simix}: "

  # Reference: plain value_and_grad of the full batch on one device, same loss key.
  num_chunks = batch_size // (chunk_per_device * ndev)
  _, loss_key = megabatch.chunk_rngs(key, num_chunks)
  single = jax.devices()[0]
  def full_loss(p, x, y, k):
    e = embed_fn(p, x, None)
    return loss_fn(e, y, k) if uses_rng else loss_fn(e, y)
  with jax.default_device(single):
    want_loss, want_grads = jax.jit(jax.value_and_grad(full_loss))(params, images, labels,
                                                                   loss_key)

  batch = batch_assembly.global_batch({"image": images, "label": labels}, mesh)
  vg = jax.jit(sharded_step.sharded_value_and_grad(embed_fn, loss_fn, mesh,
                                                   chunk_size_per_device=chunk_per_device,
                                                   loss_uses_rng=uses_rng))
  state = sharded_step.make_sharded_state(params, optimizer(), mesh)
  loss, grads = vg(state.params, batch["image"], batch["label"], key)
  assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss)), \
      (name, float(loss), float(want_loss))
  assert_trees_close(grads, want_grads, what=name + "grad ")
  for leaf in jax.tree.leaves(grads):
    assert leaf.sharding.is_fully_replicated, leaf.sharding

  # One optimiser step (SGD with momentum: the first update is -lr * grad) on the same key.
  step = sharded_step.make_sharded_train_step(embed_fn, loss_fn, optimizer(), mesh,
                                              chunk_size_per_device=chunk_per_device,
                                              loss_uses_rng=uses_rng)
  compiled = step.lower(state, batch["image"], batch["label"], key).compile()
  state, metrics = compiled(state, batch["image"], batch["label"], key)
  assert relative_error(metrics["loss"], want_loss) <= 1e-5, name
  want_params = jax.tree.map(
      lambda p, g: np.asarray(p, np.float64) - LR * np.asarray(g, np.float64), params, want_grads)
  assert_trees_close(state.params, want_params, what=name + "params ")
  assert int(state.step) == 1
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
  print(f"case ok: {name}straddles={straddles} several_classes_per_device={several}")
  return (straddles, several), compiled


def _check_compiled_hlo(compiled, mesh) -> None:
  """One all-reduce (the gradients) per step, outside every loop; two all-gathers (E, labels)."""
  from recall_jax import parallel
  hlo = compiled.as_text()
  computations = re.split(r"\n(?=\S)", hlo)
  reducing = [c.split("(", 1)[0] for c in computations if re.search(r" all-reduce(-start)?\(", c)]
  assert len(reducing) == 1 and reducing[0].startswith("ENTRY"), reducing
  assert len(re.findall(r" all-reduce(-start)?\(", hlo)) == 1
  assert len(re.findall(r" all-gather(-start)?\(", hlo)) == 2
  # Per-device work: the 64-image batch arrives as 8 rows per device and the MLP's first layer
  # runs on 2-row per-device chunks (f32[2,36] inputs); no global (16- or 64-row) chunk exists.
  assert re.search(r"u8\[8,6,6,1\]", hlo) and re.search(r"f32\[2,36\]", hlo), "local shapes"
  assert not re.search(r"(u8\[(16|64),6,6,1\])|(f32\[(16|64),36\])", hlo), "global chunk found"
  image_sharding = compiled.input_shardings[0][1]
  assert image_sharding.spec == parallel.row_sharding(mesh).spec, image_sharding
  print("hlo ok")


def _check_errors() -> None:
  import jax
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import sharded_step
  mesh = parallel.data_mesh()
  loss_fn, _ = loss_fn_for(64, M, False)
  state = sharded_step.make_sharded_state(init_params(), optimizer(), mesh)
  step = sharded_step.make_sharded_train_step(embed_fn, loss_fn, optimizer(), mesh,
                                              chunk_size_per_device=3)
  labels = np.repeat(np.arange(12), M).astype(np.int32)
  batch = batch_assembly.global_batch({"image": np.zeros((48,) + IMAGE_SHAPE, np.uint8),
                                       "label": labels}, mesh)
  try:  # 48 = 2 x 3 x 8: fine; 64 is not divisible by 3 x 8 = 24.
    step.lower(state, batch["image"], batch["label"], None)
    batch = batch_assembly.global_batch({"image": np.zeros((64,) + IMAGE_SHAPE, np.uint8),
                                         "label": np.zeros(64, np.int32)}, mesh)
    step(state, batch["image"], batch["label"], None)
  except ValueError as e:
    assert "global batch 64 is not divisible by chunk_size_per_device 3 x 8 devices" in str(e), e
  else:
    raise AssertionError("no error for B=64, chunk 3 x 8 devices")
  try:
    batch_assembly.global_batch({"image": np.zeros((12,) + IMAGE_SHAPE, np.uint8),
                                 "label": np.zeros(12, np.int32)}, mesh)
  except ValueError as e:
    assert "does not split over this process's 8 devices" in str(e), e
  else:
    raise AssertionError("no error for 12 rows on 8 devices")
  assert jax.tree.leaves(state)[0].sharding.is_fully_replicated
  print("errors ok")


def main_eight() -> None:
  import jax
  assert jax.device_count() == 8, jax.devices()
  from recall_jax import parallel
  # (B, chunk/device, SiMix, shuffled labels): 2 whole classes per device (4 chunks); classes
  # scattered over devices with SiMix (2 chunks) and without (a single chunk).
  seen, compiled = zip(*[_case(64, 2, True, False), _case(48, 3, True, True),
                         _case(48, 6, False, True)])
  assert seen[0] == (False, True), seen[0]  # 8 rows = 2 whole classes per device
  assert seen[1][0] and seen[2][0], seen  # classes straddle devices
  _check_compiled_hlo(compiled[0], parallel.data_mesh())
  _check_errors()
  _bucketed_case()
  print("EIGHT_OK")


# ----------------------------------------------------------------------------------------------
# Mode 'process': one of two processes x 4 devices.
# ----------------------------------------------------------------------------------------------


def main_process(out_dir: str) -> None:
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import distributed
  from recall_jax.train import sharded_step
  process_index, process_count = distributed.initialize_distributed()
  import jax
  import orbax.checkpoint as ocp
  from recall_jax.data import sampler as sampler_lib

  assert process_count == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  out = pathlib.Path(out_dir)
  mesh = parallel.data_mesh()
  images, labels = dataset()
  sampler = sampler_lib.MPerClassSampler(labels, GLOBAL_BATCH, M, seed=0)
  loss_fn, uses_rng = loss_fn_for(GLOBAL_BATCH, M, True)
  step_fn = sharded_step.make_sharded_train_step(embed_fn, loss_fn, optimizer(), mesh,
                                                 chunk_size_per_device=1, loss_uses_rng=uses_rng)
  state = sharded_step.make_sharded_state(init_params(), optimizer(), mesh)
  losses = []
  for step in range(STEPS):
    local = sampler.local_slice(sampler.batch_indices(step), process_index, process_count)
    batch = batch_assembly.global_batch({"image": images[local], "label": labels[local]}, mesh)
    state, metrics = step_fn(state, batch["image"], batch["label"],
                             jax.random.fold_in(jax.random.key(0), step))
    losses.append(float(metrics["loss"]))
  manager = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  manager.save(STEPS, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()
  params = {k: np.asarray(v.addressable_data(0)) for k, v in state.params.items()}
  np.savez(out / f"params_{process_index}.npz", **params)
  # Whole images in buckets: process 0's rows need no square slots, process 1's do, so the
  # processes must agree on each bucket's size before the global arrays exist.
  images, own, bucket_labels = bucketed_rows()
  rows = np.arange(BUCKETED_BATCH).reshape(process_count, -1)[process_index]
  local = local_bucketed_images(images, own, rows, chunk_rows=4)
  batch = batch_assembly.global_bucketed_batch({"image": local, "label": bucket_labels[rows]}, mesh)
  bucket_loss_fn, _ = loss_fn_for(BUCKETED_BATCH, M, False)
  vg = jax.jit(sharded_step.sharded_value_and_grad(masked_embed_fn, bucket_loss_fn, mesh,
                                                   chunk_size_per_device=1))
  loss, grads = vg(init_bucketed_params(), batch["image"], batch["label"])
  np.savez(out / f"bucketed_{process_index}.npz", loss=np.asarray(loss.addressable_data(0)),
           **{k: np.asarray(v.addressable_data(0)) for k, v in grads.items()})
  (out / f"losses_{process_index}.json").write_text(json.dumps(losses))
  print(f"PROCESS_{process_index}_OK")


# ----------------------------------------------------------------------------------------------
# Mode 'loss_state': 8 devices, a loss with parameters (proxies) and a cross-batch memory.
# ----------------------------------------------------------------------------------------------

MEMORY_SIZE, MEMORY_START = 40, 1


def loss_state_case(name: str):
  """(loss_fn, has_params, with_memory, loss_params) of one case: Proxy-Anchor with its
  proxies, or RS@k in query/database form with a memory (sized as the trainer sizes it)."""
  import jax
  from recall_jax import losses
  if name == "proxies":
    proxies = losses.init_proxies(jax.random.key(3), NUM_IMAGES // 6, 8)
    return losses.proxy_anchor_loss, True, False, proxies
  return (functools.partial(losses.recall_at_k_database_loss, k_values=(1, 2, 4, 8),
                            max_positives=M + MEMORY_SIZE - 1), False, True, None)


def assert_state_layout(state, mesh) -> None:
  """Everything replicated but the memory's rows: M / 8 of them on each device, in order."""
  import jax
  from jax.sharding import PartitionSpec
  memory_rows = () if state.memory is None else (state.memory.embeddings, state.memory.labels)
  for leaf in jax.tree.leaves(state):
    if any(leaf is rows for rows in memory_rows):
      assert leaf.sharding.spec == PartitionSpec("data"), leaf.sharding
      shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start)
      assert [s.data.shape[0] for s in shards] == [MEMORY_SIZE // 8] * 8, leaf.sharding
      assert [s.index[0].start for s in shards] == list(range(0, MEMORY_SIZE, MEMORY_SIZE // 8))
    else:
      assert leaf.sharding.is_fully_replicated, leaf.sharding


def loss_state_steps(name: str, sharded: bool):
  """`STEPS` train steps of a case, on 8 devices (`sharded`) or on one; the states, as NumPy."""
  import jax
  import optax
  from recall_jax.data import sampler as sampler_lib
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import cross_batch_memory
  from recall_jax.train import sharded_step
  from recall_jax.train import train_step as train_step_lib
  images, labels = dataset()
  sampler = sampler_lib.MPerClassSampler(labels, GLOBAL_BATCH, M, seed=0)
  loss_fn, has_params, with_memory, loss_params = loss_state_case(name)
  loss_optimizer = optax.adam(0.05) if has_params else None
  memory = cross_batch_memory.init(MEMORY_SIZE, 8) if with_memory else None
  kwargs = dict(loss_has_params=has_params, loss_optimizer=loss_optimizer,
                with_memory=with_memory, memory_start_step=MEMORY_START)
  if sharded:
    mesh = parallel.data_mesh()
    step_fn = sharded_step.make_sharded_train_step(embed_fn, loss_fn, optimizer(), mesh,
                                                   chunk_size_per_device=2, **kwargs)
    state = sharded_step.make_sharded_state(init_params(), optimizer(), mesh,
                                            loss_params=loss_params,
                                            loss_optimizer=loss_optimizer, memory=memory)
    assert_state_layout(state, mesh)
  else:
    step_fn = train_step_lib.make_train_step(embed_fn, loss_fn, optimizer(), chunk_size=8,
                                             **kwargs)
    state = train_step_lib.init_train_state(jax.tree.map(jax.numpy.asarray, init_params()),
                                            optimizer(), loss_params, loss_optimizer, memory)
  losses, states = [], []
  for step in range(STEPS):
    idx = sampler.batch_indices(step)
    if sharded:
      batch = batch_assembly.global_batch({"image": images[idx], "label": labels[idx]}, mesh)
      state, metrics = step_fn(state, batch["image"], batch["label"], None)
      assert_state_layout(state, mesh)
    else:
      state, metrics = step_fn(state, images[idx], labels[idx], None)
    losses.append(float(metrics["loss"]))
    states.append(jax.tree.map(np.asarray, state))
  return losses, states


def _bucketed_proxies_case() -> None:
  """Whole images in buckets with Proxy-Anchor on 8 devices == unpadded backprop on one, for
  the model's and the proxies' gradients alike."""
  import jax
  import jax.numpy as jnp
  from recall_jax import losses
  from recall_jax import parallel
  from recall_jax.train import batch_assembly
  from recall_jax.train import sharded_step
  mesh = parallel.data_mesh()
  images, own, labels = bucketed_rows()
  proxies = losses.init_proxies(jax.random.key(5), BUCKETED_BATCH // M, 8)
  params = jax.tree.map(jnp.asarray, init_bucketed_params())

  def total_loss(p, q):
    embeddings = jnp.concatenate([masked_embed_fn(p, jnp.asarray(x)[None], None)
                                  for x in images])
    return losses.proxy_anchor_loss(embeddings, jnp.asarray(labels), q)

  with jax.default_device(jax.devices()[0]):
    want_loss, want_grads = jax.value_and_grad(total_loss, argnums=(0, 1))(params, proxies)
  local = local_bucketed_images(images, own, np.arange(BUCKETED_BATCH), chunk_rows=8)
  batch = batch_assembly.global_bucketed_batch({"image": local, "label": labels}, mesh)
  vg = jax.jit(sharded_step.sharded_value_and_grad(
      masked_embed_fn, losses.proxy_anchor_loss, mesh, chunk_size_per_device=1,
      loss_has_params=True))
  loss, grads = vg(params, batch["image"], batch["label"], loss_params=proxies)
  assert relative_error(loss, want_loss) <= 1e-5, (float(loss), float(want_loss))
  assert_trees_close(grads, want_grads, rtol=1e-4, what="bucketed proxies grad ")
  print("loss state ok: bucketed proxies")


def main_loss_state() -> None:
  import jax
  assert jax.device_count() == 8, jax.devices()
  for name in ("proxies", "memory"):
    with jax.default_device(jax.devices()[0]):
      want_losses, want_states = loss_state_steps(name, sharded=False)
    got_losses, got_states = loss_state_steps(name, sharded=True)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for step, (got, want) in enumerate(zip(got_states, want_states)):
      assert_trees_close(got.params, want.params, what=f"{name} step {step} params ")
      if name == "proxies":  # a psum would move the proxies 8 times as far
        assert_trees_close(got.loss_params, want.loss_params, what=f"{name} proxies ")
        assert_trees_close(got.loss_opt_state, want.loss_opt_state, what=f"{name} adam ")
      else:
        np.testing.assert_array_equal(got.memory.labels, want.memory.labels)
        # Written from step MEMORY_START on: after update `step`, step - MEMORY_START + 1 batches.
        filled = min(GLOBAL_BATCH * (step - MEMORY_START + 1), MEMORY_SIZE) if step else 0
        assert int(got.memory.count) == int(want.memory.count) == filled, step
        assert_trees_close(got.memory.embeddings, want.memory.embeddings, what=f"memory {step} ")
    print(f"loss state ok: {name}")
  _bucketed_proxies_case()
  print("LOSS_STATE_OK")


if __name__ == "__main__":
  import chex
  if sys.argv[1] == "eight":
    chex.set_n_cpu_devices(8)  # before JAX starts its backend
    main_eight()
  elif sys.argv[1] == "loss_state":
    chex.set_n_cpu_devices(8)
    main_loss_state()
  elif sys.argv[1] == "process":
    chex.set_n_cpu_devices(4)
    main_process(sys.argv[2])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
