"""Downloads of the Omniglot archives (the only dataset whose licence allows fetching it here)."""

from __future__ import annotations

import os
import pathlib
import tempfile
import urllib.request

import tqdm

from recall_jax.errors import MissingFileError

OMNIGLOT_URL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_ARCHIVES = ("images_background.zip", "images_evaluation.zip")


def download_file(url: str, target: pathlib.Path, *, timeout_s: float = 60.0) -> pathlib.Path:
  """Downloads `url` to `target` with a tqdm progress bar (bytes), atomically.

  The file is written beside `target` under a temporary name and renamed when complete, so an
  interrupted download never leaves a truncated archive behind.

  Raises:
    OSError: naming the URL when the download fails.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
      except OSError as e:
        raise OSError(f"Could not download {url}: {e}") from e
      with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm.tqdm(total=total, unit="B", unit_scale=True,
                       desc=f"Downloading {target.name}") as bar:
          while chunk := response.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))
    os.replace(tmp_name, target)
  finally:
    if os.path.exists(tmp_name):
      os.remove(tmp_name)
  return target


def ensure_omniglot(folder: pathlib.Path, *, url_base: str | None = None,
                    download: bool = True) -> None:
  """Makes sure `folder/images_background.zip` and `images_evaluation.zip` exist.

  Args:
    folder: `<data root>/omniglot`.
    url_base: where `images_*.zip` are fetched from; default: the official repository.
    download: when False, a missing archive is an error instead of a download.

  Raises:
    FileNotFoundError: an archive is missing and `download` is False.
  """
  for name in OMNIGLOT_ARCHIVES:
    path = folder / name
    if path.is_file():
      continue
    if not download:
      raise MissingFileError(
          f"Omniglot archive {path} is missing; download it from {OMNIGLOT_URL_BASE}/{name} "
          "or pass download=True")
    base = (url_base or OMNIGLOT_URL_BASE).rstrip("/")
    download_file(f"{base}/{name}", path)
