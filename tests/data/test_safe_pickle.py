"""The plain-data unpickler: ground-truth layouts load, anything importing a global is refused."""

import io
import pickle
import pickletools

import pytest

from recall_jax.data import safe_pickle
from recall_jax.errors import DataError, MissingFileError


class _RunsShell:
  """Pickles to `os.system(<command>)`, the classic malicious payload."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    import os
    return (os.system, (self.command,))


def test_plain_data_round_trips(tmp_path):
  data = {"imlist": ["all_souls_000013", "radcliffe_camera_000519"],
          "qimlist": ["all_souls_000013"],
          "gnd": [{"easy": [1, 2], "hard": [], "junk": [0], "bbx": [136.5, 34.1, 648.5, 955.2]}],
          "misc": (None, True, 3.5, -7, 2**70, "é")}
  for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
    path = tmp_path / f"gnd_{protocol}.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert safe_pickle.load(path) == data
  # Bytes and sets have their own opcodes from protocol 3 and 4 on (before, they import a builder).
  richer = {**data, "bytes": b"raw", "set": {1, 2}, "frozen": frozenset({3})}
  assert safe_pickle.loads(pickle.dumps(richer, protocol=4)) == richer


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path, protocol):
  marker = tmp_path / "executed"
  payload = pickle.dumps({"gnd": [_RunsShell(f"touch {marker}")]}, protocol=protocol)
  assert b"system" in payload  # the crafted file really imports os.system / posix.system
  path = tmp_path / "gnd_roxford5k.pkl"
  path.write_bytes(payload)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"imports (os|posix)\.system"):
    safe_pickle.load(path)
  assert not marker.exists()
  with pytest.raises(DataError):  # the family the command line prints as one line
    safe_pickle.loads(payload)
  assert not marker.exists()


def test_any_global_is_refused_even_harmless_ones():
  with pytest.raises(safe_pickle.UnsafePickleError, match="collections.OrderedDict"):
    safe_pickle.loads(pickle.dumps(__import__("collections").OrderedDict(a=1)))


def test_persistent_ids_are_refused():
  # PERSID opcode: "P<id>\n" then STOP.
  data = b"Pexploit\n."
  pickletools.dis(data, out=io.StringIO())  # well-formed: refused for what it does, not its syntax
  with pytest.raises(safe_pickle.UnsafePickleError, match="persistent"):
    safe_pickle.loads(data)


def test_corrupt_and_missing_files(tmp_path):
  broken = tmp_path / "broken.pkl"
  broken.write_bytes(pickle.dumps({"a": [1, 2, 3]})[:-5])
  with pytest.raises(DataError, match="not a readable"):
    safe_pickle.load(broken)
  with pytest.raises(DataError, match="extension"):
    safe_pickle.loads(b"\x80\x02\x82\x01.")  # EXT1 code 1, registered nowhere
  with pytest.raises(MissingFileError):
    safe_pickle.load(tmp_path / "absent.pkl")
