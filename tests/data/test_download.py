"""Checked downloads (`recall_jax.data.download`): truncated or altered content is never saved, and
an offline machine gets one line saying where to put the archives."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import pathlib
import threading

import pytest

from recall_jax.data import download
from recall_jax.errors import DataError, MissingFileError

_CONTENT = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
  """/full: the content; /short: announces it whole, sends half, closes."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", str(len(_CONTENT)))
    self.end_headers()
    self.wfile.write(_CONTENT if self.path == "/full" else _CONTENT[:len(_CONTENT) // 2])
    self.close_connection = True

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _server():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


def _no_leftovers(folder: pathlib.Path) -> bool:
  return not [p for p in folder.iterdir() if p.name.endswith(".part")]


def test_complete_download_with_the_right_sha256(tmp_path):
  with _server() as url:
    target = download.download_file(f"{url}/full", tmp_path / "a.zip",
                                     sha256=hashlib.sha256(_CONTENT).hexdigest())
  assert target.read_bytes() == _CONTENT and _no_leftovers(tmp_path)


def test_truncated_download_is_not_saved(tmp_path):
  with _server() as url, pytest.raises((DataError, OSError), match="short|Incomplete"):
    download.download_file(f"{url}/short", tmp_path / "a.zip")
  assert not (tmp_path / "a.zip").exists() and _no_leftovers(tmp_path)


def test_download_with_another_sha256_is_not_saved(tmp_path):
  with _server() as url, pytest.raises(DataError, match="SHA-256"):
    download.download_file(f"{url}/full", tmp_path / "a.zip", sha256="0" * 64)
  assert not (tmp_path / "a.zip").exists() and _no_leftovers(tmp_path)


def test_recorded_sha256_matches_the_official_archives():
  root = pathlib.Path(os.environ.get("RECALL_JAX_DATA", "")) / "omniglot"
  if not all((root / name).is_file() for name in download.OMNIGLOT_ARCHIVES):
    pytest.skip(f"the Omniglot archives are not under {root} (set RECALL_JAX_DATA)")
  for name in download.OMNIGLOT_ARCHIVES:
    assert hashlib.sha256((root / name).read_bytes()).hexdigest() == download.OMNIGLOT_SHA256[name]


def test_offline_is_one_line_saying_where_to_put_the_archives(tmp_path):
  with _server() as url:
    closed = url  # the server is gone once the block ends: nothing listens there any more
  with pytest.raises(MissingFileError) as raised:
    download.ensure_omniglot(tmp_path / "omniglot", url_base=closed)
  message = str(raised.value)
  assert "\n" not in message
  assert "Could not download" in message and "RECALL_JAX_DATA" in message
  assert f"into {tmp_path / 'omniglot'}" in message
  assert not list((tmp_path / "omniglot").iterdir())
