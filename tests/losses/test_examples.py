"""The Examples in the public docstrings of the losses and SiMix run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "recall_jax.losses.recall_at_k",
    "recall_jax.losses.smooth_ap",
    "recall_jax.losses.contrastive",
    "recall_jax.losses.multi_similarity",
    "recall_jax.losses.proxy_anchor",
    "recall_jax.losses.normalized_softmax",
    "recall_jax.simix",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
