r"""Command line: train, evaluate or embed with a config file.

  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot
  python -m recall_jax.main --config configs/sop_vit.py --workdir runs/sop_vit \
      --config.batch_size=2000 --config.model.pretrained=/weights/B_16-i21k-....npz
  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot --mode eval \
      --checkpoint best
  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot --mode embed \
      --split test --output runs/omniglot/test_embeddings.npz
  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot --mode search \
      --gallery photos/ --query query.jpg --top_k 10
  python -m recall_jax.main --config configs/omniglot.py --workdir runs/omniglot --mode export \
      --output embedder.bin
  python -m recall_jax.main --config configs/gldv1_resnet101.py --workdir runs/gldv1 --mode whiten

Modes (--mode): train (default), eval, embed, search, export, whiten. Every config key, its
default and its meaning is listed in configs/default.py (recall_jax.config.base_config); override
any of them with --config.KEY=VALUE, e.g. --config.data.path=/data/photos.

`train` resumes from the newest checkpoint in `--workdir`. Unknown config keys and values of the
wrong type are rejected while the flags are parsed; everything else is checked by
`recall_jax.config.validate` before any data is prepared. Problems the user can fix
(`recall_jax.errors.UserInputError`) are printed as one line with exit status 2; a training run
that diverged (NaN/inf loss or state, nothing bad saved) as one line with exit status 1; anything
else is a bug and keeps its traceback.

Serves both tasks: the config picks the input layout and the evaluation protocol; no mode here
asks which task it runs.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from recall_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/omniglot.py or configs/sop_vit.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "embed", "search", "export", "whiten"],
    "What to do: train (resumes), eval (a checkpoint), embed (a split to .npz), search (a folder "
    "of images), export (a portable embedder), whiten (learn a whitening .npz, landmark models). "
    "Config keys: see configs/default.py, set with --config.KEY=VALUE.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "eval/embed/search/export: 'latest', 'best' or a step number.")
# Checked while parsing, so a bad value is one line before anything is read or embedded.
flags.register_validator("checkpoint", lambda v: v in ("latest", "best") or v.isascii() and
                         v.isdigit(), "must be 'latest', 'best' or a step number")
_SPLIT = flags.DEFINE_string(
    "split", None, "embed: the split to embed (default: the gallery split, else the first test).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "embed: output .npz (default: <workdir>/<split>_embeddings.npz); search: "
    "results JSON, a PNG grid beside it (default: <workdir>/search_results.json); export: the "
    "embedder file (default: <workdir>/embedder.bin); whiten: the whitening .npz (default: "
    "<workdir>/whitening.npz).")
_GALLERY = flags.DEFINE_string("gallery", None, "search: the folder of images searched.")
_QUERY = flags.DEFINE_string("query", None, "search: a query image or a folder of them.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "search: where gallery embeddings are cached (default: "
    "<workdir>/search_cache, or the user's cache folder when the workdir is not writable).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "search: results per query.", lower_bound=1)
_WHITENING = flags.DEFINE_enum("whitening", None, ["learned", "pca"],
                               "whiten: learned from same-class pairs, or PCA-whitening "
                               "(default: --config.eval.whitening_kind).")
_WHITENING_DIM = flags.DEFINE_integer("whitening_dim", None,
                                      "whiten: keep the leading directions (default: "
                                      "--config.eval.whitening_dim).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that `--help` and flag errors do not pay for importing JAX.
  from recall_jax.train import integrity  # pylint: disable=import-outside-toplevel
  from recall_jax.serve import commands  # pylint: disable=import-outside-toplevel
  from recall_jax.train import distributed  # pylint: disable=import-outside-toplevel
  from recall_jax.train import modes  # pylint: disable=import-outside-toplevel
  from recall_jax.train import trainer  # pylint: disable=import-outside-toplevel

  # Orbax and grain log every file operation at INFO; keep the console for progress and results
  # unless the user asks for more with --verbosity.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  _use_compilation_cache(config.compilation_cache_dir, _WORKDIR.value)
  try:
    # Multi-host runs (SLURM, MPI) must connect before any other JAX call; no-op otherwise.
    distributed.initialize_distributed()
    if _MODE.value == "train":
      trainer.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "eval":
      modes.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)
    elif _MODE.value == "whiten":
      from recall_jax.train import landmarks  # pylint: disable=import-outside-toplevel
      landmarks.learn_whitening_file(config, _WORKDIR.value, _CHECKPOINT.value, _OUTPUT.value,
                                     kind=_WHITENING.value, dim=_WHITENING_DIM.value)
    elif _MODE.value == "embed":
      modes.embed_split(config, _WORKDIR.value, _CHECKPOINT.value, split=_SPLIT.value,
                        output=_OUTPUT.value)
    elif _MODE.value == "search":
      commands.search_folder(config, _WORKDIR.value, _CHECKPOINT.value, gallery_dir=_GALLERY.value,
                             query=_QUERY.value, top_k=_TOP_K.value, output=_OUTPUT.value,
                             cache_dir=_CACHE_DIR.value)
    else:
      commands.export_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value, output=_OUTPUT.value)
  except errors.UserInputError as e:
    # Configuration and data problems: one clear message, no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (trainer.NonFiniteLossError, integrity.NonFiniteStateError) as e:
    # The run diverged; the message names the checkpoint to resume from.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _use_compilation_cache(cache_dir: str | None, workdir: str) -> None:
  """Keeps compiled steps on disk, so that a resumed or re-launched run loads, not recompiles."""
  if cache_dir == "":
    return
  import jax  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(cache_dir or pathlib.Path(workdir) / "compilation_cache").expanduser()
  jax.config.update("jax_compilation_cache_dir", str(path.absolute()))
  # Every compilation, not only those over JAX's default second: the small ones add up too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config override that names no key shown as one line.

  `config_flags` raises a chained KeyError/AttributeError for `--config.no_such_key=1`: a user's
  typo, not a bug, so it ends the program with one line and exit status 2, as do flag errors and
  a config file's own `UserInputError` (e.g. an unknown `:argument`).
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, errors.UserInputError) as e:
    print(f"error: {e}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:
    key = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                and str(e).strip("\"'") in a.split("=", 1)[0]), None)
    print(f"error: unknown config key {key or e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  """The `recall-jax` console script: `python -m recall_jax.main` under another name."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
