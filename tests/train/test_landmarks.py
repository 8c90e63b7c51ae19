"""The landmark recipe end to end: the smoke configs train on GLDv1 / GLDv2 fixtures in their
official layouts and are evaluated on ROxford5k / RParis6k fixtures through `recall_jax.main`."""

import contextlib
import importlib.util
import io
import json
import pathlib
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import chex
import numpy as np
import optax
import PIL.Image
import pytest

from recall_jax import config as config_lib
from recall_jax import data
from recall_jax import errors
from recall_jax import config_checks
from recall_jax.data import aspect_buckets
from recall_jax.data import landmarks as landmark_data
from recall_jax.evaluation import multiscale
from recall_jax.evaluation import revisited
from recall_jax.evaluation import whitening as whitening_lib
from recall_jax.train import checkpointing
from recall_jax.train import experiment
from recall_jax.train import landmarks
from recall_jax.train import modes
from recall_jax.train import train_step

REPO = pathlib.Path(__file__).resolve().parents[2]
LANDMARKS, IMAGES_PER_LANDMARK = (11, 205, 3070, 99), 4
# (width, height) of the fixture images: landscape, portrait and square, as landmark photos are.
SIZES = ((48, 32), (30, 44), (40, 40), (52, 20))


def _jpeg(path: pathlib.Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  width, height = SIZES[seed % len(SIZES)]
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  PIL.Image.fromarray(pixels).save(path, format="JPEG")


def _image_ids() -> list[tuple[str, int]]:
  return [(f"{landmark:04x}{n:02d}e1f2a3b4c5", landmark)
          for landmark in LANDMARKS for n in range(IMAGES_PER_LANDMARK)]


def write_gldv1(root: pathlib.Path) -> None:
  folder = root / "gldv1"
  rows = ["id,url,landmark_id"]
  for n, (image_id, landmark) in enumerate(_image_ids()):
    _jpeg(folder / "train" / f"{image_id}.jpg", n)
    rows.append(f"{image_id},https://lh3.example.com/{image_id}/s1600/,{landmark}")
  (folder / "train.csv").write_text("\n".join(rows) + "\n")


def write_gldv2(root: pathlib.Path) -> None:
  folder = root / "gldv2"
  by_landmark: dict[int, list[str]] = {}
  for n, (image_id, landmark) in enumerate(_image_ids()):
    _jpeg(folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", n)
    by_landmark.setdefault(landmark, []).append(image_id)
  (folder / "train_clean.csv").write_text("landmark_id,images\n" + "".join(
      f"{k},{' '.join(v)}\n" for k, v in by_landmark.items()))


def write_revisited(root: pathlib.Path, name: str, seed: int = 100) -> None:
  folder = root / name
  database = [f"{name}_db_{n:06d}" for n in range(6)]
  queries = [f"{name}_q_{n:06d}" for n in range(2)]
  for n, image in enumerate(database + queries):
    _jpeg(folder / "jpg" / f"{image}.jpg", seed + n)
  gnd = [{"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [2.0, 3.5, 27.0, 19.0]},
         {"easy": [4], "hard": [5], "junk": [], "bbx": [0.0, 0.0, 20.0, 28.0]}]
  (folder / f"gnd_{name}.pkl").write_bytes(
      pickle.dumps({"imlist": database, "qimlist": queries, "gnd": gnd}))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("landmark_data")
  write_gldv1(root)
  write_gldv2(root)
  write_revisited(root, "roxford5k", seed=100)
  write_revisited(root, "rparis6k", seed=200)
  return root


def _main(config: str, workdir: pathlib.Path, root: pathlib.Path, *extra: str):
  return subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", config, "--workdir", str(workdir),
       f"--config.data.root={root}", "--config.data.check_sizes=False", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=600)


def _eval_rows(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if row["kind"] == "eval"]


def _check_revisited_metrics(row: dict) -> None:
  for name in ("roxford5k", "rparis6k"):
    for protocol in ("medium", "hard"):  # the configs' protocols
      for metric in ("map", "mp@1", "mp@5", "mp@10"):
        assert 0.0 <= row[f"{name}/{protocol}/{metric}"] <= 1.0
    assert f"{name}/easy/map" not in row


def _check_table(stdout: str) -> None:
  lines = stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split() == ["Easy", "Medium", "Hard"])
  assert lines[header + 1].split()[:3] == ["setting", "mAP", "mP@1"]
  assert [line.split()[0] for line in lines[header + 2:header + 4]] == ["roxford5k", "rparis6k"]


@pytest.mark.parametrize("recipe", ["gldv1", "gldv2"])
def test_smoke_config_trains_and_runs_the_revisited_evaluation(data_root, tmp_path, recipe):
  workdir = tmp_path / recipe
  proc = _main(f"configs/{recipe}_resnet101.py:smoke", workdir, data_root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check_table(proc.stdout)
  rows = _eval_rows(workdir)
  assert [row["step"] for row in rows] == [2]
  _check_revisited_metrics(rows[0])
  if recipe == "gldv1":
    # --mode eval of the checkpoint: the same table, the same metrics appended.
    proc = _main(f"configs/{recipe}_resnet101.py:smoke", workdir, data_root, "--mode=eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_table(proc.stdout)
    rows = _eval_rows(workdir)
    assert len(rows) == 2
    assert rows[1]["roxford5k/medium/map"] == pytest.approx(rows[0]["roxford5k/medium/map"],
                                                            abs=1e-6)
    # A landmark run has no test split to embed by default: one line, not an IndexError.
    proc = _main(f"configs/{recipe}_resnet101.py:smoke", workdir, data_root, "--mode=embed")
    assert proc.returncode == 2 and "name one with --split" in proc.stderr, proc.stderr[-2000:]


def test_official_sizes_are_checked_unless_switched_off(data_root, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "recall_jax.main", "--config", "configs/gldv1_resnet101.py:smoke",
       "--workdir", str(tmp_path), f"--config.data.root={data_root}", "--mode=eval"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "the official files have (4993, 70)" in proc.stderr
  assert "Traceback" not in proc.stderr


def _landmark_config():
  c = config_lib.base_config()
  c.model.name = "resnet_tiny_landmark_test"
  c.data.test_splits = ()
  c.eval.datasets = ("roxford5k",)
  c.best_metric = "roxford5k/medium/map"
  return c


def test_landmark_keys_are_validated(tmp_path):
  c = _landmark_config()
  config_lib.validate(c)
  assert config_lib.evaluated_sets(c) == ("roxford5k",)
  c.data.distractors = "revisitop1m"
  assert config_lib.evaluated_sets(c) == ("roxford5k", "roxford5k+revisitop1m")
  c.eval.datasets = ("roxford5k", "holidays")
  c.eval.protocols = ("medium", "extreme")
  c.eval.scales = (1.0, 0.0)
  c.model.head = "mlp"
  c.eval.whitening = str(tmp_path / "missing.npz")
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(c)
  for expected in ("holidays", "extreme", "eval.scales", "model.head", "missing.npz"):
    assert expected in str(info.value)
  c = _landmark_config()
  c.data.aspect_buckets = 2
  c.model.center_head_init = True
  with pytest.raises(errors.ConfigError, match="center_head_init"):
    config_lib.validate(c)
  c = _landmark_config()
  c.model.name = "vit_tiny_test"
  with pytest.raises(errors.ConfigError, match="pixel mask"):
    config_lib.validate(c)


def test_check_constants_match_the_packages():
  assert config_checks.REVISITED_DATASETS == tuple(sorted(landmark_data.REVISITED_SIZES))
  assert config_checks.PROTOCOLS == revisited.PROTOCOLS
  assert config_checks.DISTRACTORS == ("revisitop1m",)


def _config(name: str, arg: str | None = "smoke"):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_whiten_mode_writes_the_whitening_that_initialises_the_fc(tmp_path):
  folder = tmp_path / "data" / "gldv2"
  rows = ["landmark_id,images"]
  for landmark in range(24):
    ids = [f"{landmark:03d}{n}abcdef" for n in range(2)]
    for n, image_id in enumerate(ids):
      _jpeg(folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg",
            2 * landmark + n)
    rows.append(f"{landmark},{' '.join(ids)}")
  (folder / "train_clean.csv").write_text("\n".join(rows) + "\n")
  c = _config("gldv2_resnet101")
  c.data.root = str(tmp_path / "data")
  c.data.image_size = c.data.resize_size = 32
  c.data.eval_batch_size = 16
  c.data.max_eval_images = None
  c.eval.whitening_target = "fc_init"  # the pooled GeM before the FC
  k = c.model.embedding_dim  # the FC keeps the leading k whitened directions
  # A random tiny ResNet has dead channels: its 256-d descriptors span fewer dimensions, which a
  # learned whitening refuses clearly; PCA-whitening keeps the k leading ones.
  with pytest.raises(errors.DataError, match="singular"):
    landmarks.learn_whitening_file(c, tmp_path / "run", output=str(tmp_path / "w.npz"))
  path = landmarks.learn_whitening_file(c, tmp_path / "run", output=str(tmp_path / "w.npz"),
                                        kind="pca", dim=k)
  whitening = whitening_lib.load_whitening(path)
  assert whitening.kind == "pca" and whitening.projection.shape == (k, 256)
  assert whitening.space["target"] == "fc_init" and not whitening.space["fc"]
  assert whitening.space["scales"] == [1.0] and whitening.space["dim_in"] == 256

  c.model.whitening_init = str(path)
  config_lib.validate(c)  # recorded in the FC's input space: accepted for model.whitening_init
  c.eval.whitening = str(path)
  with pytest.raises(errors.ConfigError,
                     match="eval.whitening file .* was learned for embedding_dim=None, fc=False"):
    config_lib.validate(c)  # the recipe's evaluation describes after the FC, at three scales
  c.eval.whitening = None
  model = experiment.make_model(c)
  fc = experiment.make_variables(c, model)["params"]["landmark_head"]["whitening"]
  np.testing.assert_allclose(fc["kernel"], whitening.projection[:k].T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fc["bias"], -whitening.projection[:k] @ whitening.mean, rtol=1e-4,
                             atol=1e-4)


def _save_checkpoint(c, workdir: pathlib.Path, shift_last_block: float = 0.0):
  """A step-1 checkpoint of the config's model with changed parameters: GeM p = 3.5, and the last
  block's BatchNorm biases raised by `shift_last_block` (so its ReLUs stay on). Returns the model,
  its frozen variables and the parameters saved."""
  model = experiment.make_model(c)
  variables = experiment.make_variables(c, model)
  params = flax.core.unfreeze(variables.pop("params"))
  params["landmark_head"]["gem"] = jax.tree.map(lambda p: p + 0.5,
                                                params["landmark_head"]["gem"])
  block = params["backbone"]["layer4_0"]
  for norm in ("bn3", "downsample_bn"):
    block[norm]["bias"] = block[norm]["bias"] + shift_last_block
  state = train_step.init_train_state(params, optax.adam(1e-3))
  checkpointing.save(checkpointing.make_checkpoints(workdir).latest,
                     state.replace(step=jnp.asarray(1, jnp.int32)), {"best_value": 0.0})
  return model, variables, params


def _unpadded(source, image_size: int) -> list[np.ndarray]:
  """Each image as PIL decodes it, downscaled by PIL only when larger than `image_size` (the
  reference code's `thumbnail`): images no larger keep their native size."""
  images = []
  for i in range(len(source)):
    with PIL.Image.open(io.BytesIO(source[i]["image"])) as image:
      image = image.convert("RGB")
      if max(image.size) > image_size:
        scale = image_size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             PIL.Image.BILINEAR)
      images.append(np.asarray(image))
  return images


def _apply_unpadded(model, variables, images: list[np.ndarray]) -> np.ndarray:
  """The model on each unpadded image (images of one shape in one batch), float64, in order."""
  rows: dict[int, np.ndarray] = {}
  for shape in {image.shape for image in images}:
    same = [i for i, image in enumerate(images) if image.shape == shape]
    outputs = model.apply(variables, np.stack([images[i] for i in same]), train=False)
    rows.update(zip(same, np.asarray(outputs, np.float64)))
  return np.stack([rows[i] for i in range(len(images))])


def _whitened(x: np.ndarray, whitening) -> np.ndarray:
  """NumPy float64 test-time whitening: L2, x -> P (x - m), L2."""
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  y = (x - whitening.mean) @ whitening.projection.T
  return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_embed_mode_writes_the_evaluations_descriptors_of_whole_images(data_root, tmp_path):
  c = _config("gldv1_resnet101")
  c.data.root, c.data.check_sizes = str(data_root), False
  workdir = tmp_path / "run"
  model, frozen, params = _save_checkpoint(c, workdir)
  source = experiment.make_source(c, "train")
  path = modes.embed_split(c, workdir, split="train", output=str(tmp_path / "multi.npz"))
  written = np.load(path)
  assert written["embeddings"].shape == (len(source), c.model.embedding_dim)
  np.testing.assert_array_equal(written["labels"], [source[i]["label"] for i in range(len(source))])
  np.testing.assert_array_equal(written["ids"], [source[i]["id"] for i in range(len(source))])
  # The multi-scale descriptors of the evaluation, from batches padded to other buckets.
  assert len(c.eval.scales) == 3 and c.data.aspect_buckets > 1
  describe = landmarks.make_describe_fn(c, model, frozen)(params)
  batches = data.make_bucketed_eval_loader(source, image_size=c.data.image_size, batch_size=3,
                                           num_buckets=c.data.aspect_buckets)
  expected = np.concatenate([np.asarray(describe(b["image"]))[b["mask"]] for b in batches])
  np.testing.assert_allclose(written["embeddings"], expected, atol=1e-5)

  # One scale: the model on each unpadded image; with eval.whitening, whitened as in NumPy.
  c.eval.scales = (1.0,)
  path = modes.embed_split(c, workdir, split="train", output=str(tmp_path / "single.npz"))
  unpadded = _apply_unpadded(model, {"params": params, **frozen},
                            _unpadded(source, c.data.image_size))
  np.testing.assert_allclose(np.load(path)["embeddings"], unpadded, atol=1e-5)
  rng = np.random.default_rng(0)
  whitening = whitening_lib.Whitening(rng.normal(size=16) / 4, rng.normal(size=(8, 16)), "pca")
  whitening_lib.save_whitening(tmp_path / "w.npz", whitening)
  c.eval.whitening = str(tmp_path / "w.npz")
  path = modes.embed_split(c, workdir, split="train", output=str(tmp_path / "whitened.npz"))
  np.testing.assert_allclose(np.load(path)["embeddings"], _whitened(unpadded, whitening),
                             atol=1e-5)

  # The same through the command line.
  proc = _main("configs/gldv1_resnet101.py:smoke", workdir, data_root, "--mode=embed",
               "--split=train", f"--output={tmp_path / 'cli.npz'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cli = np.load(tmp_path / "cli.npz")
  np.testing.assert_allclose(cli["embeddings"], written["embeddings"], atol=1e-6)
  np.testing.assert_array_equal(cli["ids"], written["ids"])


def _write_gldv2_pairs(root: pathlib.Path, num_landmarks: int, per_landmark: int) -> None:
  folder = root / "gldv2"
  rows = ["landmark_id,images"]
  for landmark in range(num_landmarks):
    ids = [f"{landmark:03d}{n}abcdef" for n in range(per_landmark)]
    for n, image_id in enumerate(ids):
      _jpeg(folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg",
            per_landmark * landmark + n)
    rows.append(f"{landmark},{' '.join(ids)}")
  (folder / "train_clean.csv").write_text("\n".join(rows) + "\n")


def test_learned_whitening_of_full_rank_descriptors_end_to_end(tmp_path):
  # 100 landmarks x 4 images: 300 independent pair differences for 256-d descriptors. Raising the
  # last block's BatchNorm biases keeps its ReLUs on, so no descriptor channel is constant.
  _write_gldv2_pairs(tmp_path / "data", 100, 4)
  c = _config("gldv2_resnet101")
  c.data.root = str(tmp_path / "data")
  c.data.max_eval_images = None
  c.model.embedding_dim = 256  # a D x D whitening FC, as the recipe's
  c.eval.whitening_target = "fc_init"
  workdir = tmp_path / "run"
  model, frozen, params = _save_checkpoint(c, workdir, shift_last_block=2.0)
  path = landmarks.learn_whitening_file(c, workdir, output=str(tmp_path / "w.npz"))
  whitening = whitening_lib.load_whitening(path)
  assert whitening.kind == "learned" and whitening.projection.shape == (256, 256)

  # Independent float64 reference: the checkpoint's GeM descriptors of the unpadded images.
  source = experiment.make_source(c, "train")
  labels = np.array([source[i]["label"] for i in range(len(source))])
  images = _unpadded(source, c.data.image_size)
  gem = model.clone(whiten=False)
  x = _apply_unpadded(gem, {"params": params, **frozen}, images)
  queries, positives = whitening_lib.pairs_from_labels(labels, seed=c.seed)
  diff = (x[queries] - x[positives]) @ whitening.projection.T
  np.testing.assert_allclose(diff.T @ diff / len(diff), np.eye(256), atol=1e-3)
  np.testing.assert_allclose(whitening.mean, x[queries].mean(axis=0), atol=1e-6)
  projected = (x - whitening.mean) @ whitening.projection.T
  second_moment = projected.T @ projected
  variances = np.diag(second_moment)
  assert np.all(np.diff(variances) <= 1e-6 * variances[0])  # by decreasing variance
  np.testing.assert_allclose(second_moment - np.diag(variances), 0, atol=1e-4 * variances[0])

  # model.whitening_init: the FC reproduces the test-time whitening of the GeM descriptors.
  c.model.whitening_init = str(path)
  whitened_model = experiment.make_model(c)
  fc = experiment.make_variables(c, whitened_model)["params"]["landmark_head"]["whitening"]
  with_fc = {**params, "landmark_head": {**params["landmark_head"], "whitening": fc}}
  y = _apply_unpadded(whitened_model, {"params": with_fc, **frozen}, images)
  c.model.whitening_init, c.model.whiten = None, False
  c.eval.scales, c.eval.whitening = (1.0,), str(path)
  embedded = np.load(modes.embed_split(c, workdir, split="train",
                                       output=str(tmp_path / "test_time.npz")))["embeddings"]
  test_time = _whitened(x, whitening)
  np.testing.assert_allclose(embedded, test_time, atol=1e-4)
  # The FC computes x W + b with |x W| ~ |b| ~ 800 |P (x - m)| here: float32 keeps ~4 digits.
  np.testing.assert_allclose(y, test_time, atol=1e-3)


def test_bucketed_training_step_equals_the_unpadded_images(data_root):
  """One training step on whole images in two aspect buckets: its loss and gradient equal plain
  backprop through each image of the batch at its own (unpadded) size."""
  import jax
  import jax.numpy as jnp

  from recall_jax import data
  from recall_jax.data import source as source_lib
  from recall_jax.train import megabatch
  from recall_jax.train import batch_assembly
  from recall_jax.train import sharded_step

  c = _config("gldv1_resnet101")
  c.data.root, c.data.check_sizes, c.data.flip = str(data_root), False, False
  exp = experiment.make_experiment(c, log_fn=None, progress=False)
  assert exp.bucket_plan is not None and exp.bucket_plan.shapes == ((32, 64), (64, 32), (64, 64))
  # The fixture's 52 x 20 images go to the (32, 64) bucket, the others to the square one; a plan
  # with room in both (the smoke batch's own plan puts every image in the square bucket).
  plan = data.BucketPlan(exp.bucket_plan.shapes, (8, 0, 16), 8)
  with contextlib.closing(data.make_bucketed_train_loader(
      exp.train_source, exp.sampler, plan=plan, image_size=c.data.image_size, seed=c.seed,
      flip=False, num_steps=1)) as batches:
    local = next(batches)
  assert set(local["image"].bucket.tolist()) == {0, 2}
  assert [len(b) for b in local["image"].buckets] == [8, 0, 16]
  batch = batch_assembly.global_bucketed_batch(local, exp.mesh)
  assert isinstance(batch["image"], megabatch.BucketedBatch)

  def embed_fn(params, images, key):  # as the trainer embeds (frozen BatchNorm, pixel mask)
    del key
    pixels, mask = data.split_mask_channel(images)
    return exp.model.apply({"params": params, **exp.frozen}, pixels, mask=mask, train=True)

  value_and_grad = jax.jit(sharded_step.sharded_value_and_grad(
      embed_fn, exp.loss_fn, exp.mesh, chunk_size_per_device=c.chunk_size))
  params = jax.tree.map(jnp.asarray, exp.initial_params)
  loss, grads = value_and_grad(params, batch["image"], batch["label"])

  indices = exp.sampler.batch_indices(0)
  records = source_lib.read_records(exp.train_source, indices)
  images = [aspect_buckets.resize_longer_side(r["image"], c.data.image_size,
                                             channels=c.data.channels) for r in records]
  labels = jnp.asarray([r["label"] for r in records], jnp.int32)

  # Images of one size are embedded together (no padding anywhere), then put in row order.
  sizes = sorted({x.shape for x in images})
  groups = [np.flatnonzero([x.shape == size for x in images]) for size in sizes]
  order = np.argsort(np.concatenate(groups))

  @jax.jit
  def reference_loss(p):
    embeddings = jnp.concatenate([
        exp.model.apply({"params": p, **exp.frozen}, jnp.stack([images[i] for i in rows]),
                        mask=jnp.ones((len(rows), *size[:2]), bool), train=True)
        for size, rows in zip(sizes, groups)])[order]
    return exp.loss_fn(embeddings, labels)

  want_loss, want_grads = jax.value_and_grad(reference_loss)(params)
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.asarray(labels))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  assert 0.0 < float(want_loss) < 1.0
  # float32: pooling a padded map sums in another order than the unpadded one.
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-3, atol=1e-6)

  # The training loop's own step takes the same batch.
  state = experiment.init_state(exp)
  _, metrics = exp.train_step(state, batch["image"], batch["label"], jax.random.key(0))
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)


def _reference_descriptors(model, variables, images: list[np.ndarray], scales) -> np.ndarray:
  """Each unpadded image alone, at its own size: the model at one scale, else the multi-scale
  combination of the model on the image resized without padding or mask."""
  if tuple(scales) == (1.0,):
    return _apply_unpadded(model, variables, images)
  power = multiscale.multiscale_power(model, variables)
  describe = lambda x, m: model.apply(variables, x, train=False)
  return np.concatenate([np.asarray(multiscale.multiscale_descriptors(
      describe, image[None], None, scales=scales, power=power), np.float64) for image in images])


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 2**-0.5, 2**0.5)])
def test_queries_and_images_smaller_than_image_size_are_described_at_their_size(
    data_root, scales):
  c = _config("gldv1_resnet101")
  c.data.root, c.data.check_sizes = str(data_root), False
  c.eval.datasets, c.eval.scales = ("roxford5k",), scales
  model = experiment.make_model(c)
  frozen = experiment.make_variables(c, model)
  params = frozen.pop("params")
  with pytest.warns(UserWarning, match="1 of 2 query boxes reach past their image"):
    evaluator = landmarks.make_revisited_evaluator(c, model, frozen, log_fn=None, progress=False)
  described = evaluator(params, 0).embeddings["roxford5k"]
  dataset = landmark_data.load_revisited("roxford5k", data_root=data_root, expected_sizes=None)
  crops = []
  for file, box in zip(dataset.query_files, dataset.query_boxes):
    with PIL.Image.open(file) as image:  # the reference code's crop (black outside the image)
      crops.append(np.asarray(image.convert("RGB").crop(tuple(box))))
  database = [np.asarray(PIL.Image.open(f).convert("RGB")) for f in dataset.database_files]
  assert max(max(x.shape[:2]) for x in crops + database) < c.data.image_size
  variables = {"params": params, **frozen}
  np.testing.assert_allclose(described.query_embeddings,
                             _reference_descriptors(model, variables, crops, scales), atol=1e-5)
  np.testing.assert_allclose(described.embeddings,
                             _reference_descriptors(model, variables, database, scales), atol=1e-5)


def test_evaluation_refuses_images_over_data_max_image_pixels(data_root):
  c = _config("gldv1_resnet101")
  c.data.root, c.data.check_sizes = str(data_root), False
  c.eval.datasets = ("roxford5k",)
  # The fixture's largest images are 40 x 40 (database image 2); query crops are smaller.
  c.data.max_image_pixels = 40 * 40 - 1
  model = experiment.make_model(c)
  frozen = experiment.make_variables(c, model)
  params = frozen.pop("params")
  with pytest.warns(UserWarning, match="query boxes reach past their image"):
    evaluator = landmarks.make_revisited_evaluator(c, model, frozen, log_fn=None, progress=False)
  with pytest.raises(errors.DataError) as info:
    evaluator(params, 0)
  message = str(info.value)
  assert "\n" not in message and "roxford5k_db_000002" in message
  assert message.endswith("the image has 40 x 40 pixels, more than the limit of 1599 "
                          "(data.max_image_pixels)")


def test_whiten_then_eval_whitens_the_evaluations_own_descriptors(data_root, tmp_path):
  # The AP-GeM preset: one scale, PCA-whitening of power 0.25 learned on the training set.
  c = _config("gldv1_resnet101", "smoke,apgem_eval")
  c.data.root, c.data.check_sizes = str(data_root), False
  assert (c.eval.scales, c.eval.whitening_kind, c.eval.whitening_power) == ((1.0,), "pca", 0.25)
  workdir = tmp_path / "run"
  model, frozen, params = _save_checkpoint(c, workdir)
  path = tmp_path / "apgem.npz"
  # 16 training images of 16-d descriptors span at most 15 dimensions: keep 8.
  proc = _main("configs/gldv1_resnet101.py:smoke,apgem_eval", workdir, data_root, "--mode=whiten",
               f"--output={path}", "--config.eval.whitening_dim=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  whitening = whitening_lib.load_whitening(path)
  assert whitening.space["fc"] and whitening.space["scales"] == [1.0]

  # Learned from the descriptors the evaluation computes (NumPy float64 PCA of power 0.25).
  train = np.load(modes.embed_split(c, workdir, split="train",
                                    output=str(tmp_path / "train.npz")))["embeddings"]
  x = np.asarray(train, np.float64)
  mean = x.mean(axis=0)
  eigval, eigvec = np.linalg.eigh((x - mean).T @ (x - mean) / len(x))
  eigval, eigvec = eigval[::-1][:8], eigvec[:, ::-1][:, :8]
  np.testing.assert_allclose(whitening.mean, mean, atol=1e-6)
  # Sign-free: P^T P = V diag(lambda^-0.5) V^T.
  np.testing.assert_allclose(whitening.projection.T @ whitening.projection,
                             eigvec @ np.diag(eigval**-0.5) @ eigvec.T, rtol=1e-3, atol=1e-3)

  # Applied by the evaluation: its descriptors, whitened by hand in float64.
  c.eval.datasets = ("roxford5k",)
  with pytest.warns(UserWarning, match="reach past"):
    plain = landmarks.make_revisited_evaluator(c, model, frozen, log_fn=None, progress=False)
  c.eval.whitening = str(path)
  config_lib.validate(c)
  with pytest.warns(UserWarning, match="reach past"):
    whitened = landmarks.make_revisited_evaluator(c, model, frozen, log_fn=None, progress=False)
  before = plain(params, 1).embeddings["roxford5k"]
  after = whitened(params, 1).embeddings["roxford5k"]
  for a, b in ((after.query_embeddings, before.query_embeddings),
               (after.embeddings, before.embeddings)):
    assert a.shape[1] == 8
    np.testing.assert_allclose(a, _whitened(b, whitening), atol=1e-5)
  proc = _main("configs/gldv1_resnet101.py:smoke,apgem_eval", workdir, data_root, "--mode=eval",
               f"--config.eval.whitening={path}")
  assert proc.returncode == 0, proc.stderr[-3000:]

  # A file learned in another space is refused in one line, before any work.
  for flag, where in ((f"--config.eval.whitening={path}", "eval.whitening"),
                      (f"--config.model.whitening_init={path}", "model.whitening_init")):
    proc = _main("configs/gldv1_resnet101.py:smoke", workdir, data_root, "--mode=eval", flag)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{where} file {path} was learned for" in proc.stderr and "Traceback" not in proc.stderr


def test_damaged_whitening_files_are_refused_before_any_work(data_root, tmp_path):
  rng = np.random.default_rng(0)
  # The smoke model describes with 16 dimensions.
  nan = whitening_lib.Whitening(rng.normal(size=16), rng.normal(size=(8, 16)), "pca")
  nan.projection[3, 5] = np.nan
  wide = whitening_lib.Whitening(rng.normal(size=24), rng.normal(size=(8, 24)), "pca")
  for name, whitening, message in (("nan", nan, "holds NaN or infinite values"),
                                   ("wide", wide, "whitens 24-d descriptors, the model "
                                                  "describes with 16")):
    whitening_lib.save_whitening(tmp_path / f"{name}.npz", whitening)
    proc = _main("configs/gldv1_resnet101.py:smoke", tmp_path / name, data_root, "--mode=eval",
                 f"--config.eval.whitening={tmp_path / f'{name}.npz'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "embed_fn produced NaN" not in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / name / "metrics.jsonl").exists()


def test_whitening_keys_are_range_checked():
  c = _landmark_config()
  c.eval.whitening_power, c.eval.whitening_dim, c.eval.whitening_ridge = 2.0, 0, -1.0
  c.eval.whitening_kind, c.eval.whitening_target = "zca", "head"
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(c)
  for key in ("whitening_power", "whitening_dim", "whitening_ridge", "whitening_kind",
              "whitening_target"):
    assert f"eval.{key} must" in str(info.value)
  with pytest.raises(errors.ConfigError, match="known: smoke, apgem_eval"):
    _config("gldv1_resnet101", "smoke,tpami")
