"""The model, its variables, a data split and the model's input from a config.

Serves both tasks. These are the pieces that training (`experiment`), the checkpoint programs
(`modes`, `landmarks`, `recall_jax.serve`) and the evaluation protocols build alike; this module
imports none of them, so each can import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from recall_jax import data
from recall_jax import models
from recall_jax.data.source import LabelledSource

PyTree = Any


def make_model(c: ml_collections.ConfigDict) -> nn.Module:
  """The configured backbone + head (`model.head` / `model.whiten` where set, for ResNets)."""
  heads = {"head": c.model.head} if c.model.get("head") else {}
  heads["remat"] = c.model.get("remat", "none")
  model = models.get_model(c.model.name, embedding_dim=c.model.embedding_dim,
                           dtype=jnp.dtype(c.model.dtype), image_size=c.data.image_size, **heads)
  if getattr(model, "head", None) == "landmark" and not c.model.get("whiten", True):
    model = model.clone(whiten=False)
  return model


def make_variables(c: ml_collections.ConfigDict, model: nn.Module) -> dict[str, PyTree]:
  """Fresh variables, with the pretrained weights loaded when the config names them."""
  variables = models.init_variables(model, jax.random.key(c.seed), c.data.image_size,
                                    channels=c.data.channels)
  if c.model.pretrained:
    variables = models.load_pretrained(c.model.name, variables, c.model.pretrained)
  if c.model.get("whitening_init"):
    variables = models.load_whitening(variables, c.model.whitening_init)
  return variables


def make_source(c: ml_collections.ConfigDict, split: str, *,
                max_images: int | None = None) -> LabelledSource:
  """One split of the configured dataset (its first `max_images` records when given)."""
  source = data.load_split(c.data.name, split, data_root=c.data.root, path=c.data.path,
                           download=c.data.download)
  return data.FirstN(source, max_images) if max_images else source


def model_inputs(images: jax.Array, masked: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A batch as the model takes it: (pixels, {'mask': ...}) when the last channel is the mask.

  Args:
    images: (B, H, W, C) images, or (B, H, W, C + 1) with `masked`: whole images padded into an
      aspect bucket, the pixels' validity mask as the last channel.
    masked: whether the last channel is the mask.
  """
  if not masked:
    return images, {}
  pixels, mask = data.split_mask_channel(images)
  return pixels, {"mask": mask}


def make_embed_fn(model: nn.Module, frozen: dict[str, PyTree], *, masked: bool = False
                  ) -> Callable[[PyTree], Callable[[jax.Array], jax.Array]]:
  """params -> `embed_fn(images) -> embeddings` in inference mode (one jitted function).

  With `masked`, the images' last channel is the pixels' validity mask (`model_inputs`).
  """
  def apply(params, images):
    images, mask = model_inputs(images, masked=masked)
    return model.apply({"params": params, **frozen}, images, train=False, **mask)

  apply = jax.jit(apply)
  return lambda params: functools.partial(apply, params)
