"""Users' own listings and missing benchmarks (`recall_jax.data.parsing`, `datasets.load_split`)."""

from __future__ import annotations

import logging

import PIL.Image
import pytest

from recall_jax.data import datasets, parsing
from recall_jax.errors import MissingFileError


def test_csv_rows_listed_twice_are_stored_once_with_a_warning(tmp_path, caplog):
  for name in ("a", "b", "c"):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
  listing = tmp_path / "train.csv"
  listing.write_text("path,label\na.png,cat\nb.png,cat\nc.png,dog\n./a.png,cat\nb.png,cat\n"
                     "b.png,dog\n")
  with caplog.at_level(logging.WARNING, logger=parsing.__name__):
    (plan,) = parsing.parse_folder(listing, "train").values()
  assert [(r.image_id, plan.class_names[r.label]) for r in plan.records] == [
      ("a.png", "cat"), ("b.png", "cat"), ("c.png", "dog"), ("b.png", "dog")]
  (warning,) = [r.getMessage() for r in caplog.records]
  assert "2 rows repeat an earlier row and are stored once: lines 5 (as 2), 6 (as 3)" in warning


@pytest.mark.parametrize("name, page", [
    ("sop", "https://cvgl.stanford.edu/projects/lifted_struct/"),
    ("cub200", "https://www.vision.caltech.edu/datasets/cub_200_2011/"),
])
def test_missing_benchmark_says_the_flag_the_docs_and_the_official_page(tmp_path, name, page):
  with pytest.raises(MissingFileError) as raised:
    datasets.load_split(name, "train", data_root=tmp_path)
  message = str(raised.value)
  assert "\n" not in message
  assert "--config.data.path=" in message and "docs/data.md" in message and page in message
