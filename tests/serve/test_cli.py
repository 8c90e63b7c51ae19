"""Your own images end to end through `python -m recall_jax.main`: train, evaluate, embed, search,
export, on a folder dataset and a CSV one with query/gallery splits, of real Omniglot PNGs (a few
classes, 28 px, 3 steps)."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import PIL.Image
import pytest

from recall_jax.serve.gallery import ImageTransform, load_image

REPO = pathlib.Path(__file__).resolve().parents[2]
TRANSFORM = ImageTransform(image_size=28, resize_size=32, channels=1)

CONFIG = '''
from recall_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.name = "folder"
  c.data.image_size, c.data.resize_size, c.data.channels = 28, 32, 1
  c.data.crop_scale = (1.0, 1.0)
  c.data.flip = False
  c.data.eval_batch_size = 16
  c.model.name = "small_cnn"
  c.model.embedding_dim = 16
  c.batch_size, c.samples_per_class, c.chunk_size = 16, 4, 8
  c.loss.recall_at_k.k_values = (1, 2, 4, 8)
  c.loss.warmup_name = "smooth_ap"
  c.loss.warmup_steps = 2
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.epochs, c.max_steps, c.eval_every_epochs = 100, 3, 100
  c.checkpoint_every_steps = 100
  c.log_every_steps = 1
  c.num_grid_queries = 2
  c.best_metric = "test/recall@1"
  return c
'''


def _omniglot_pngs(num_classes: int, per_class: int) -> list[list[bytes]]:
  """PNG bytes of the first `per_class` drawings of `num_classes` Omniglot characters."""
  root = pathlib.Path(os.environ.get("RECALL_JAX_DATA", ""))
  archive = root / "omniglot" / "images_background.zip"
  if not archive.is_file():
    pytest.skip(f"Omniglot archive not found under {root}/omniglot (set RECALL_JAX_DATA)")
  with zipfile.ZipFile(archive) as z:
    by_class: dict[str, list[str]] = {}
    for name in sorted(z.namelist()):
      if name.endswith(".png"):
        by_class.setdefault(name.rsplit("/", 1)[0], []).append(name)
    classes = sorted(by_class)[:num_classes]
    return [[z.read(m) for m in by_class[c][:per_class]] for c in classes]


def _write_tree(folder: pathlib.Path, classes: list[list[bytes]], names: list[str]) -> None:
  for name, images in zip(names, classes, strict=True):
    (folder / name).mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(images):
      (folder / name / f"{i:02d}.png").write_bytes(png)


def _main(*args: str, workdir: pathlib.Path, config: pathlib.Path,
          timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", str(config), "--workdir",
       str(workdir), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _train(tmp: pathlib.Path, data: pathlib.Path, *extra: str) -> pathlib.Path:
  config = tmp / "config.py"
  config.write_text(CONFIG)
  workdir = tmp / "run"
  proc = _main(f"--config.data.path={data}", f"--config.data.root={tmp / 'root'}", *extra,
               workdir=workdir, config=config)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """A folder dataset (6 training classes of 6 images, 3 test classes of 5) and a trained run."""
  tmp = tmp_path_factory.mktemp("folder")
  classes = _omniglot_pngs(9, 6)
  data = tmp / "photos"
  _write_tree(data / "train", classes[:6], [f"char{i}" for i in range(6)])
  _write_tree(data / "test", [c[:5] for c in classes[6:]], [f"char{i}" for i in range(6, 9)])
  workdir = _train(tmp, data)
  config = tmp / "config.py"
  extra = (f"--config.data.path={data}", f"--config.data.root={tmp / 'root'}")
  return tmp, data, workdir, lambda *args: _main(*extra, *args, workdir=workdir, config=config)


def test_train_evaluates_with_warmup_loss_then_rsk(folder_run):
  _, _, workdir, _ = folder_run
  rows = _rows(workdir)
  train = [r for r in rows if r["kind"] == "train"]
  assert [r["loss_name"] for r in train] == ["smooth_ap", "smooth_ap", "recall_at_k"]
  (evaluation,) = [r for r in rows if r["kind"] == "eval"]
  assert evaluation["step"] == 3
  assert 0 <= evaluation["test/recall@1"] <= evaluation["test/recall@8"] <= 1
  assert evaluation["test/num_queries"] == 15
  # The start is checked at the first RS@k step (after the warm-up), not before.
  (check,) = [r for r in rows if r["kind"] == "cold_start"]
  assert check["step"] == 2
  assert 1 <= check["median_positive_rank"] <= 15 and check["rsk_gradient_norm"] >= 0


def test_search_finds_a_gallery_image_first_and_skips_non_images(folder_run):
  tmp, data, workdir, main = folder_run
  gallery = tmp / "gallery"
  shutil.copytree(data / "test", gallery / "nested")
  jpeg = io.BytesIO()
  PIL.Image.open(data / "test" / "char6" / "00.png").convert("RGB").save(jpeg, format="JPEG")
  (gallery / "corrupt.jpg").write_bytes(jpeg.getvalue()[:300])  # truncated
  (gallery / "empty.png").write_bytes(b"")
  (gallery / "notes.txt").write_text("not an image\n")
  query = gallery / "nested" / "char7" / "03.png"
  output = tmp / "out" / "results.json"
  proc = main("--mode=search", f"--gallery={gallery}", f"--query={query}", "--top_k=4",
              f"--output={output}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped 3 files that are not images" in proc.stdout
  results = json.loads(output.read_text())
  assert list(results) == [str(query)]
  top = results[str(query)]
  assert len(top) == 4
  assert top[0]["path"] == str(query)
  assert top[0]["score"] == pytest.approx(1.0, abs=1e-5)
  assert all(a["score"] >= b["score"] for a, b in zip(top, top[1:]))
  assert output.with_suffix(".png").stat().st_size > 0
  assert list((workdir / "search_cache").glob("gallery_*.npz"))


@pytest.mark.parametrize("args, message", [
    (["--query={tmp}/no_such.png", "--gallery={tmp}/photos/test"], "does not exist"),
    (["--query={tmp}/photos/test/char6/00.png", "--gallery={tmp}/empty_gallery"],
     "holds no files"),
    (["--gallery={tmp}/photos/test"], "--mode search needs --gallery DIR"),
])
def test_search_bad_input_is_one_line(folder_run, args, message):
  tmp, _, _, main = folder_run
  (tmp / "empty_gallery").mkdir(exist_ok=True)
  proc = main("--mode=search", *[a.format(tmp=tmp) for a in args])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_exported_embedder_matches_the_checkpoint(folder_run):
  tmp, data, _, main = folder_run
  embeddings_path, embedder_path = tmp / "test_embeddings.npz", tmp / "embedder.bin"
  proc = main("--mode=embed", "--split=test", f"--output={embeddings_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = main("--mode=export", f"--output={embedder_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = np.load(embeddings_path)
  images = np.stack([load_image(data / "test" / i, TRANSFORM) for i in saved["ids"]])
  # Only jax: what a service without this package does.
  exported = jax.export.deserialize(embedder_path.read_bytes())
  np.testing.assert_allclose(np.asarray(exported.call(images)), saved["embeddings"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(exported.call(images[:3])), saved["embeddings"][:3],
                             atol=1e-5)


def test_csv_dataset_with_query_and_gallery_splits(tmp_path):
  # `train.csv`, `query.csv` and `gallery.csv` (`path,label`): queries searched in a separate
  # gallery, labels shared between the two.
  classes = _omniglot_pngs(9, 6)
  data = tmp_path / "listed"
  _write_tree(data / "images", classes, [f"c{i}" for i in range(9)])
  splits = {"train": [(label, i) for label in range(6) for i in range(6)],
            "query": [(label, i) for label in range(6, 9) for i in range(2)],
            "gallery": [(label, i) for label in range(6, 9) for i in range(2, 6)]}
  for split, rows in splits.items():
    with open(data / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["path", "label"])
      writer.writerows([f"images/c{label}/{i:02d}.png", label] for label, i in rows)
  workdir = _train(tmp_path, data, "--config.data.query_split=query",
                   "--config.data.gallery_split=gallery", "--config.best_metric=query/recall@1")
  (evaluation,) = [r for r in _rows(workdir) if r["kind"] == "eval"]
  assert evaluation["query/num_queries"] == 6
  assert 0 <= evaluation["query/recall@1"] <= evaluation["query/recall@4"] <= 1
  assert (workdir / "best").is_dir()


def _run_main(folder_run, *args: str, workdir: pathlib.Path | None = None,
              **env: str) -> subprocess.CompletedProcess:
  """`_main` on the trained run's config and data, with extra environment variables."""
  tmp, data, trained, _ = folder_run
  command = [sys.executable, "-m", "recall_jax.main", "--config", str(tmp / "config.py"),
             "--workdir", str(workdir or trained), f"--config.data.path={data}",
             f"--config.data.root={tmp / 'root'}", *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **env}, errors="backslashreplace")


def test_search_with_non_utf8_file_names_on_a_strict_utf8_console(folder_run):
  tmp, data, _, _ = folder_run
  gallery = tmp / "latin1_gallery"
  shutil.copytree(data / "test" / "char6", gallery)
  odd = gallery / os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
  shutil.copy(gallery / "00.png", odd)
  output = tmp / "latin1" / "results.json"
  proc = _run_main(folder_run, "--mode=search", f"--gallery={gallery}", f"--query={odd}",
                   "--top_k=2", f"--output={output}", PYTHONIOENCODING="utf-8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "caf\\xe9 \\xff.png" in proc.stdout
  results = json.loads(output.read_text(encoding="ascii"))
  (query,) = results
  assert os.fsencode(query) == os.fsencode(odd)
  assert {os.fsencode(n["path"]) for n in results[query]} == {os.fsencode(odd),
                                                              os.fsencode(gallery / "00.png")}


def test_search_with_an_unwritable_workdir_caches_in_the_user_cache_folder(folder_run):
  tmp, _, trained, _ = folder_run
  workdir = tmp / "unwritable_run"
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("search_cache"))
  # What a read-only workdir refuses (root writes anywhere): the default cache folder's creation.
  (workdir / "search_cache").write_text("a file where the cache folder would be\n")
  output = tmp / "elsewhere" / "results.json"
  query = tmp / "photos" / "test" / "char8" / "01.png"
  proc = _run_main(folder_run, "--mode=search", f"--gallery={tmp / 'photos' / 'test'}",
                   f"--query={query}", "--top_k=3", f"--output={output}", workdir=workdir,
                   XDG_CACHE_HOME=str(tmp / "user_cache"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(output.read_text())[str(query)][0]["path"] == str(query)
  assert list((tmp / "user_cache" / "recall_jax" / "search_cache").glob("gallery_*.npz"))
  # --cache_dir chooses the folder.
  proc = _run_main(folder_run, "--mode=search", f"--gallery={tmp / 'photos' / 'test'}",
                   f"--query={query}", f"--output={output}", f"--cache_dir={tmp / 'chosen'}",
                   workdir=workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list((tmp / "chosen").glob("gallery_*.npz"))


@pytest.mark.parametrize("mode, output, message", [
    ("search", "{tmp}", "is a folder; name the file to write"),
    ("search", "{tmp}/config.py/results.json", "its folder is not writable"),
    ("export", "{tmp}", "is a folder; name the file to write"),
    ("export", "{tmp}/config.py/embedder.bin", "its folder is not writable"),
])
def test_unwritable_output_is_one_line_before_any_work(folder_run, mode, output, message):
  tmp, _, _, _ = folder_run
  query = tmp / "photos" / "test" / "char8" / "01.png"
  proc = _run_main(folder_run, f"--mode={mode}", f"--output={output.format(tmp=tmp)}",
                   f"--gallery={tmp / 'photos' / 'test'}", f"--query={query}",
                   f"--cache_dir={tmp / 'never_written'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not list((tmp / "never_written").glob("*"))


def test_help_lists_every_mode_and_the_config_keys():
  proc = subprocess.run([sys.executable, "-m", "recall_jax.main", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for mode in ("train", "eval", "embed", "search", "export", "whiten"):
    assert f"{mode} (" in proc.stdout, mode
  assert "configs/default.py" in proc.stdout and "--cache_dir" in proc.stdout
