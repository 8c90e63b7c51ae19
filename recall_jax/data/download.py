"""Downloads of the Omniglot archives (the only dataset whose licence allows fetching it here);
category-level task.

A download is complete only when it has the size the server announced and, for the official
archives, their recorded SHA-256; anything else is discarded, never saved as the archive. Without
a network the user is told, in one line, where to put the archives by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.request

import tqdm

from recall_jax.data import paths
from recall_jax.errors import DataError, MissingFileError

OMNIGLOT_URL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_ARCHIVES = ("images_background.zip", "images_evaluation.zip")
# SHA-256 of the official archives (brendenlake/omniglot, python/).
OMNIGLOT_SHA256 = {
    "images_background.zip": "41422fc98470c8ccff2d77250af9bfd276d3b638d47657bf35a17f34fe4f7caa",
    "images_evaluation.zip": "ec27fac847d3f8e2e799d685c16c33dd6ccb6068be998a09616bdafbcd5e43ab",
}


def download_file(url: str, target: pathlib.Path, *, sha256: str | None = None,
                  timeout_s: float = 60.0) -> pathlib.Path:
  """Downloads `url` to `target` with a tqdm progress bar (bytes), atomically and checked.

  The file is written beside `target` under a temporary name and renamed when complete, so an
  interrupted or damaged download never leaves an archive behind.

  Args:
    url: what to fetch.
    target: the file to write.
    sha256: the expected hex SHA-256 of the content, or None (not checked).
    timeout_s: the connection's timeout, seconds.

  Raises:
    OSError: naming the URL when the download fails (no network, HTTP error, connection lost).
    DataError: the content is shorter than the announced Content-Length or has another SHA-256.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
  digest, received = hashlib.sha256(), 0
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
        with response:
          total = int(response.headers.get("Content-Length") or 0) or None
          with tqdm.tqdm(total=total, unit="B", unit_scale=True,
                         desc=f"Downloading {target.name}") as bar:
            while chunk := response.read(1 << 20):
              out.write(chunk)
              digest.update(chunk)
              received += len(chunk)
              bar.update(len(chunk))
      except (OSError, http.client.HTTPException) as e:  # HTTPException: e.g. IncompleteRead
        raise OSError(f"Could not download {url}: {type(e).__name__}: {e}") from e
    if total is not None and received != total:
      raise DataError(f"download of {url} was cut short: {received} of {total} bytes received")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
      raise DataError(f"download of {url} is damaged or not the expected file: SHA-256 "
                      f"{digest.hexdigest()}, expected {sha256.lower()}")
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
    url_base: where `images_*.zip` are fetched from; default: the official repository (whose
      archives are checked against `OMNIGLOT_SHA256`).
    download: when False, a missing archive is an error instead of a download.

  Raises:
    MissingFileError: an archive is missing and `download` is False or the download fails (no
      network): the message says where to put the archives by hand.
    DataError: a downloaded archive is truncated or has another SHA-256 than the official one.
  """
  for name in OMNIGLOT_ARCHIVES:
    path = folder / name
    if path.is_file():
      continue
    by_hand = (f"download {OMNIGLOT_URL_BASE}/{name} by hand into {folder} (the data root is "
               f"config.data.root, else ${paths.DATA_ENV_VAR})")
    if not download:
      raise MissingFileError(f"Omniglot archive {path} is missing; {by_hand}")
    base = (url_base or OMNIGLOT_URL_BASE).rstrip("/")
    try:
      download_file(f"{base}/{name}", path,
                    sha256=OMNIGLOT_SHA256[name] if url_base is None else None)
    except OSError as e:
      raise MissingFileError(f"Omniglot archive {path} is missing and {e}; {by_hand}") from None
