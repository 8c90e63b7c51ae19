"""Evaluation protocols (recall_jax.train.eval_protocols): Recall@k sets or the revisited
benchmarks, picked once from the config.

Serves both tasks. The revisited protocol's evaluator and descriptors are tested against NumPy in
test_landmarks.py; `--mode eval` end to end in tests/test_main.py and test_landmarks.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from recall_jax import config as config_lib
from recall_jax import errors
from recall_jax.train import components
from recall_jax.train import eval_protocols


def test_make_protocol_picks_the_protocol_without_reading_data(tmp_path):
  c = config_lib.base_config()
  c.data.name, c.data.root, c.data.download = "omniglot", str(tmp_path / "none"), False
  recall = eval_protocols.make_protocol(c)  # the evaluated sets are read on first use
  assert type(recall) is eval_protocols.RecallProtocol
  with pytest.raises(errors.UserInputError):
    recall.eval_sets  # noqa: B018
  c.eval.datasets = ("roxford5k",)
  revisited = eval_protocols.make_protocol(c)
  assert type(revisited) is eval_protocols.RevisitedProtocol and revisited.eval_sets == {}


def test_recall_protocol_embeds_a_split_as_it_scores_it(omniglot_root):
  """The descriptors `--mode embed` writes are the ones the evaluation ranks."""
  c = config_lib.smoke(config_lib.base_config())
  c.data.name, c.data.image_size, c.data.resize_size, c.data.channels = "omniglot", 28, 28, 1
  c.model.name, c.data.max_eval_images, c.data.test_splits = "small_cnn", 48, ("test",)
  protocol = eval_protocols.make_protocol(c)
  model = components.make_model(c)
  frozen = components.make_variables(c, model)
  params = frozen.pop("params")
  result = protocol.make_evaluator(model, frozen, log_fn=None, progress=False)(params, 0)
  assert set(protocol.eval_sets) == {"test"} and result.metrics["test/num_queries"] == 48
  embeddings, labels, indices = protocol.describe_split(
      model, frozen, params, protocol.eval_sets["test"].database, desc="test")
  scored = result.embeddings["test"]
  np.testing.assert_array_equal(indices, np.arange(48))
  np.testing.assert_array_equal(labels, scored.labels)
  np.testing.assert_allclose(embeddings, scored.embeddings, rtol=1e-6, atol=1e-6)
