"""Input layouts: how training images are loaded, assembled over the mesh and fed to the model.

Serves both tasks, one class each, picked once from the config by `make_layout`:

- `SquareCrops` (category-level): random square crops of `data.image_size`, one image array per
  batch.
- `AspectBuckets` (instance-level): whole images, longer side `data.image_size`, padded into a
  few aspect buckets whose slot counts per step come from a `data.BucketPlan`; the pixels'
  validity mask travels as the images' last channel.

The trainer, the experiment and the cold-start check call a layout's methods and never ask which
layout it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from recall_jax import data
from recall_jax.data.source import LabelledSource
from recall_jax.train import batch_assembly
from recall_jax.train import components

PyTree = Any


def _in_chunks(embed: Callable[[Any], jax.Array], images: Any, chunk_size: int) -> jax.Array:
  """`embed` over `images` `chunk_size` rows at a time: (rows, D)."""
  return jnp.concatenate([embed(images[i:i + chunk_size])
                          for i in range(0, len(images), chunk_size)])


@dataclasses.dataclass(frozen=True)
class SquareCrops:
  """Square crops of `data.image_size` (category-level): one (B, S, S, C) array per batch.

  Attributes:
    config: the run's config (data keys).
  """

  config: ml_collections.ConfigDict
  masked = False  # whether the images' last channel is the pixels' validity mask

  @property
  def bucket_plan(self) -> data.BucketPlan | None:
    """Each aspect bucket's training slots per process and step; None for square crops."""
    return None

  def _loader_kwargs(self) -> dict[str, Any]:
    c = self.config
    return {"image_size": c.data.image_size, "seed": c.seed, "channels": c.data.channels,
            "crop_scale": tuple(c.data.crop_scale), "flip": c.data.flip}

  def train_batches(self, source: LabelledSource, sampler: data.MPerClassSampler, *,
                    start_step: int, num_steps: int):
    """This process's slices of training batches `start_step`, ... (a closable iterator)."""
    return data.make_train_loader(
        source, sampler, start_step=start_step, num_steps=num_steps,
        worker_count=self.config.data.worker_count, process_index=jax.process_index(),
        process_count=jax.process_count(), **self._loader_kwargs())

  def global_batch(self, local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """This process's slice of a batch as global arrays over `mesh` (`batch_assembly`)."""
    return batch_assembly.global_batch(local_batch, mesh)

  def first_batch_images(self, source: LabelledSource, sampler: data.MPerClassSampler
                         ) -> jax.Array:
    """The square crops of training batch 0, as the square loop sees them (head centring).

    The config checks refuse `model.center_head_init` with aspect buckets, so only square-crop
    runs centre their head.
    """
    with contextlib.closing(data.make_train_loader(source, sampler, num_steps=1,
                                                   **self._loader_kwargs())) as first:
      return next(first)["image"]

  def train_embed_fn(self, model, frozen: dict[str, PyTree]) -> Callable[..., jax.Array]:
    """`embed_fn(params, images_chunk, rng) -> (chunk, D)` in training mode, for the step."""
    masked = self.masked

    def embed_fn(params, images, rng):
      rngs = {} if rng is None else {"dropout": rng}
      images, mask = components.model_inputs(images, masked=masked)
      return model.apply({"params": params, **frozen}, images, train=True, rngs=rngs, **mask)

    return embed_fn

  def batch_embedder(self, model, frozen: dict[str, PyTree], chunk_size: int
                     ) -> Callable[[PyTree], Callable[[Any], jax.Array]]:
    """params -> (this process's batch images -> (B, D) embeddings in row order), inference
    mode, `chunk_size` images at a time (the cold-start check)."""
    embed_for = components.make_embed_fn(model, frozen, masked=self.masked)
    return lambda params: lambda images: self.embed_rows(embed_for(params), images, chunk_size)

  def embed_rows(self, embed: Callable[[Any], jax.Array], images: Any,
                 chunk_size: int) -> jax.Array:
    """`embed` over a batch's images, `chunk_size` at a time: (B, D) in row order."""
    return _in_chunks(embed, jax.device_get(images), chunk_size)


@dataclasses.dataclass(frozen=True)
class AspectBuckets(SquareCrops):
  """Whole images in aspect buckets (instance-level): `data.BucketedImages` per batch.

  Attributes:
    config: the run's config (data keys).
    plan: each bucket's shape and training slots per process and step.
  """

  plan: data.BucketPlan | None = None
  masked = True

  @property
  def bucket_plan(self) -> data.BucketPlan | None:
    return self.plan

  def train_batches(self, source: LabelledSource, sampler: data.MPerClassSampler, *,
                    start_step: int, num_steps: int):
    return data.make_bucketed_train_loader(
        source, sampler, plan=self.plan, start_step=start_step, num_steps=num_steps,
        worker_count=self.config.data.worker_count, process_index=jax.process_index(),
        process_count=jax.process_count(), **self._loader_kwargs())

  def global_batch(self, local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    return batch_assembly.global_bucketed_batch(local_batch, mesh)

  def embed_rows(self, embed: Callable[[Any], jax.Array], images: data.BucketedImages,
                 chunk_size: int) -> jax.Array:
    slots = data.flat_slots(images.bucket, images.position, tuple(len(b) for b in images.buckets))
    return jnp.concatenate([_in_chunks(embed, b, chunk_size)
                            for b in images.buckets if len(b)])[np.asarray(slots)]


def make_layout(c: ml_collections.ConfigDict, train_source: LabelledSource,
                sampler: data.MPerClassSampler) -> SquareCrops:
  """The config's input layout: `AspectBuckets` with `data.aspect_buckets`, else `SquareCrops`.

  The bucket plan comes from the first batches' images; every process reads the same (global)
  batches, so all compute the same plan.
  """
  if not c.data.aspect_buckets:
    return SquareCrops(c)
  plan = data.estimate_bucket_plan(
      train_source, sampler, image_size=c.data.image_size, num_buckets=c.data.aspect_buckets,
      chunk_rows=c.chunk_size * jax.local_device_count(), process_count=jax.process_count(),
      margin=c.data.bucket_margin)
  return AspectBuckets(c, plan)
