"""Reading pickles that can only hold plain data: every global is refused, so no code can run.

A pickle rebuilds objects by importing names (`GLOBAL` / `STACK_GLOBAL` opcodes, resolved through
`Unpickler.find_class`) and calling them (`REDUCE`, `BUILD`, `NEWOBJ`, ...); a crafted file can so
call `os.system`. Dicts, lists, tuples, strings, numbers, booleans and None need no import (nor do
bytes from protocol 3 on and sets from protocol 4 on), so an unpickler whose `find_class` always
refuses reads them all and nothing else: calling opcodes have nothing to call. Persistent ids and
extension codes, the other ways to reach an object, are refused too. The official ground-truth files
of the landmark benchmarks hold only such plain data.

Serves both tasks.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

from recall_jax.errors import DataError, MissingFileError


class UnsafePickleError(DataError, pickle.UnpicklingError):
  """A pickle asked to import or reach an object: refused before anything was imported or run."""


class _PlainDataUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that refuses every global, persistent id and extension code."""

  def __init__(self, file, what: str):
    super().__init__(file, encoding="ASCII", errors="strict")
    self._what = what

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(
        f"{self._what}: refused to load, the pickle imports {module}.{name}; only plain data "
        "(dicts, lists, tuples, strings, numbers) is accepted. If the file came from an untrusted "
        "source, delete it; otherwise re-save its contents as plain Python objects")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"{self._what}: refused to load, the pickle uses persistent id {pid!r}")


def _load(file, what: str) -> Any:
  try:
    return _PlainDataUnpickler(file, what).load()
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, UnicodeDecodeError,
          AttributeError, IndexError, KeyError) as e:
    # Extension codes end up here too (ValueError: unregistered extension code).
    raise DataError(f"{what}: not a readable plain-data pickle ({type(e).__name__}: {e})") from e


def load(path: str | os.PathLike[str]) -> Any:
  """Reads a pickle file of plain data.

  Args:
    path: the file.

  Returns:
    The unpickled dicts / lists / tuples / sets / strings / bytes / numbers / None.

  Raises:
    MissingFileError: `path` does not exist (FileNotFoundError from the open).
    UnsafePickleError: the pickle imports a global (e.g. `os.system`) or uses persistent ids.
    DataError: the file is not a readable pickle.
  """
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      return _load(f, os.fspath(path))
  except FileNotFoundError:
    raise MissingFileError(f"{path} not found") from None


def loads(data: bytes, *, what: str = "pickle") -> Any:
  """`load` for bytes in memory; `what` names them in error messages."""
  return _load(io.BytesIO(data), what)
