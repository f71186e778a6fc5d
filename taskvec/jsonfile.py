"""JSON that taskvec did not write (safetensors headers, index files, adapter and model
configs), read and checked in one place: every way such a file can be bad, from a FIFO in its
place to a duplicated key or a value of the wrong type, ends in one TaskVecError naming it.

The json module alone lets several through: it keeps the last of two equal keys silently,
raises RecursionError on deep nesting, accepts NaN, and cannot tell an int from a bool.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from taskvec.errors import TaskVecError

MAX_BYTES = 100_000_000  # safetensors' own limit on a header; no config comes near it


def read_regular(path: Path, limit: int = MAX_BYTES) -> bytes:
    """A regular file's bytes. A FIFO, device or folder is refused before a read could block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait either
    except OSError as e:
        raise TaskVecError(f"{path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TaskVecError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise TaskVecError(f"{path}: {info.st_size} bytes, more than the {limit} a JSON "
                               "file here may have")
        try:
            return f.read()
        except OSError as e:
            raise TaskVecError(f"{path}: cannot read: {e.strerror}") from None


class _Duplicate(Exception):
    pass


def _unique(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(key)
        result[key] = value
    return result


def parse(raw: bytes | str, where) -> object:
    try:
        return json.loads(raw, object_pairs_hook=_unique)
    except _Duplicate as e:
        raise TaskVecError(f"{where}: key {e.args[0]!r} appears twice") from None
    except RecursionError:
        raise TaskVecError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int too long to convert
        raise TaskVecError(f"{where}: not valid JSON: {str(e).splitlines()[0]}") from None


def load(path: Path) -> object:
    return parse(read_regular(path), path)


def _what(value) -> str:
    return "null" if value is None else type(value).__name__


def integer(value, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaskVecError(f"{where} must be an integer ≥ {minimum}, not {value!r}")
    return value


def number(value, where: str) -> float:
    """A finite JSON number (int or float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise TaskVecError(f"{where} must be a finite number, not {value!r}")
    return float(value)


def boolean(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise TaskVecError(f"{where} must be true or false, not {value!r}")
    return value


def mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise TaskVecError(f"{where} must be a JSON object, not {_what(value)}")
    return value


def string(value, where: str) -> str:
    if not isinstance(value, str):
        raise TaskVecError(f"{where} must be a string, not {_what(value)}")
    return value
