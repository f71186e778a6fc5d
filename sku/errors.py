"""SkuError, the messages every command words the same way, and reading text files."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import TaskVecError
from taskvec.jsonfile import read_regular


class SkuError(Exception):
    """Bad input or a failed run. The CLI prints the message as one line: `sku: error: …`."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error, which is usually the one that says what failed."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


def cannot_load(source, what: str, error: BaseException, kind: type = SkuError) -> Exception:
    """`SOURCE: cannot load WHAT: first line of the library's error`, to raise from it."""
    return kind(f"{source}: cannot load {what}: {first_line(error)}")


@contextmanager
def loading(source, what: str, kind: type = SkuError):
    """Library code loading a user's files (transformers, peft, safetensors) raises many types
    for a damaged one: OSError, ValueError, but also TypeError for a config.json that is a list,
    KeyError, AttributeError. Each becomes one line, `SOURCE: cannot load WHAT: …`."""
    try:
        yield
    except (SkuError, TaskVecError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library raised, the file is at fault
        raise cannot_load(source, what, e, kind) from None


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents, or one line naming it: not a regular file (a FIFO or device is
    refused before a read could block), unreadable, or not UTF-8 text (where)."""
    try:
        raw = read_regular(Path(path), limit=sys.maxsize)  # data files may be gigabytes
    except TaskVecError as e:
        raise SkuError(str(e)) from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise SkuError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})"
                       ) from None


def refuse_unwritable_folder(path: Path, what: str) -> None:
    """A folder that outputs go into must be one, or be makeable, and writable: a file in its
    place (or in place of a parent) or a read-only folder would fail only when the first
    result is saved, after the expensive work (generation, judging), so it is refused before."""
    for folder in (Path(path), *Path(path).parents):
        if folder.is_dir():
            if not os.access(folder, os.W_OK | os.X_OK):  # EROFS and EACCES, even for root
                raise SkuError(f"{folder}: not writable; {what} goes in {path}")
            return
        if folder.exists() or folder.is_symlink():  # a file, a FIFO, a dangling link
            raise SkuError(f"{folder}: not a folder; {what} goes in {path}")


def refuse_existing(path: Path, force: bool, hint: str = "pass --force to replace it") -> None:
    """An output that exists (a file, or a folder with anything in it) needs `force`."""
    path = Path(path)
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not force:
        raise SkuError(f"{path}: already exists ({hint})")
